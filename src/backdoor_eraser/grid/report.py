"""Grid report: results.md, results.csv and one self-contained report.html (tables, ACC-vs-ASR scatters,
per-epoch curves, trigger and attention pictures, the commands and specs that made the grid)."""
from __future__ import annotations

import base64
import csv
import html
import io
import json
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path

from .aggregate import BACKDOORED, BLOCK_KEYS, cell_times, detections, diagnostics, summarize, training_runs

PICTURES = ("trigger.png", "attention.png", "masks.png")  # masks.png: Neural Cleanse's reversed triggers
CURVE_METRICS = ("acc", "asr", "ra")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MAX_ERROR_CHARS = 200

STYLE = """
body { font-family: system-ui, sans-serif; color: #222; max-width: 1150px; margin: 2em auto; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 1em 0; font-size: 14px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
td { white-space: nowrap; } th { background: #f0f0f0; }
td.text, th.text { text-align: left; white-space: normal; }
tr.backdoored td { background: #f7f7f7; font-style: italic; }
tr.failed td { background: #fde8e8; } tr.missing td { color: #777; }
figure { margin: 1em 0; } img { max-width: 100%; } figcaption { font-size: 13px; color: #555; }
pre { background: #f6f6f6; padding: .8em; white-space: pre-wrap; word-break: break-all; }
"""


# ---- formatting ----------------------------------------------------------------------------------

def pct(mean: float | None, sd: float | None = None, *, signed: bool = False) -> str:
    """A fraction as a percentage "82.10 ± 0.53" (no sd part when sd is None, "—" when mean is None)."""
    if mean is None:
        return "—"
    mean = mean if round(mean * 100, 2) else 0.0  # no "-0.00" from rounding noise
    text = f"{mean * 100:+.2f}" if signed else f"{mean * 100:.2f}"
    return text if sd is None else f"{text} ± {sd * 100:.2f}"


def seconds(s: float) -> str:
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def fraction_label(cf: float | None) -> str:
    return "no clean data" if cf is None else f"{cf * 100:g} % clean data"


def status(g: dict) -> str:
    """Empty for a fully done group, else e.g. "2 done, 1 failed: <error>, 1 missing"."""
    if not g["failed"] and not g["missing"]:
        return ""
    parts = [f"{g['n']} done"]
    if g["failed"]:
        errors = list(dict.fromkeys(e[:MAX_ERROR_CHARS] for e in g["errors"]))
        parts.append(f"{g['failed']} failed" + (": " + "; ".join(errors) if errors else ""))
    if g["missing"]:
        parts.append(f"{g['missing']} missing")
    return ", ".join(parts)


def row_classes(g: dict) -> list[str]:
    return [c for c, on in ((BACKDOORED, g["role"] == BACKDOORED), ("failed", g["failed"]),
                            ("missing", g["missing"])) if on]


TEXT_COLUMNS = {0, 1, 12}  # attack, defense, cells: left-aligned and free to wrap


def headers(reference: str) -> list[str]:
    return ["attack", "defense", "n", "ACC", "ACC drop", "ASR", "RA", "DER", "val ACC drop", "val ASR",
            f"Δ ACC vs {reference}", f"Δ ASR vs {reference}", "cells"]


def cells(g: dict) -> list[str]:
    """The table cells of one group, in the order of ``headers``."""
    d_note = "" if g["d_n"] is None or g["d_n"] == g["n"] else f" (n={g['d_n']})"
    paired = [pct(g[f"d_{m}_mean"], g[f"d_{m}_sd"], signed=True) for m in ("acc", "asr")]
    return ([g["attack"], g["defense"], str(g["n"])]
            + [pct(g[f"{m}_mean"], g[f"{m}_sd"]) for m in ("acc", "acc_drop", "asr", "ra", "der", "val_acc_drop", "val_asr")]
            + [p + d_note if p != "—" else p for p in paired] + [status(g)])


def tables(summary: list[dict]) -> dict[tuple, list[dict]]:
    """Groups per (dataset, arch, clean_fraction), in first-seen order."""
    out: dict[tuple, list[dict]] = {}
    for g in summary:
        out.setdefault((g["dataset"], g["arch"], g["clean_fraction"]), []).append(g)
    return out


def slug(*parts) -> str:
    return "-".join(re.sub(r"[^a-z0-9]+", "-", str(p).lower()).strip("-") for p in parts)


def table_id(dataset: str, arch: str, cf: float | None) -> str:
    return slug("results", dataset, arch, "all" if cf is None else f"cf{cf * 100:g}pct")


# ---- Markdown and CSV ----------------------------------------------------------------------------

def _md_cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _md_table(head: list[str], body: Iterable[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in body]
    return lines


def markdown(summary: list[dict], times: list[dict], invocations: Iterable[dict], title: str, reference: str,
             dets: list[dict] | None = None, training: list[dict] | None = None,
             diags: list[dict] | None = None) -> str:
    lines = [f"# {title}", "", "Mean ± sd over seeds, in %. ACC drop = backdoored ACC − ACC; "
             "DER = [max(0, ΔASR) − max(0, ΔACC) + 1] / 2 (BackdoorBench); "
             "val = the same on 2,000 training images outside the clean subset (what defaults are chosen on); "
             f"Δ = defense − {reference} over the seeds both finished.", ""]
    for (dataset, arch, cf), groups in tables(summary).items():
        lines += [f"## {dataset} / {arch} / {fraction_label(cf)}", ""]
        lines += _md_table(headers(reference), (cells(g) for g in groups)) + [""]
    if dets := detection_rows(dets):
        lines += ["## Detection", ""] + _md_table(DETECTION_HEAD, dets) + [""]
    if trained := training_rows(training):
        lines += ["## Attack training", ""] + _md_table(TRAINING_HEAD, trained) + [""]
    if diag := diagnostic_rows(diags):
        lines += ["## Defense diagnostics", ""] + _md_table(DIAGNOSTIC_HEAD, diag) + [""]
    lines += ["## Wall time per cell kind", ""]
    lines += _md_table(TIME_HEAD, _time_rows(times)) + [""]
    lines += ["## Made by", ""]
    for inv in invocations:
        lines += [f"spec `{inv.get('spec', '')}`" + (f", started {inv['started']}" if inv.get("started") else ""),
                  "", "```", inv.get("command", ""), "```", ""]
    return "\n".join(lines)


TIME_HEAD = ["kind", "defense", "cells", "mean", "total", "ran on"]
TRAINING_HEAD = ["attack", "seed", "precision", "channels-last", "epochs", "last loss", "last train acc", "images/s",
                 "training time", "ran on"]


def training_rows(runs: list[dict] | None) -> list[list[str]]:
    def num(v, fmt):
        return "—" if v is None else format(v, fmt)

    return [[str(r["attack"]), str(r["seed"]), r["precision"] or "—", "yes" if r["channels_last"] else "no",
             num(r["epochs"], "d"), num(r["loss"], ".4f"), num(r["train_acc"], ".4f"), num(r["images_per_s"], ".0f"),
             seconds(r["seconds"]), r["ran_on"]] for r in runs or []]


DIAGNOSTIC_HEAD = ["attack", "clean data", "defense", "diagnostic", "n", "mean ± sd"]


def diagnostic_rows(diags: list[dict] | None) -> list[list[str]]:
    def num(v):
        return f"{v:.4g}"

    return [[str(d["attack"]), fraction_label(d["clean_fraction"]), str(d["defense"]), str(d["name"]), str(d["n"]),
             num(d["mean"]) + ("" if d["sd"] is None else f" ± {num(d['sd'])}")] for d in diags or []]


def _time_rows(times: list[dict]) -> list[list[str]]:
    def ran_on(where: dict[str, int]) -> str:  # counts only where the cells of a row ran in several ways
        return "; ".join(f"{w} ({n})" if len(where) > 1 else w for w, n in where.items())

    return [[t["kind"], t["defense"] or "—", str(t["count"]), seconds(t["mean"]), seconds(t["total"]),
             ran_on(t.get("where") or {})] for t in times]


def write_csv(summary: list[dict], path: Path) -> None:
    """One row per group; lists as JSON, None as empty, floats unrounded."""
    cols = list(summary[0]) if summary else []
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        for g in summary:
            w.writerow({k: json.dumps(v) if isinstance(v, list) else ("" if v is None else v) for k, v in g.items()})


# ---- figures -------------------------------------------------------------------------------------

def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return buf.getvalue()


def _figure(width: float, height: float):
    # A bare Figure draws with Agg and leaves pyplot's global backend and state alone.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def _styles(summary: list[dict]) -> dict[str, tuple[str, str]]:
    """A fixed (marker, colour) per defense across the whole report."""
    defenses = list(dict.fromkeys(g["defense"] for g in summary if g["role"] != BACKDOORED))
    return {d: (MARKERS[i % len(MARKERS)], f"C{i % 10}") for i, d in enumerate(defenses)}


def _in_block(row: dict, key: tuple) -> bool:
    return tuple(row["axes"].get(k) for k in BLOCK_KEYS) == key


def scatter_png(rows: list[dict], key: tuple, styles: dict) -> bytes | None:
    """ACC vs ASR of every done defense cell of one block, with the backdoored model; None without ASR."""
    points: dict[str, list[tuple[float, float]]] = {}
    backdoored: set[tuple[float, float]] = set()
    for row in rows:
        m = row.get("metrics") or {}
        if not _in_block(row, key) or row["status"] != "done" or row["kind"] != "defense":
            continue
        if m.get("asr") is not None and m.get("acc") is not None:
            points.setdefault(row["axes"]["defense"], []).append((m["asr"] * 100, m["acc"] * 100))
        b = m.get("before") or {}
        if b.get("asr") is not None and b.get("acc") is not None:
            backdoored.add((b["asr"] * 100, b["acc"] * 100))
    if not points:
        return None
    fig = _figure(5.5, 4.0)
    ax = fig.add_subplot()
    for defense, pts in points.items():
        marker, colour = styles.get(defense, ("o", "k"))
        ax.scatter(*zip(*pts), marker=marker, color=colour, label=defense, alpha=0.8)
    if backdoored:
        ax.scatter(*zip(*sorted(backdoored)), marker="*", s=160, color="black", label=BACKDOORED)
    ax.set_xlim(-3, 103)  # the full ASR range, so scatters of different attacks compare at a glance
    ax.set_xlabel("ASR (%)")
    ax.set_ylabel("ACC (%)")
    ax.set_title(f"{key[2]}: ACC vs ASR ({key[0]}, {key[1]})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def read_history(run_dir: str | None) -> dict[str, list[float]] | None:
    """Per-epoch columns of ``run_dir/history.csv`` among CURVE_METRICS (plus epoch), or None."""
    path = Path(run_dir) / "history.csv" if run_dir else None
    if path is None or not path.is_file():
        return None
    with open(path, newline="") as fh:
        records = list(csv.DictReader(fh))
    cols: dict[str, list[float]] = {}
    for name in CURVE_METRICS:
        vals = [_number(r.get(name)) for r in records]
        if any(v is not None for v in vals):
            cols[name] = vals
    if not cols:
        return None
    cols["epoch"] = [_number(r.get("epoch")) or i + 1 for i, r in enumerate(records)]
    return cols


def _number(text: str | None) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def curves_png(rows: list[dict], key: tuple, styles: dict) -> tuple[bytes, list[str]] | None:
    """Per-epoch ACC/ASR/RA of the first done seed of each defense of one block; None when none recorded."""
    first: dict[str, dict] = {}
    for row in sorted((r for r in rows if r["kind"] == "defense" and r["status"] == "done" and _in_block(r, key)),
                      key=lambda r: (r["axes"].get("seed") is None, r["axes"].get("seed") or 0)):
        defense = row["axes"]["defense"]
        if defense not in first and (hist := read_history(row.get("run_dir"))):
            first[defense] = {"seed": row["axes"].get("seed"), "history": hist}
    if not first:
        return None
    from matplotlib.ticker import MaxNLocator

    metrics = [m for m in CURVE_METRICS if any(m in f["history"] for f in first.values())]
    fig = _figure(4.0 * len(metrics), 3.4)
    for i, name in enumerate(metrics, start=1):
        ax = fig.add_subplot(1, len(metrics), i)
        for defense, f in first.items():
            if name not in f["history"]:
                continue
            xy = [(e, v * 100) for e, v in zip(f["history"]["epoch"], f["history"][name]) if v is not None]
            marker, colour = styles.get(defense, ("o", "k"))
            ax.plot(*zip(*xy), marker=marker, color=colour, label=defense, markersize=4)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(f"{name.upper()} (%)")
        ax.grid(alpha=0.3)
        if i == 1:
            ax.legend(fontsize=8)
    fig.suptitle(f"{key[2]}: per-epoch metrics ({key[0]}, {key[1]})", fontsize=10)
    return _png(fig), [f"{d} seed {f['seed']}" for d, f in first.items()]


def pictures(rows: list[dict]) -> list[tuple[str, bytes]]:
    """(caption, PNG bytes) for each of PICTURES already in a cell's run folder."""
    out, seen = [], set()
    for row in rows:
        if not row.get("run_dir"):
            continue
        for name in PICTURES:
            path = Path(row["run_dir"]) / name
            if path in seen or not path.is_file():
                continue
            seen.add(path)
            data = path.read_bytes()
            if data.startswith(PNG_MAGIC):
                out.append((f"{cell_label(row)}: {name}", data))
    return out


def cell_label(row: dict) -> str:
    a = row["axes"]
    parts = [a.get("dataset"), a.get("arch"), a.get("attack")]
    if row["kind"] == "defense":
        parts += [a.get("defense"), f"seed {a.get('seed')}", fraction_label(a.get("clean_fraction"))]
    return f"{row['kind']} cell {row['hash'][:12]} ({' / '.join(str(p) for p in parts)})"


# ---- HTML ----------------------------------------------------------------------------------------

def _e(text) -> str:
    return html.escape(str(text))


def _html_table(head: list[str], body: Iterable[tuple[list[str], list[str]]], table_id: str) -> list[str]:
    """A <table>; ``body`` holds (cells, row classes)."""
    def td(tag, i, text):
        cls = ' class="text"' if i in TEXT_COLUMNS else ""
        return f"<{tag}{cls}>{_e(text)}</{tag}>"

    out = [f'<table id="{_e(table_id)}">', "<thead><tr>" + "".join(td("th", i, h) for i, h in enumerate(head))
           + "</tr></thead>", "<tbody>"]
    for row, classes in body:
        cls = f' class="{_e(" ".join(classes))}"' if classes else ""
        out.append(f"<tr{cls}>" + "".join(td("td", i, c) for i, c in enumerate(row)) + "</tr>")
    return out + ["</tbody>", "</table>"]


def _img(data: bytes, caption: str, kind: str) -> str:
    uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    return (f'<figure class="{kind}"><img src="{uri}" alt="{_e(caption)}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def _figures(rows: list[dict], groups: list[dict], styles: dict) -> list[str]:
    out = []
    for key in dict.fromkeys(tuple(g[k] for k in BLOCK_KEYS) for g in groups):
        if (png := scatter_png(rows, key, styles)) is not None:
            out.append(_img(png, f"{key[2]}: ACC vs ASR, one marker per defense and seed", "scatter"))
        if (curves := curves_png(rows, key, styles)) is not None:
            out.append(_img(curves[0], f"{key[2]}: per-epoch metrics of " + ", ".join(curves[1]), "curves"))
    return out


def html_page(rows: list[dict], summary: list[dict], times: list[dict], invocations: list[dict], *, title: str,
              reference: str, figures: bool, dets: list[dict] | None = None, training: list[dict] | None = None,
              diags: list[dict] | None = None) -> str:
    styles = _styles(summary)
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">', f"<title>{_e(title)}</title>",
           f"<style>{STYLE}</style>", "</head>", "<body>", f"<h1>{_e(title)}</h1>",
           "<p>Mean ± sd over seeds, in %. ACC drop = backdoored ACC − ACC; DER = [max(0, ΔASR) − max(0, ΔACC) + 1]"
           f" / 2 (BackdoorBench); Δ = defense − {_e(reference)} over the seeds both finished.</p>"]
    by_pair: dict[tuple, list[tuple]] = {}
    for (dataset, arch, cf), groups in tables(summary).items():
        by_pair.setdefault((dataset, arch), []).append((cf, groups))
    for (dataset, arch), parts in by_pair.items():
        out.append(f'<section id="{_e(slug("results", dataset, arch))}">')
        for cf, groups in parts:
            out.append(f"<h2>{_e(dataset)} / {_e(arch)} / {_e(fraction_label(cf))}</h2>")
            out += _html_table(headers(reference), ((cells(g), row_classes(g)) for g in groups),
                               table_id(dataset, arch, cf))
            if figures:
                out += _figures(rows, groups, styles)
        out.append("</section>")
    if dets := detection_rows(dets):
        out += ["<h2>Detection</h2>"]
        out += _html_table(DETECTION_HEAD, ((r, []) for r in dets), "detection")
    if trained := training_rows(training):
        out += ["<h2>Attack training</h2>"]
        out += _html_table(TRAINING_HEAD, ((r, []) for r in trained), "attack-training")
    if diag := diagnostic_rows(diags):
        out += ["<h2>Defense diagnostics</h2>"]
        out += _html_table(DIAGNOSTIC_HEAD, ((r, []) for r in diag), "diagnostics")
    out += ["<h2>Wall time per cell kind</h2>"]
    out += _html_table(TIME_HEAD, ((r, []) for r in _time_rows(times)), "wall-time")
    if pics := pictures(rows):
        out += ['<section id="pictures">', "<h2>Triggers and attention maps</h2>"]
        out += [_img(data, caption, "picture") for caption, data in pics] + ["</section>"]
    out += ['<section id="made-by">', "<h2>Made by</h2>"]
    for inv in invocations:
        started = f", started {_e(inv['started'])}" if inv.get("started") else ""
        out += [f"<h3>spec {_e(inv.get('spec', ''))}{started}</h3>", f"<pre>{_e(inv.get('command', ''))}</pre>"]
        if inv.get("spec_text"):
            out.append(f'<pre class="spec">{_e(inv["spec_text"])}</pre>')
    return "\n".join(out + ["</section>", "</body>", "</html>", ""])


DETECTION_HEAD = ["attack", "detector", "clean data", "n", "anomaly index", "target flagged", "flagged classes per seed",
                  "status"]


def detection_rows(dets: list[dict] | None) -> list[list[str]]:
    rows = []
    for g in dets or []:
        index = "—" if g["index_mean"] is None else (
            f"{g['index_mean']:.2f}" + (f" ± {g['index_sd']:.2f}" if g["index_sd"] is not None else ""))
        flagged = "; ".join(f"seed {s}: {', '.join(map(str, f)) or 'none'}" for s, f in g["flagged"].items())
        state = ", ".join(x for x in (f"{g['failed']} failed: {'; '.join(g['errors'])}" if g["failed"] else "",
                                      f"{g['missing']} missing" if g["missing"] else "") if x) or "done"
        rows.append([g["attack"], g["detector"], fraction_label(g["clean_fraction"]), str(g["n"]), index,
                     f"{g['target_flagged']}/{g['n']}", flagged or "—", state])
    return rows


def write_report(rows: Iterable[dict], out_dir: str | Path, *, invocations: Iterable[dict] = (),
                 title: str = "backdoor-eraser grid", reference: str = "nad", figures: bool = True) -> dict[str, Path]:
    """Write results.md, results.csv and report.html into ``out_dir``; returns their paths."""
    rows, invocations = list(rows), list(invocations)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary, times = summarize(rows, reference), cell_times(rows)
    dets, training, diags = detections(rows), training_runs(rows), diagnostics(rows)
    paths = {"html": out / "report.html", "md": out / "results.md", "csv": out / "results.csv"}
    paths["md"].write_text(markdown(summary, times, invocations, title, reference, dets, training, diags),
                           encoding="utf-8")
    write_csv(summary, paths["csv"])
    paths["html"].write_text(html_page(rows, summary, times, invocations, title=title, reference=reference,
                                       figures=figures, dets=dets, training=training, diags=diags),
                            encoding="utf-8")
    return paths


# ---- headless browser ----------------------------------------------------------------------------

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars")


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        if found := shutil.which(name):
            return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None


def _chromium(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    exe = find_chromium()
    if exe is None:
        raise RuntimeError("chromium is not installed (no `chromium` on PATH nor /usr/bin/chromium); "
                           "on Debian: apt-get install chromium")
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        try:
            proc = subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                                  capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"chromium took more than {timeout:g} s; gave up") from exc
    if proc.returncode != 0:
        tail = proc.stderr.decode("utf-8", "replace").strip().splitlines()[-3:]
        raise RuntimeError(f"chromium exited with status {proc.returncode}: {' / '.join(tail)}")
    return proc


def screenshot(html_path: str | Path, png_path: str | Path, width: int = 1200, height: int = 1600,
               timeout: float = 60) -> Path:
    """Render ``html_path`` with headless Chromium and save a width × height PNG at ``png_path``."""
    png = Path(png_path).resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    png.unlink(missing_ok=True)  # so a stale file never passes for a fresh screenshot
    _chromium([f"--screenshot={png}", f"--window-size={width},{height}", Path(html_path).resolve().as_uri()], timeout)
    if not png.is_file():
        raise RuntimeError(f"chromium exited without writing {png}")
    return png


def dump_dom(html_path: str | Path, timeout: float = 60) -> str:
    """The DOM of ``html_path`` as headless Chromium serialises it after loading."""
    proc = _chromium(["--dump-dom", Path(html_path).resolve().as_uri()], timeout)
    return proc.stdout.decode("utf-8", "replace")
