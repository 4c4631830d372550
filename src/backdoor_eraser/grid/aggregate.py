"""Grid results per group: mean ± sd over seeds of ACC, ASR, RA, ACC drop and DER, paired differences to a
reference defense, and wall time per cell kind. Values stay fractions in [0, 1], as the store holds them."""
from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Iterable

METRICS = ("acc", "asr", "ra", "acc_drop", "der", "val_acc_drop", "val_asr")
PAIRED = ("acc", "asr")
BLOCK_KEYS = ("dataset", "arch", "attack", "clean_fraction")
BACKDOORED = "backdoored"


def der(before: dict, after: dict) -> float | None:
    """BackdoorBench's defense effectiveness rating, [max(0, ΔASR) − max(0, ΔACC) + 1] / 2, in [0, 1]."""
    vals = (before.get("asr"), after.get("asr"), before.get("acc"), after.get("acc"))
    if any(v is None for v in vals):
        return None
    d_asr, d_acc = vals[0] - vals[1], vals[2] - vals[3]
    return (max(0.0, d_asr) - max(0.0, d_acc) + 1) / 2


def cell_values(metrics: dict | None) -> dict[str, float | None]:
    """The per-seed values of METRICS for one done defense cell."""
    m = metrics or {}
    before = m.get("before") or {}
    acc, acc0 = m.get("acc"), before.get("acc")
    val, val0 = m.get("val") or {}, before.get("val") or {}
    return {"acc": acc, "asr": m.get("asr"), "ra": m.get("ra"),
            "acc_drop": None if acc is None or acc0 is None else acc0 - acc, "der": der(before, m),
            "val_acc_drop": None if "acc" not in val or "acc" not in val0 else val0["acc"] - val["acc"],
            "val_asr": val.get("asr")}


def mean_sd(values: Iterable[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample sd (ddof=1) of the values that are not None; sd is None below two values."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


class _Group:
    """The cells of one table row while they are being collected."""

    def __init__(self, key: tuple, defense: str):
        self.key, self.defense = key, defense
        self.done: list[tuple[int | None, dict]] = []  # (seed, values) per done cell
        self.failed, self.missing, self.errors = 0, 0, []

    def count(self, row: dict) -> None:
        """Count a cell that is not done."""
        if row["status"] == "failed":
            self.failed += 1
            if row.get("error"):
                self.errors.append(row["error"])
        elif row["status"] != "done":
            self.missing += 1

    def by_seed(self) -> dict:
        out: dict = {}
        for seed, values in self.done:
            out.setdefault(seed, values)  # a repeated seed keeps its first cell
        return out

    def summary(self) -> dict:
        out = dict(zip(BLOCK_KEYS, self.key))
        seeds = sorted({s for s, _ in self.done if s is not None})
        out.update(defense=self.defense, role=BACKDOORED if self.defense == BACKDOORED else "defense",
                   n=len(self.done), seeds=seeds, failed=self.failed, missing=self.missing, errors=list(self.errors))
        for m in METRICS:
            out[f"{m}_mean"], out[f"{m}_sd"] = mean_sd(v[m] for _, v in self.done)
        for m in PAIRED:
            out[f"d_{m}_mean"] = out[f"d_{m}_sd"] = None
        out["d_n"] = None
        return out


def _block_key(row: dict) -> tuple:
    a = row["axes"]
    return tuple(a.get(k) for k in BLOCK_KEYS)


def _blocks(rows: list[dict]) -> dict[tuple, dict[str, _Group]]:
    """Defense cells into blocks (dataset, arch, attack, clean_fraction) → {defense: group}, the backdoored
    group first, built from the `before` metrics of the done defense cells."""
    blocks: dict[tuple, dict[str, _Group]] = {}
    for row in rows:
        if row["kind"] != "defense":
            continue
        key = _block_key(row)
        block = blocks.setdefault(key, {BACKDOORED: _Group(key, BACKDOORED)})
        defense = row["axes"]["defense"]
        group = block.setdefault(defense, _Group(key, defense))
        seed = row["axes"].get("seed")
        if row["status"] != "done":
            group.count(row)
            continue
        group.done.append((seed, cell_values(row["metrics"])))
        before = (row["metrics"] or {}).get("before")
        backdoored = block[BACKDOORED]
        # Every defense cell of a seed scores the same backdoored model: one entry per seed, so that n
        # counts seeds, not cells.
        if before and all(s != seed for s, _ in backdoored.done):
            backdoored.done.append((seed, {**cell_values(before), "acc_drop": None, "der": None}))
    return blocks


def _add_attack_cells(rows: list[dict], blocks: dict[tuple, dict[str, _Group]]) -> None:
    """Attack cells mark the backdoored rows failed/missing; a done one stands in for the backdoored
    metrics while no defense cell of its block is done yet. An attack without defense cells gets a block
    of its own (clean fraction None)."""
    for row in rows:
        if row["kind"] != "attack":
            continue
        key3 = _block_key(row)[:3]
        keys = [k for k in blocks if k[:3] == key3] or [key3 + (None,)]
        for key in keys:
            group = blocks.setdefault(key, {BACKDOORED: _Group(key, BACKDOORED)})[BACKDOORED]
            if row["status"] != "done":
                group.count(row)
            elif not group.done and row.get("metrics"):
                group.done.append((None, {**cell_values(row["metrics"]), "acc_drop": None, "der": None}))


def _order(rows: list[dict], blocks: dict) -> list[tuple]:
    """Block keys in the order their first cell appears in ``rows``."""
    seen: dict[tuple, None] = {}
    for row in rows:
        key = _block_key(row)
        if row["kind"] == "defense":
            seen.setdefault(key, None)
        else:
            for k in blocks:
                if k[:3] == key[:3]:
                    seen.setdefault(k, None)
    return list(seen)


def _paired(group: _Group, ref: _Group, out: dict) -> None:
    mine, theirs = group.by_seed(), ref.by_seed()
    common = [s for s in mine if s in theirs]
    out["d_n"] = len(common)
    for m in PAIRED:
        diffs = [mine[s][m] - theirs[s][m] for s in common if mine[s][m] is not None and theirs[s][m] is not None]
        out[f"d_{m}_mean"], out[f"d_{m}_sd"] = mean_sd(diffs)


def summarize(rows: Iterable[dict], reference: str = "nad") -> list[dict]:
    """One dict per (dataset, arch, attack, clean_fraction, defense) plus a "backdoored" one per block,
    with n, seeds, failed, missing, errors, <metric>_mean/_sd and the paired d_acc/d_asr to ``reference``."""
    rows = list(rows)
    blocks = _blocks(rows)
    _add_attack_cells(rows, blocks)
    out = []
    for key in _order(rows, blocks):
        block = blocks[key]
        ref = block.get(reference)
        for defense, group in block.items():
            summary = group.summary()
            if ref is not None and defense not in (reference, BACKDOORED):
                _paired(group, ref, summary)
            out.append(summary)
    return out


def _seconds(row: dict) -> float | None:
    if row.get("wall_seconds") is not None:
        return float(row["wall_seconds"])
    m = row.get("metrics") or {}
    t = m.get("wall_seconds", m.get("train_seconds"))
    return None if t is None else float(t)


def cell_times(rows: Iterable[dict]) -> list[dict]:
    """Wall seconds of done cells per (kind, defense): count, mean and total, in order of first appearance,
    and where they ran (CPU capability or device, threads, precision): times from different hosts or
    precisions do not compare, and ``amp: auto`` resolves per host."""
    times: dict[tuple, list[float]] = {}
    where: dict[tuple, Counter] = {}
    for row in rows:
        t = _seconds(row)
        if row["status"] != "done" or t is None:
            continue
        kind = (row.get("config") or {}).get("kind", row["kind"])  # "evaluate" cells are attack-kind rows
        key = (kind, row["axes"].get("defense"))
        times.setdefault(key, []).append(t)
        where.setdefault(key, Counter())[_ran_on(row)] += 1
    return [{"kind": kind, "defense": defense, "count": len(ts), "mean": statistics.fmean(ts), "total": sum(ts),
             "where": dict(where[(kind, defense)])} for (kind, defense), ts in times.items()]


def training_runs(rows: Iterable[dict]) -> list[dict]:
    """The attack models the grid trained itself (not zoo models): per cell its attack label and seed,
    precision, memory layout, epochs, the last epoch's loss and training accuracy, and training images/s
    over all epochs (None for cells recorded before their metrics held the last three)."""
    out = []
    for row in rows:
        m, cfg = row.get("metrics") or {}, row.get("config") or {}
        if row["status"] != "done" or cfg.get("kind") != "attack" or "train_seconds" not in m:
            continue
        seed = row["axes"].get("seed")
        out.append({"attack": row["axes"].get("attack"), "seed": cfg.get("seed") if seed is None else seed,
                    "precision": "fp32" if m.get("precision") == "none" else m.get("precision"),
                    "channels_last": bool((cfg.get("train") or {}).get("channels_last")), "epochs": m.get("epochs"),
                    "loss": m.get("train_loss"), "train_acc": m.get("train_acc"),
                    "images_per_s": m.get("train_images_per_s"), "seconds": m["train_seconds"],
                    "ran_on": _ran_on(row)})
    return out


def _ran_on(row: dict) -> str:
    host = row.get("host") or {}
    if not host:
        return "—"
    device = host.get("device") if host.get("device") not in (None, "auto", "cpu") else host.get("cpu_capability")
    parts = [str(device or "?")]
    if host.get("threads"):
        parts.append(f"{host['threads']} threads")
    precision = (row.get("metrics") or {}).get("precision")
    if precision:
        parts.append("fp32" if precision == "none" else precision)
    return ", ".join(parts)


def detections(rows: Iterable[dict]) -> list[dict]:
    """Detector cells per (dataset, arch, attack, detector): anomaly index mean ± sd over seeds, the
    classes flagged per seed, and how many seeds flagged the attack's target."""
    groups: dict[tuple, dict] = {}
    for row in rows:
        if row["kind"] != "detect":
            continue
        a = row["axes"]
        key = (a.get("dataset"), a.get("arch"), a.get("attack"), a.get("defense"), a.get("clean_fraction"))
        g = groups.setdefault(key, {"dataset": key[0], "arch": key[1], "attack": key[2], "detector": key[3],
                                    "clean_fraction": key[4], "index": [], "flagged": {}, "target_flagged": 0,
                                    "failed": 0, "missing": 0, "errors": []})
        if row["status"] == "failed":
            g["failed"] += 1
            g["errors"].append(row.get("error") or "")
        elif row["status"] != "done":
            g["missing"] += 1
        else:
            m = row["metrics"] or {}
            g["index"].append(m.get("mad_index"))
            g["flagged"][a.get("seed")] = list(m.get("flagged") or [])
            target = (((row.get("config") or {}).get("attack") or {}).get("config") or {}).get("target")
            g["target_flagged"] += int(target is not None and target in (m.get("flagged") or []))
    out = []
    for g in groups.values():
        g["n"] = len(g["index"])
        g["index_mean"], g["index_sd"] = mean_sd(g.pop("index"))
        out.append(g)
    return out


def diagnostics(rows: Iterable[dict]) -> list[dict]:
    """The defenses' own numbers (metrics["diagnostics"]: ABL's isolation precision, channels pruned) per
    (dataset, arch, attack, clean fraction, defense, name): mean ± sd over the done cells that hold them."""
    groups: dict[tuple, list[float]] = {}
    for row in rows:
        if row["kind"] != "defense" or row["status"] != "done":
            continue
        for name, value in ((row.get("metrics") or {}).get("diagnostics") or {}).items():
            groups.setdefault(_block_key(row) + (row["axes"]["defense"], name), []).append(value)
    out = []
    for key, values in groups.items():
        mean, sd = mean_sd(values)
        out.append({**dict(zip(BLOCK_KEYS + ("defense", "name"), key)), "n": len(values), "mean": mean, "sd": sd})
    return out
