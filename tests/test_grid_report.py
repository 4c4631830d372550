"""Grid aggregation (exact means, sds, DER, paired differences) and the report files, with a real
headless-browser render when Chromium is installed."""
import base64
import csv
import hashlib
import re

import pytest

from backdoor_eraser.grid.aggregate import cell_times, diagnostics, summarize, training_runs
from backdoor_eraser.grid.report import dump_dom, find_chromium, screenshot, write_report

DATASET, ARCH, CF = "cifar10", "wrn-16-1", 0.05
BEFORE_BADNETS = {"acc": 0.90, "acc_nontarget": 0.90, "asr": 1.00, "ra": 0.0}
BEFORE_BLEND = {"acc": 0.80, "acc_nontarget": 0.80, "asr": 0.90, "ra": 0.05}
INVOCATIONS = [{"spec": "tiny", "command": "backdoor-eraser bench tiny.yaml --out runs/tiny",
                "spec_text": "name: tiny\ndatasets: [cifar10]\n# <b>not bold</b>\n", "started": "2025-01-01T10:00:00"}]


def cell(kind, attack, defense=None, seed=None, *, status="done", metrics=None, error=None, wall=None,
         dataset=DATASET, arch=ARCH, cf=CF, run_dir=None):
    axes = {"dataset": dataset, "arch": arch, "attack": attack, "defense": defense, "seed": seed,
            "clean_fraction": cf if kind == "defense" else None}
    return {"hash": hashlib.sha256(repr(sorted(axes.items())).encode()).hexdigest(), "kind": kind, "axes": axes,
            "config": {}, "status": status, "error": error, "metrics": metrics if status == "done" else None,
            "wall_seconds": wall if status == "done" else None, "steps": None, "started": None, "finished": None,
            "host": None, "run_dir": str(run_dir) if run_dir else None}


def defended(attack, defense, seed, before, acc, asr=None, ra=0.70, wall=None, **kw):
    m = {"acc": acc, "acc_nontarget": acc, "ra": ra, "before": before, "wall_seconds": wall, "steps": 10}
    if asr is not None:
        m["asr"] = asr
    return cell("defense", attack, defense, seed, metrics=m, wall=wall, **kw)


def make_rows(run_dirs=None):
    """badnets: nad ×3, finetune ×2 + 1 failed, sage ×1 (no ASR) + 1 pending + 1 running;
    blend: finetune ×2, no nad; wanet: failed attack cell, its nad cell pending."""
    rd = run_dirs or {}
    return [
        cell("attack", "badnets", metrics={**BEFORE_BADNETS, "epochs": 2}, wall=100.0, run_dir=rd.get("attack")),
        cell("attack", "blend", metrics={**BEFORE_BLEND, "epochs": 2}, wall=300.0),
        cell("attack", "wanet", status="failed", error="RuntimeError: wanet warp | broke"),
        defended("badnets", "nad", 0, BEFORE_BADNETS, 0.80, 0.02, wall=10.0, run_dir=rd.get("nad0")),
        defended("badnets", "nad", 1, BEFORE_BADNETS, 0.82, 0.04, wall=20.0),
        defended("badnets", "nad", 2, BEFORE_BADNETS, 0.84, 0.06, wall=30.0),
        defended("badnets", "finetune", 0, BEFORE_BADNETS, 0.85, 0.50, wall=5.0, run_dir=rd.get("ft0")),
        defended("badnets", "finetune", 1, BEFORE_BADNETS, 0.87, 0.30, wall=7.0),
        cell("defense", "badnets", "finetune", 2, status="failed", error="RuntimeError: out of memory"),
        defended("badnets", "sage", 0, BEFORE_BADNETS, 0.83, None),
        cell("defense", "badnets", "sage", 1, status="pending"),
        cell("defense", "badnets", "sage", 2, status="running"),
        defended("blend", "finetune", 0, BEFORE_BLEND, 0.78, 0.10),
        defended("blend", "finetune", 1, BEFORE_BLEND, 0.82, 0.20),
        cell("defense", "wanet", "nad", 0, status="pending"),
    ]


def by_name(summary):
    return {(g["attack"], g["defense"]): g for g in summary}


# ---- aggregation ---------------------------------------------------------------------------------

def test_order_groups_and_counts():
    s = summarize(make_rows())
    assert [(g["attack"], g["defense"]) for g in s] == [
        ("badnets", "backdoored"), ("badnets", "nad"), ("badnets", "finetune"), ("badnets", "sage"),
        ("blend", "backdoored"), ("blend", "finetune"), ("wanet", "backdoored"), ("wanet", "nad")]
    g = by_name(s)
    assert all(x["dataset"] == DATASET and x["arch"] == ARCH and x["clean_fraction"] == CF for x in s)
    assert (g["badnets", "nad"]["n"], g["badnets", "nad"]["seeds"]) == (3, [0, 1, 2])
    ft = g["badnets", "finetune"]
    assert (ft["n"], ft["seeds"], ft["failed"], ft["missing"], ft["errors"]) == (
        2, [0, 1], 1, 0, ["RuntimeError: out of memory"])
    sage = g["badnets", "sage"]
    assert (sage["n"], sage["failed"], sage["missing"]) == (1, 0, 2)
    wanet = g["wanet", "backdoored"]
    assert (wanet["n"], wanet["failed"], wanet["errors"], wanet["acc_mean"]) == (
        0, 1, ["RuntimeError: wanet warp | broke"], None)
    assert (g["wanet", "nad"]["n"], g["wanet", "nad"]["missing"]) == (0, 1)


def test_means_sds_acc_drop_and_der():
    g = by_name(summarize(make_rows()))
    nad = g["badnets", "nad"]
    assert nad["acc_mean"] == pytest.approx(0.82) and nad["acc_sd"] == pytest.approx(0.02)
    assert nad["asr_mean"] == pytest.approx(0.04) and nad["asr_sd"] == pytest.approx(0.02)
    assert nad["ra_mean"] == pytest.approx(0.70) and nad["ra_sd"] == pytest.approx(0.0, abs=1e-12)
    assert nad["acc_drop_mean"] == pytest.approx(0.08) and nad["acc_drop_sd"] == pytest.approx(0.02)
    # DER = [(1 − asr) − (0.9 − acc) + 1] / 2 = 0.94 for all three seeds
    assert nad["der_mean"] == pytest.approx(0.94) and nad["der_sd"] == pytest.approx(0.0, abs=1e-12)

    # blend/finetune: seed 1 beats the backdoored ACC (0.82 > 0.80), so its ΔACC is clamped to 0 in DER
    ft = g["blend", "finetune"]
    assert ft["acc_mean"] == pytest.approx(0.80) and ft["acc_sd"] == pytest.approx(0.04 / 2 ** 0.5)
    assert ft["acc_drop_mean"] == pytest.approx(0.0, abs=1e-12) and ft["acc_drop_sd"] == pytest.approx(0.04 / 2 ** 0.5)
    assert ft["der_mean"] == pytest.approx((0.89 + 0.85) / 2) and ft["der_sd"] == pytest.approx(0.04 / 2 ** 0.5)


def test_none_asr_and_single_seed():
    sage = by_name(summarize(make_rows()))["badnets", "sage"]
    assert sage["acc_mean"] == pytest.approx(0.83) and sage["acc_sd"] is None
    assert sage["acc_drop_mean"] == pytest.approx(0.07)
    assert sage["asr_mean"] is None and sage["asr_sd"] is None and sage["der_mean"] is None


def test_backdoored_rows_come_from_before_metrics():
    g = by_name(summarize(make_rows()))
    bd = g["badnets", "backdoored"]
    # 6 done defense cells over seeds 0-2: one backdoored entry per seed
    assert bd["role"] == "backdoored" and bd["n"] == 3 and bd["seeds"] == [0, 1, 2]
    assert bd["acc_mean"] == pytest.approx(0.90) and bd["acc_sd"] == pytest.approx(0.0, abs=1e-12)
    assert bd["asr_mean"] == pytest.approx(1.0) and bd["acc_drop_mean"] is None and bd["der_mean"] is None
    assert (bd["failed"], bd["missing"]) == (0, 0)
    assert g["blend", "backdoored"]["asr_mean"] == pytest.approx(0.90)


def test_backdoored_row_falls_back_to_the_attack_cell():
    rows = [cell("attack", "badnets", metrics=dict(BEFORE_BADNETS)), cell("defense", "badnets", "nad", 0, status="pending")]
    bd = by_name(summarize(rows))["badnets", "backdoored"]
    assert (bd["n"], bd["seeds"], bd["acc_mean"], bd["missing"]) == (1, [], pytest.approx(0.90), 0)
    # an attack with no defense cells still gets its backdoored row
    only = summarize([cell("attack", "blend", status="running")])
    assert [(g["attack"], g["defense"], g["clean_fraction"], g["missing"]) for g in only] == [
        ("blend", "backdoored", None, 1)]


def test_paired_differences_to_the_reference():
    g = by_name(summarize(make_rows()))
    ft = g["badnets", "finetune"]  # seeds 0, 1 paired with nad: ΔACC 0.05, 0.05; ΔASR 0.48, 0.26
    assert ft["d_n"] == 2
    assert ft["d_acc_mean"] == pytest.approx(0.05) and ft["d_acc_sd"] == pytest.approx(0.0, abs=1e-12)
    assert ft["d_asr_mean"] == pytest.approx(0.37) and ft["d_asr_sd"] == pytest.approx(0.22 / 2 ** 0.5)
    sage = g["badnets", "sage"]
    assert (sage["d_n"], sage["d_acc_mean"], sage["d_acc_sd"], sage["d_asr_mean"]) == (1, pytest.approx(0.03), None, None)
    for key in (("badnets", "nad"), ("badnets", "backdoored"), ("blend", "finetune"), ("wanet", "nad")):
        assert g[key]["d_n"] is None and g[key]["d_acc_mean"] is None  # the reference itself, or no reference


def test_other_reference():
    g = by_name(summarize(make_rows(), reference="finetune"))
    nad = g["badnets", "nad"]
    assert nad["d_n"] == 2 and nad["d_acc_mean"] == pytest.approx(-0.05)
    assert g["badnets", "finetune"]["d_n"] is None


def test_cell_times():
    t = {(x["kind"], x["defense"]): x for x in cell_times(make_rows())}
    assert list(t) == [("attack", None), ("defense", "nad"), ("defense", "finetune")]
    assert (t["attack", None]["count"], t["attack", None]["mean"], t["attack", None]["total"]) == (2, 200.0, 400.0)
    assert (t["defense", "nad"]["count"], t["defense", "nad"]["mean"], t["defense", "nad"]["total"]) == (
        3, pytest.approx(20.0), pytest.approx(60.0))
    assert t["defense", "finetune"]["total"] == pytest.approx(12.0)
    assert t["attack", None]["where"] == {"—": 2}  # no host recorded


def test_cell_times_say_where_cells_ran(tmp_path):
    rows = make_rows()
    avx512 = {"cpu_capability": "AVX512", "threads": 2, "device": "auto"}
    for row, host, precision in zip(rows[3:6], [avx512, avx512, {**avx512, "cpu_capability": "AVX2"}],
                                    ["bf16", "bf16", "none"]):
        row["host"], row["metrics"]["precision"] = host, precision
    rows[6]["host"] = {"cpu_capability": "AVX2", "threads": 1, "device": "cuda:0"}
    t = {(x["kind"], x["defense"]): x for x in cell_times(rows)}
    assert t["defense", "nad"]["where"] == {"AVX512, 2 threads, bf16": 2, "AVX2, 2 threads, fp32": 1}
    assert t["defense", "finetune"]["where"] == {"cuda:0, 1 threads": 1, "—": 1}
    md = write_report(rows, tmp_path, figures=False)["md"].read_text()
    assert "| defense | nad | 3 | 20.0 s | 60.0 s | AVX512, 2 threads, bf16 (2); AVX2, 2 threads, fp32 (1) |" in md


def test_attack_training_table_lists_the_grids_own_trainings(tmp_path):
    """Trained attack cells get a row with their metrics' last loss, train acc and images/s ("—" where an
    older cell did not record them); zoo evaluations and failures get none."""
    rows = make_rows()
    for row, layout in zip(rows[:2], (False, True)):
        row["config"] = {"kind": "attack", "seed": 0, "train": {"channels_last": layout}}
    rows[0]["metrics"].update(train_seconds=150.0, precision="none", train_loss=1.5, train_acc=0.4,
                              train_images_per_s=1000.0)
    rows[1]["metrics"].update(train_seconds=200.0, precision="bf16")
    evaluation = cell("attack", "trojan", metrics={**BEFORE_BADNETS})
    evaluation["config"] = {"kind": "evaluate"}
    runs = training_runs(rows + [evaluation])
    assert [(r["attack"], r["seed"], r["precision"], r["channels_last"]) for r in runs] == [
        ("badnets", 0, "fp32", False), ("blend", 0, "bf16", True)]
    assert (runs[0]["loss"], runs[0]["train_acc"], runs[0]["images_per_s"]) == (1.5, 0.4, 1000.0)
    assert (runs[1]["loss"], runs[1]["train_acc"], runs[1]["images_per_s"]) == (None, None, None)
    md = write_report(rows, tmp_path / "report", figures=False)["md"].read_text()
    assert "| badnets | 0 | fp32 | no | 2 | 1.5000 | 0.4000 | 1000 | 2.5 min | — |" in md
    assert "| blend | 0 | bf16 | yes | 2 | — | — | — | 3.3 min | — |" in md
    assert "## Attack training" not in write_report(make_rows(), tmp_path / "none", figures=False)["md"].read_text()


def test_defense_diagnostics_are_averaged_per_defense_and_reported(tmp_path):
    """metrics["diagnostics"] (ABL's isolation precision, ANP's pruned channels) become a table of mean ± sd
    per (attack, defense, name) over the done cells; cells without them, and unfinished ones, add nothing."""
    rows = make_rows()
    for seed, precision, pruned in ((0, 1.0, 50), (1, 0.5, 54), (2, 0.0, None)):
        row = defended("badnets", "abl", seed, BEFORE_BADNETS, 0.70, 0.01)
        row["metrics"]["diagnostics"] = {"isolation_precision": precision, **({"pruned": pruned} if pruned else {})}
        rows.append(row)
    rows.append(cell("defense", "badnets", "abl", 3, status="failed", error="RuntimeError: x"))
    got = {(d["defense"], d["name"]): (d["n"], d["mean"], d["sd"]) for d in diagnostics(rows)}
    assert got == {("abl", "isolation_precision"): (3, 0.5, 0.5), ("abl", "pruned"): (2, 52.0, pytest.approx(8 ** 0.5))}
    md = write_report(rows, tmp_path / "report", figures=False)["md"].read_text()
    assert "| badnets | 5 % clean data | abl | isolation_precision | 3 | 0.5 ± 0.5 |" in md
    assert "| badnets | 5 % clean data | abl | pruned | 2 | 52 ± 2.828 |" in md
    assert "## Defense diagnostics" not in write_report(make_rows(), tmp_path / "none", figures=False)["md"].read_text()


# ---- report --------------------------------------------------------------------------------------

TABLE_ID = "results-cifar10-wrn-16-1-cf5pct"


def _png_file(path, colour):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2, 1))
    fig.add_subplot().imshow([[0, 1], [1, 0]], cmap=colour)
    fig.savefig(path, format="png")


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    """A report with figures: history.csv with per-epoch ACC/ASR for nad seed 0 (finetune's has loss only),
    a trigger.png in the badnets attack folder and an attention.png in nad seed 0's."""
    base = tmp_path_factory.mktemp("grid")
    dirs = {name: base / "cells" / name for name in ("attack", "nad0", "ft0")}
    for d in dirs.values():
        d.mkdir(parents=True)
    (dirs["nad0"] / "history.csv").write_text(
        "epoch,lr,loss,train_acc,acc,acc_nontarget,asr,ra\n"
        "1,0.01,1.2,0.6,0.70,0.70,0.50,0.40\n2,0.01,0.9,0.7,0.78,0.78,0.10,0.60\n3,0.01,0.8,0.8,0.80,0.80,0.02,0.70\n")
    (dirs["ft0"] / "history.csv").write_text("epoch,lr,loss,train_acc\n1,0.01,1.0,0.5\n")
    _png_file(dirs["attack"] / "trigger.png", "gray")
    _png_file(dirs["nad0"] / "attention.png", "jet")
    (dirs["ft0"] / "attention.png").write_text("not a png")  # ignored: not a PNG
    rows = make_rows({k: v for k, v in dirs.items()})
    return rows, write_report(rows, base / "report", invocations=INVOCATIONS, title="tiny grid")


def test_report_files(tmp_path):
    paths = write_report(make_rows(), tmp_path, invocations=INVOCATIONS, figures=False)
    assert set(paths) == {"html", "md", "csv"} and all(p.is_file() for p in paths.values())
    md = paths["md"].read_text()
    assert "## cifar10 / wrn-16-1 / 5 % clean data" in md
    assert "| badnets | nad | 3 | 82.00 ± 2.00 | 8.00 ± 2.00 | 4.00 ± 2.00 | 70.00 ± 0.00 | 94.00 ± 0.00 | — | — |" in md
    assert "| badnets | sage | 1 | 83.00 | 7.00 | — | 70.00 | — | — | — | +3.00 | — | 1 done, 2 missing |" in md
    assert "+5.00 ± 0.00 | +37.00 ± 15.56 | 2 done, 1 failed: RuntimeError: out of memory |" in md
    assert "0 done, 1 failed: RuntimeError: wanet warp \\| broke" in md  # a pipe cannot split the row
    assert "| wanet | nad | 0 |" in md and "0 done, 1 missing" in md
    assert "## Wall time per cell kind" in md and "| attack | — | 2 | 3.3 min | 6.7 min | — |" in md
    assert "spec `tiny`" in md and "backdoor-eraser bench tiny.yaml --out runs/tiny" in md


def test_csv_holds_the_exact_numbers(tmp_path):
    rows = make_rows()
    paths = write_report(rows, tmp_path, figures=False)
    with open(paths["csv"], newline="") as fh:
        got = {(r["attack"], r["defense"]): r for r in csv.DictReader(fh)}
    want = by_name(summarize(rows))
    assert list(got) == list(want)
    for key, g in want.items():
        for col in ("acc_mean", "acc_sd", "asr_mean", "der_mean", "d_asr_mean"):
            assert got[key][col] == ("" if g[col] is None else repr(g[col]))
    nad = got["badnets", "nad"]
    assert float(nad["acc_mean"]) == pytest.approx(0.82) and nad["seeds"] == "[0, 1, 2]" and nad["n"] == "3"
    assert got["badnets", "finetune"]["errors"] == '["RuntimeError: out of memory"]'


def test_html_tables_marks_and_no_external_resources(tmp_path):
    page = write_report(make_rows(), tmp_path, invocations=INVOCATIONS, figures=False)["html"].read_text()
    assert f'<table id="{TABLE_ID}">' in page and '<section id="results-cifar10-wrn-16-1">' in page
    assert '<table id="wall-time">' in page
    assert '<tr class="failed"><td class="text">badnets</td><td class="text">finetune</td>' in page
    assert '<tr class="missing"><td class="text">badnets</td><td class="text">sage</td>' in page
    assert '<tr class="backdoored failed"><td class="text">wanet</td>' in page
    assert "82.00 ± 2.00" in page
    assert "# &lt;b&gt;not bold&lt;/b&gt;" in page and "<b>not bold" not in page  # spec text escaped
    _assert_self_contained(page)
    assert "<img" not in page  # figures=False and no pictures in these rows


def _assert_self_contained(page):
    assert "http://" not in page and "https://" not in page
    assert not re.search(r'src="(?!data:image/png;base64,)', page)
    assert "<link" not in page and "<script" not in page


def test_report_is_reproducible(tmp_path):
    a = write_report(make_rows(), tmp_path / "a", invocations=INVOCATIONS, figures=False)
    b = write_report(make_rows(), tmp_path / "b", invocations=INVOCATIONS, figures=False)
    for kind in ("md", "csv", "html"):
        assert a[kind].read_bytes() == b[kind].read_bytes()


def test_html_figures_are_inline_pngs(full_report):
    rows, paths = full_report
    page = paths["html"].read_text()
    _assert_self_contained(page)
    kinds = re.findall(r'<figure class="(\w+)"><img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    # scatters for badnets and blend (wanet has no done cell), curves for badnets (nad seed 0 only),
    # the trigger picture and nad's attention map (finetune's "attention.png" is not a PNG)
    assert sorted(k for k, _ in kinds) == ["curves", "picture", "picture", "scatter", "scatter"]
    assert all(base64.b64decode(data).startswith(b"\x89PNG\r\n\x1a\n") for _, data in kinds)
    assert page.count("<img") == 5
    assert "per-epoch metrics of nad seed 0" in page
    nad0 = next(r for r in rows if r["axes"]["defense"] == "nad" and r["axes"]["seed"] == 0)
    assert f"defense cell {nad0['hash'][:12]} (cifar10 / wrn-16-1 / badnets / nad / seed 0 / 5 % clean data): attention.png" in page
    assert f"attack cell {rows[0]['hash'][:12]} (cifar10 / wrn-16-1 / badnets): trigger.png" in page


def test_neural_cleanse_masks_are_report_pictures(tmp_path):
    from backdoor_eraser.grid.report import pictures

    det = tmp_path / "detect"
    det.mkdir()
    _png_file(det / "masks.png", "gray")
    (det / "other.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # not one of the report's pictures
    rows = make_rows()
    detect = cell("detect", "badnets", "neural-cleanse", 0, metrics={"mad_index": 4.0}, run_dir=det)
    assert [caption.split(": ")[-1] for caption, _ in pictures(rows + [detect])] == ["masks.png"]


def test_screenshot_without_chromium(tmp_path, monkeypatch):
    from backdoor_eraser.grid import report

    monkeypatch.setattr(report, "find_chromium", lambda: None)
    with pytest.raises(RuntimeError, match="chromium is not installed"):
        screenshot(tmp_path / "x.html", tmp_path / "x.png")


def test_headless_browser_renders_the_report(full_report, tmp_path):
    if find_chromium() is None:
        pytest.skip("chromium not installed (no `chromium` on PATH nor /usr/bin/chromium); "
                    "apt-get install chromium to run this check")
    from PIL import Image

    _, paths = full_report
    png = screenshot(paths["html"], tmp_path / "shot.png", width=1200, height=1600)
    assert png.stat().st_size > 10_000
    with Image.open(png) as img:
        assert img.size == (1200, 1600)
        assert img.convert("RGB").getcolors(1) is None  # more than one colour: something was drawn
    dom = dump_dom(paths["html"])
    assert f'<table id="{TABLE_ID}">' in dom and "82.00 ± 2.00" in dom and 'id="wall-time"' in dom


def test_validation_columns_are_aggregated_and_reported(tmp_path):
    """The val columns (training images outside the clean subset) are means over seeds of the cells'
    ``val`` metrics; cells without them leave the columns empty."""
    before = {**BEFORE_BADNETS, "val": {"acc": 0.95, "asr": 1.0}}
    rows = [defended("badnets", "nad", s, before, 0.8, 0.02) for s in range(3)]
    for row, (acc, asr) in zip(rows, ((0.90, 0.02), (0.92, 0.04), (0.94, 0.06))):
        row["metrics"]["val"] = {"acc": acc, "asr": asr}
    rows.append(defended("badnets", "finetune", 0, BEFORE_BADNETS, 0.85, 0.5))
    g = by_name(summarize(rows))
    assert g["badnets", "nad"]["val_acc_drop_mean"] == pytest.approx(0.03)
    assert g["badnets", "nad"]["val_acc_drop_sd"] == pytest.approx(0.02)
    assert g["badnets", "nad"]["val_asr_mean"] == pytest.approx(0.04)
    assert g["badnets", "backdoored"]["val_asr_mean"] == pytest.approx(1.0)
    assert g["badnets", "finetune"]["val_acc_drop_mean"] is None
    md = write_report(rows, tmp_path, figures=False)["md"].read_text()
    assert "| val ACC drop | val ASR |" in md
    assert ("| badnets | nad | 3 | 80.00 ± 0.00 | 10.00 ± 0.00 | 2.00 ± 0.00 | 70.00 ± 0.00 | 94.00 ± 0.00 "
            "| 3.00 ± 2.00 | 4.00 ± 2.00 |") in md
