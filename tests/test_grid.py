"""The benchmark grid: spec parsing and expansion, the store, resume after SIGKILL, two workers, reuse
of attack cells, failed cells, the CLI's bad-input lines."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from backdoor_eraser.cli import main
from backdoor_eraser.errors import UserError
from backdoor_eraser.grid.spec import expand, load_spec, parse_only, parse_spec
from backdoor_eraser.grid.store import Store

# A grid small enough for CI: 400 synthetic images, WRN-10-1, a few epochs.
TINY = """
name: tiny
datasets:
  - {name: synthetic, options: {n_train: 400, n_test: 200}}
archs: [wrn-10-1]
attacks:
  - badnets
defenses:
  - {name: finetune, epochs_budget: 1}
  - {name: nad, epochs_budget: 1}
seeds: [0, 1]
clean_fractions: [0.25]
attack_train: {epochs: 3, batch_size: 32, lr: 0.05, schedule: constant, augment: none}
settings: {epoch_eval: false, figures: false}
"""


def write_spec(tmp_path: Path, text: str = TINY, name: str = "tiny.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_expansion_counts_cells_and_hashes_are_stable_across_runs_and_key_order():
    cells = expand(parse_spec(TINY))
    assert [c.kind for c in cells] == ["attack"] + ["defense"] * 4
    assert len({c.hash for c in cells}) == 5
    # Every defense cell depends on the one attack cell.
    assert all(c.deps == [cells[0].hash] for c in cells[1:])
    # Same spec with its keys in another order: same hashes.
    reordered = TINY.replace("{epochs: 3, batch_size: 32, lr: 0.05, schedule: constant, augment: none}",
                             "{augment: none, schedule: constant, lr: 0.05, batch_size: 32, epochs: 3}")
    assert reordered != TINY
    assert [c.hash for c in expand(parse_spec(reordered))] == [c.hash for c in cells]
    # A changed parameter changes the attack cell and, through it, every defense cell.
    changed = expand(parse_spec(TINY.replace("  - badnets", "  - {name: badnets, params: {rate: 0.2}}")))
    assert not {c.hash for c in changed} & {c.hash for c in cells}
    # Axes: defense cells carry attack, defense, seed and clean fraction.
    assert cells[2].axes == {"dataset": "synthetic", "arch": "wrn-10-1", "attack": "badnets",
                             "defense": "finetune", "seed": 1, "clean_fraction": 0.25}
    # The defense's seed reaches its training as well as the clean subset.
    assert cells[2].config["defense"]["config"]["seed"] == 1 and cells[2].config["seed"] == 1


def test_only_restricts_axes_and_rejects_values_not_in_the_spec():
    spec = parse_spec(TINY).filtered(parse_only(["defense=nad", "seed=1"]))
    cells = expand(spec)
    assert [(c.axes["defense"], c.axes["seed"]) for c in cells] == [(None, None), ("nad", 1)]
    with pytest.raises(UserError, match="sage not in the spec; its values: finetune, nad"):
        parse_spec(TINY).filtered(parse_only(["defense=sage"]))
    with pytest.raises(UserError, match="unknown axis 'method'"):
        parse_spec(TINY).filtered(parse_only(["method=nad"]))
    with pytest.raises(UserError, match="AXIS=V1,V2"):
        parse_only(["defense"])


@pytest.mark.parametrize("old,new,message", [
    ("archs:", "arch:", "unknown key 'arch'; keys: name,"),
    ("seeds: [0, 1]", "seeds: [0, one]", "seeds: 'one' is not a non-negative integer"),
    ("seeds: [0, 1]", "seeds: []", "key 'seeds' is an empty list"),
    ("seeds: [0, 1]", "seeds: 3", "key 'seeds' must be a list"),
    ("  - badnets", "  - badnet", "unknown attack 'badnet'; known: badnets, blend"),
    ("{name: nad, epochs_budget: 1}", "{name: nadd}", "unknown defense 'nadd'; known: "),
    ("{name: nad, epochs_budget: 1}", "{name: nad, params: {epochs: ten}}", "parameter 'epochs' must be an integer, got 'ten'"),
    ("{name: nad, epochs_budget: 1}", "{name: nad, params: {betta: 1}}", "has no parameter 'betta'"),
    ("{name: nad, epochs_budget: 1}", "{name: nad, epochs_budget: 0}", "epochs_budget 0 is not a positive integer"),
    ("archs: [wrn-10-1]", "archs: [resnet-9000]", "unknown architecture 'resnet-9000'"),
    ("{name: synthetic, options: {n_train: 400, n_test: 200}}", "{name: imagenet}", "unknown dataset 'imagenet'"),
    ("epochs: 3,", "epochs: -3,", "epochs must be ≥ 0"),
    ("lr: 0.05,", "lr: fast,", "parameter 'lr' must be a number, got 'fast'"),
    ("settings: {epoch_eval: false, figures: false}", "settings: {epoch_evaluation: false}", "has no parameter 'epoch_evaluation'"),
    ("clean_fractions: [0.25]", "clean_fractions: [25]", "25 is not a number in (0, 1]"),
    ("name: tiny", "name: ''", "key 'name' must be a non-empty string"),
    ("  - {name: finetune, epochs_budget: 1}\n", "  - {name: finetune, epochs_budget: 1}\n  - finetune\n",
     "label 'finetune' is used twice"),
])
def test_bad_spec_is_one_line_naming_the_key_and_the_file(tmp_path, capsys, old, new, message):
    assert old in TINY
    path = write_spec(tmp_path, TINY.replace(old, new))
    assert main(["bench", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {path}: ") and message in err, err
    assert not (tmp_path / "out" / "grid.sqlite").exists()  # nothing was set up


def test_bad_yaml_and_missing_spec(tmp_path, capsys):
    path = write_spec(tmp_path, "name: [unclosed")
    assert main(["bench", str(path)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    assert main(["bench", "no-such-spec"]) == 2
    err = capsys.readouterr().err
    assert "no built-in spec or file 'no-such-spec'" in err and "nad-table1" in err and "smoke" in err
    assert main(["bench", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_missing_data_dir_is_reported_before_anything_runs(tmp_path, capsys):
    assert main(["bench", "nad-table1", "--out", str(tmp_path / "out")]) == 2
    assert "dataset 'cifar10' needs a data folder: pass --data-dir" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_builtin_specs_parse_and_list(capsys):
    assert main(["bench", "--list"]) == 0
    out = capsys.readouterr().out
    for name in ("smoke", "nad-table1", "argd-table1", "sage-table"):
        assert f"{name}: " in out
    spec = load_spec("nad-table1")
    assert [a.label for a in spec.attacks] == ["badnets", "trojan", "blend", "blend-nad", "sig", "clean-label",
                                                   "refool-poisoned", "wanet"]
    assert spec.seeds == [0, 1, 2] and spec.clean_fractions == [0.05]
    assert len(expand(spec)) == 8 + 8 * 14 * 3
    assert {"nad-release", "nad-no-cutout", "finetune-release", "finetune-no-cutout", "nad-short",
            "finetune-short"} <= {d.label for d in spec.defenses}


def test_attack_cell_is_shared_by_defense_cells_and_across_specs(tmp_path):
    a = expand(parse_spec(TINY))
    b = expand(parse_spec(TINY.replace("name: tiny", "name: other").replace("seeds: [0, 1]", "seeds: [5]")))
    assert a[0].hash == b[0].hash
    store = Store(tmp_path)
    assert store.add("tiny", a, lambda c: tmp_path / c.hash) == {c.hash for c in a}
    # its attack cell exists already
    assert store.add("other", b, lambda c: tmp_path / c.hash) == {c.hash for c in b[1:]}
    n = store.db.execute("SELECT COUNT(*) FROM cells WHERE kind = 'attack'").fetchone()[0]
    assert n == 1 and len(store.rows("other")) == 3 and len(store.rows()) == 7


def test_claim_follows_dependencies_and_takes_over_a_dead_workers_cell(tmp_path):
    cells = expand(parse_spec(TINY))
    store = Store(tmp_path)
    store.add("tiny", cells, lambda c: tmp_path / c.hash)
    first = store.claim("tiny", "elsewhere:1")
    assert first["hash"] == cells[0].hash and first["status"] == "running"
    # A live worker on another host holds the attack cell: nothing else can run yet.
    assert store.claim("tiny", "me:2") is None
    # A worker of this host whose process is gone: its cell is taken over.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket
    store.db.execute("UPDATE cells SET worker = ? WHERE hash = ?", (f"{socket.gethostname()}:{dead.pid}", first["hash"]))
    again = store.claim("tiny", "me:2")
    assert again["hash"] == first["hash"] and again["attempts"] == 2
    assert store.finish(again["hash"], {"acc": 1.0}, wall_seconds=1.0, steps=3, host={}, code_version="x",
                        worker="me:2")
    # The old worker cannot record a result for a cell it lost.
    assert not store.finish(again["hash"], {"acc": 0.0}, wall_seconds=1.0, steps=3, host={}, code_version="x",
                            worker="elsewhere:1")
    nxt = store.claim("tiny", "me:2")
    assert nxt["hash"] == cells[1].hash
    store.fail(nxt["hash"], "boom", worker="me:2")
    assert store.counts("tiny") == {"pending": 3, "running": 0, "done": 1, "failed": 1}
    assert store.retry_failed("tiny") == 1


def test_failed_attack_cell_fails_its_defense_cells(tmp_path):
    cells = expand(parse_spec(TINY))
    store = Store(tmp_path)
    store.add("tiny", cells, lambda c: tmp_path / c.hash)
    row = store.claim("tiny", "me:1")
    store.fail(row["hash"], "bad data", worker="me:1")
    assert store.claim("tiny", "me:1") is None
    rows = store.rows("tiny")
    assert [r["status"] for r in rows] == ["failed"] * 5
    assert all("attack model it needs" in r["error"] for r in rows[1:])


def test_store_of_another_schema_is_refused(tmp_path):
    Store(tmp_path).close()
    db = sqlite3.connect(tmp_path / "grid.sqlite")
    db.execute("UPDATE info SET value = '99' WHERE key = 'schema_version'")
    db.commit()
    db.close()
    with pytest.raises(UserError, match="store schema 99; this version reads schema 1"):
        Store(tmp_path)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "grid.sqlite").write_text("not a database at all" * 100)
    with pytest.raises(UserError, match="not a usable grid store"):
        Store(tmp_path / "junk")


def _bench(spec: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "backdoor_eraser.cli", "bench", str(spec), "--out", str(out),
                             "--device", "cpu", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)


def _rows(out: Path) -> list[dict]:
    store = Store(out, create=False)
    try:
        return store.rows("tiny")
    finally:
        store.close()


@pytest.mark.slow
def test_grid_resumes_after_sigkill_mid_cell_without_lost_or_duplicated_rows(tmp_path):
    # A longer attack cell, so the kill lands between its epoch checkpoints.
    spec = write_spec(tmp_path, TINY.replace("epochs: 3,", "epochs: 8,"))
    out = tmp_path / "grid"
    proc = _bench(spec, out)
    ckpt = None
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        found = list((out / "cells" / "attack").glob("*/checkpoint.pt")) if (out / "cells").exists() else []
        if found:
            ckpt = found[0]
            break
        time.sleep(0.2)
    assert ckpt is not None, proc.communicate()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rows = _rows(out)
    assert rows[0]["status"] == "running" and all(r["status"] == "pending" for r in rows[1:])

    proc = _bench(spec, out)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    rows = _rows(out)
    assert len(rows) == 5 and len({r["hash"] for r in rows}) == 5
    assert [r["status"] for r in rows] == ["done"] * 5
    assert rows[0]["attempts"] == 2 and all(r["attempts"] == 1 for r in rows[1:])
    # The attack cell resumed from its checkpoint rather than starting over, and ended where an
    # uninterrupted run ends.
    assert "badnets: resuming from its checkpoint" in stderr
    assert rows[0]["metrics"]["epochs"] == 8
    plain = _bench(spec, tmp_path / "plain", "--only", "defense=finetune", "seed=0", "--no-report")
    _, err2 = plain.communicate(timeout=600)
    assert plain.returncode == 0, err2
    ref = _rows(tmp_path / "plain")[0]
    assert ref["hash"] == rows[0]["hash"]
    assert (Path(ref["run_dir"]) / "model.safetensors").read_bytes() == \
        (Path(rows[0]["run_dir"]) / "model.safetensors").read_bytes()
    assert ref["metrics"]["acc"] == rows[0]["metrics"]["acc"] and ref["metrics"]["asr"] == rows[0]["metrics"]["asr"]
    assert "[5/5] defense badnets · nad · seed 1" in stderr
    assert (out / "report.html").is_file() and "| badnets | nad |" in (out / "results.md").read_text()
    # Running it again does nothing and adds no rows.
    proc = _bench(spec, out, "--no-report")
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "5 done, 0 failed, 0 to run (0 new)" in stderr
    assert len(_rows(out)) == 5


@pytest.mark.slow
def test_two_workers_share_one_store_and_run_each_cell_once(tmp_path):
    spec = write_spec(tmp_path)
    out = tmp_path / "grid"
    proc = _bench(spec, out, "--workers", "2", "--no-report")
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    rows = _rows(out)
    assert [r["status"] for r in rows] == ["done"] * 5
    assert all(r["attempts"] == 1 for r in rows)
    assert len({r["worker"] for r in rows[1:]}) >= 1
    assert stderr.count("] defense ") == 4 and stderr.count("] attack ") == 1


@pytest.mark.slow
def test_a_failing_cell_is_recorded_and_the_grid_goes_on(tmp_path):
    # NAD with 2 betas for WRN's 3 attention sites fails; fine-tuning still runs.
    spec = write_spec(tmp_path, TINY.replace("{name: nad, epochs_budget: 1}",
                                             "{name: nad, epochs_budget: 1, params: {beta: [1, 2]}}"))
    out = tmp_path / "grid"
    proc = _bench(spec, out)
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 1, stderr
    rows = _rows(out)
    status = {(r["axes"]["defense"], r["axes"]["seed"]): r for r in rows}
    assert status[("finetune", 0)]["status"] == "done" and status[("finetune", 1)]["status"] == "done"
    assert status[("nad", 0)]["status"] == "failed" and "beta" in status[("nad", 0)]["error"]
    assert "FAILED: " in stderr and "Traceback" not in stderr
    md = (out / "results.md").read_text()
    assert "failed" in md


def test_ray_executor_on_a_local_ray(tmp_path):
    pytest.importorskip("ray", reason="Ray is optional (pip install 'backdoor-eraser[ray]')")
    spec = write_spec(tmp_path)
    out = tmp_path / "grid"
    assert main(["bench", str(spec), "--out", str(out), "--executor", "ray", "--device", "cpu", "--no-report"]) == 0
    assert [r["status"] for r in _rows(out)] == ["done"] * 5


ZOO = Path(__file__).resolve().parents[1] / "zoo" / "fragile"


@pytest.mark.skipif(not (ZOO / "badnets").is_dir(), reason="no zoo in this checkout")
def test_existing_models_get_an_evaluation_cell_and_are_pinned_by_their_sha256(tmp_path):
    import shutil

    from backdoor_eraser.grid.runner import _model_folder

    zoo = tmp_path / "zoo"
    shutil.copytree(ZOO / "badnets", zoo / "badnets")
    text = TINY.replace("  - {name: synthetic, options: {n_train: 400, n_test: 200}}", "  - cifar10").replace(
        "archs: [wrn-10-1]", "archs: [wrn-16-1]").replace("  - badnets", "  - {name: badnets, zoo: badnets}")
    text += "detectors: [{name: neural-cleanse, params: {epochs: 2}}]\n"
    cells = expand(parse_spec(text), zoo=zoo)
    kinds = [(c.kind, c.config["kind"]) for c in cells]
    assert kinds == [("attack", "evaluate")] + [("defense", "defense")] * 4 + [("detect", "detect")] * 2
    ref = cells[1].config["model"]
    assert ref["run"] == str((zoo / "badnets").resolve()) and len(ref["sha256"]) == 64
    assert cells[1].deps == [] and cells[-1].config["detector"]["config"]["epochs"] == 2
    # Without the zoo folder the same entry trains its model as a cell.
    assert expand(parse_spec(text), zoo=tmp_path / "empty")[0].config["kind"] == "attack"
    assert _model_folder(ref, {}) == zoo / "badnets"
    with open(zoo / "badnets" / "model.safetensors", "r+b") as fh:
        fh.seek(-4, 2)
        fh.write(b"\0\0\0\1")
    with pytest.raises(UserError, match="changed since the grid was set up"):
        _model_folder(ref, {})
    # A folder made by another attack is refused at expansion.
    shutil.copytree(ZOO / "blend", zoo / "wrong")
    with pytest.raises(UserError, match="was made by attack 'blend', not 'badnets'"):
        expand(parse_spec(text.replace("zoo: badnets", "zoo: wrong")), zoo=zoo)


def test_report_of_a_folder_without_a_store_is_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds no grid store" in err


def test_only_runs_its_own_cells_while_the_report_keeps_the_whole_spec(tmp_path, capsys):
    spec = write_spec(tmp_path, TINY.replace("seeds: [0, 1]", "seeds: [0, 1, 2]"))
    out = tmp_path / "grid"
    assert main(["bench", str(spec), "--out", str(out), "--device", "cpu", "--only", "defense=finetune", "seed=0"]) == 0
    status = {(r["axes"].get("defense"), r["axes"].get("seed")): r["status"] for r in _rows(out)}
    assert len(status) == 7  # every cell of the spec is a member, whatever --only ran
    assert status.pop((None, None)) == "done" and status.pop(("finetune", 0)) == "done"
    assert set(status.values()) == {"pending"}
    md = (out / "results.md").read_text()
    assert "| badnets | nad | 0 |" in md and "0 done, 3 missing" in md and "1 done, 2 missing" in md
    assert "--only: 2 of the spec's 7 cells run" in capsys.readouterr().err

    # A second --only runs its cells and leaves the first one's rows (and the cells neither chose) alone.
    assert main(["bench", str(spec), "--out", str(out), "--device", "cpu", "--only", "defense=nad", "seed=1"]) == 0
    err = capsys.readouterr().err
    assert "[1/2] attack badnets" not in err and "[2/2] defense badnets · nad · seed 1" in err
    status = {(r["axes"].get("defense"), r["axes"].get("seed")): r["status"] for r in _rows(out)}
    assert [k for k, v in status.items() if v == "done"] == [(None, None), ("finetune", 0), ("nad", 1)]
    assert "1 done, 2 missing" in (out / "results.md").read_text()
    # --dry-run with --only counts only the cells it would run.
    assert main(["bench", str(spec), "--out", str(out), "--device", "cpu", "--only", "seed=2", "--dry-run"]) == 0
    assert "2 to run (0 new)" in capsys.readouterr().err


def test_rows_stored_under_an_older_identity_of_the_same_cell_are_adopted(tmp_path):
    from backdoor_eraser.grid.spec import Cell, cell_hash, config_hash

    d = expand(parse_spec(TINY))[1]
    here = {**d.config, "model": {"run": "/new/place/badnets", "sha256": "ab" * 32}}
    cell = Cell("defense", here, d.axes, [])
    # As earlier versions stored it: the model folder's path was hashed, and the defense config carried
    # the auto-lr fields at their defaults before they became neutral.
    lr_fields = {"auto_lr": False, "lr_factors": [1.0, 0.5, 0.2, 0.1, 0.05], "lr_tolerance": 0.05, "lr_held_out": 0.2}
    old = {**here, "model": {"run": "/old/place/badnets", "sha256": "ab" * 32},
           "defense": {**here["defense"], "config": {**here["defense"]["config"], **lr_fields}}}
    other = json.loads(json.dumps(old))
    other["defense"]["config"]["auto_lr"] = True          # a different cell: must stay apart
    assert cell_hash(old) == cell.hash and cell_hash(other) != cell.hash and config_hash(old) != cell.hash
    store = Store(tmp_path)
    for cfg, acc in ((old, 0.5), (other, 0.7)):
        store.db.execute("INSERT INTO cells (hash, kind, config, deps, run_dir, status, metrics) VALUES "
                         "(?, 'defense', ?, '[]', ?, 'done', ?)", (config_hash(cfg), json.dumps(cfg), str(tmp_path / "x"),
                                                                   json.dumps({"acc": acc})))
    assert store.add("tiny", [cell], lambda c: tmp_path / c.hash) == set()
    (row,) = store.rows("tiny")
    assert row["hash"] == cell.hash and row["status"] == "done" and row["metrics"] == {"acc": 0.5}
    assert row["config"]["model"]["run"] == "/new/place/badnets"   # where the model is now
    assert store.db.execute("SELECT COUNT(*) FROM cells").fetchone()[0] == 2


def test_cells_not_yet_run_take_the_current_model_path_and_grid_folder(tmp_path):
    """A store copied from another checkout holds pending cells whose model path and run folder are
    gone; they run with today's. Done cells keep the record of what ran, and a failed cell keeps the
    folder that holds its partial run."""
    from backdoor_eraser.grid.spec import Cell

    d = expand(parse_spec(TINY))[1]
    now = {**d.config, "model": {"run": str(tmp_path / "zoo" / "badnets"), "sha256": "ab" * 32}}
    then = {**now, "model": {"run": "/gone/badnets", "sha256": "ab" * 32}}
    seeds = [Cell("defense", {**then, "seed": s}, {**d.axes, "seed": s}, []) for s in (0, 1, 2)]
    store = Store(tmp_path)
    partial = tmp_path / "old-grid" / "partial"
    partial.mkdir(parents=True)
    for cell, status, run_dir in zip(seeds, ("pending", "done", "failed"),
                                     ("/gone/grid/a", "/gone/grid/b", str(partial))):
        store.db.execute("INSERT INTO cells (hash, kind, config, deps, run_dir, status) VALUES (?, 'defense', ?, '[]', ?, ?)",
                         (cell.hash, json.dumps(cell.config), run_dir, status))
    current = [Cell("defense", {**now, "seed": s}, {**d.axes, "seed": s}, []) for s in (0, 1, 2)]
    assert [c.hash for c in current] == [c.hash for c in seeds]
    assert store.add("tiny", current, lambda c: tmp_path / "grid" / c.hash) == set()
    rows = {r["axes"]["seed"]: r for r in store.rows("tiny")}
    assert rows[0]["config"]["model"]["run"] == now["model"]["run"]
    assert rows[0]["run_dir"] == str(tmp_path / "grid" / current[0].hash)
    assert rows[1]["config"]["model"]["run"] == "/gone/badnets" and rows[1]["run_dir"] == "/gone/grid/b"
    assert rows[2]["config"]["model"]["run"] == now["model"]["run"] and rows[2]["run_dir"] == str(partial)


def test_a_default_spelt_out_in_the_spec_names_the_same_cell():
    plain = expand(parse_spec(TINY))
    spelt = expand(parse_spec(TINY.replace("{name: nad, epochs_budget: 1}",
                                           "{name: nad, epochs_budget: 1, params: {lr: 0.1, kd_epochs: 40}}")))
    assert spelt[3].config["defense"]["params"] != plain[3].config["defense"]["params"]
    assert [c.hash for c in spelt] == [c.hash for c in plain]
    other = expand(parse_spec(TINY.replace("{name: nad, epochs_budget: 1}", "{name: nad, epochs_budget: 1, params: {lr: 0.05}}")))
    assert other[3].hash != plain[3].hash and other[1].hash == plain[1].hash


def test_a_preset_that_spells_out_a_recipe_names_the_same_cell_as_the_recipe():
    """A cell stored when a recipe was the default keeps its results once a preset pins that recipe."""
    short = expand(parse_spec(TINY.replace("{name: nad, epochs_budget: 1}", "{name: nad, preset: short}")))
    spelt = expand(parse_spec(TINY.replace("{name: nad, epochs_budget: 1}", "{name: nad, params: {schedule: step, "
                                           "step_size: 2, gamma: 0.1, kd_epochs: 0}}")))
    default = expand(parse_spec(TINY.replace("{name: nad, epochs_budget: 1}", "{name: nad}")))
    named = expand(parse_spec(TINY.replace("{name: nad, epochs_budget: 1}", "{name: nad, preset: erase-recover}")))
    assert short[3].config["defense"]["preset"] == "short" and spelt[3].config["defense"]["preset"] is None
    assert short[3].hash == spelt[3].hash != default[3].hash == named[3].hash


def test_two_rows_of_one_recipe_are_refused():
    twins = TINY.replace("{name: nad, epochs_budget: 1}", "nad\n  - {name: nad, label: nad-er, preset: erase-recover}")
    with pytest.raises(UserError, match="defenses 'nad' and 'nad-er' are the same recipe"):
        expand(parse_spec(twins))


SPECS = sorted((Path(__file__).resolve().parents[1] / "benchmarks" / "specs").glob("*.yaml"))


@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_committed_benchmark_specs_parse(path):
    """A typo in a committed spec (an unknown defense, preset or key), or two rows of one recipe, fails
    here, not hours into a run."""
    spec = load_spec(str(path))
    assert spec.name == path.stem and spec.attacks and spec.seeds
    assert expand(spec)


def test_a_cells_attention_figure_shows_the_first_triggered_test_image(tmp_path, monkeypatch):
    import torch

    from backdoor_eraser import viz, workflows
    from backdoor_eraser.grid.runner import _attention
    from backdoor_eraser.training import TrainConfig

    splits = workflows.load_data("synthetic", None, {"n_train": 100, "n_test": 100})
    run = tmp_path / "badnets"
    workflows.run_attack(dataset="synthetic", data_dir=None, arch="wrn-10-1", attack="badnets", out=run,
                         train=TrainConfig(epochs=1, batch_size=50, augment="none"), splits=splits,
                         epoch_eval=False, quiet=True)
    drawn = {}
    monkeypatch.setattr(viz, "attention_figure", lambda models, image, out, title: drawn.update(
        models=sorted(models), image=image, out=out))
    _attention(run, run, splits, "nad")
    atk = workflows.attack_for(json.loads((run / "meta.json").read_text()), run, None, None)
    first = atk.triggered_test_set(splits.test).images[0]
    assert drawn["models"] == ["backdoored", "nad"] and drawn["out"] == run / "attention.png"
    assert torch.equal(drawn["image"], first) and drawn["image"][:, -3:, -3:].sum() > 0
