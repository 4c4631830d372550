"""Pair grid cells of two stores that differ only in the defense's precision (``amp``), and print the
paired differences as markdown.

Two grids often hold the same defense run in fp32 and in bf16: a spec that pins ``amp: none`` and one
that leaves the default ``auto`` (bf16 where the CPU runs it natively). Their cells have different
hashes, so no report puts them side by side; this script does, matching cells whose identity (the
grid's cell hash) is equal once the defense's ``amp`` is left out.

    python benchmarks/precision_pairs.py STORE_A:SPEC_A STORE_B:SPEC_B > OUT.md

Each row is one model and defense, seeds paired; Δ = B − A, mean ± sd over the pairs (sd with n − 1).
"""
from __future__ import annotations

import argparse
import statistics
from collections import defaultdict

from backdoor_eraser.grid.spec import cell_hash
from backdoor_eraser.grid.store import Store


def pair_key(config: dict) -> str:
    """The cell's own identity (``grid.spec.cell_hash``: the resolved config, without the spec's params,
    the preset name and idle fields) with the precision left out."""
    d = config["defense"]
    return cell_hash({**config, "defense": {**d, "config": {**d["config"], "amp": None}}})


def done_defense_cells(arg: str) -> list[dict]:
    folder, _, spec = arg.rpartition(":")
    if not folder:
        raise SystemExit(f"{arg}: expected STORE_FOLDER:SPEC_NAME")
    return [r for r in Store(folder).rows(spec)
            if r["status"] == "done" and r["kind"] == "defense" and r["metrics"]]


def _ms(xs: list[float]) -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):+.2f} ± {sd:.2f}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a", help="STORE_FOLDER:SPEC_NAME (the reference, e.g. the fp32 cells)")
    p.add_argument("b", help="STORE_FOLDER:SPEC_NAME (compared against a)")
    args = p.parse_args(argv)
    a_cells = {pair_key(r["config"]): r for r in done_defense_cells(args.a)}
    groups: dict[tuple, list[tuple[dict, dict]]] = defaultdict(list)
    for rb in done_defense_cells(args.b):
        ra = a_cells.get(pair_key(rb["config"]))
        if ra is not None:
            groups[(rb["axes"]["attack"], rb["axes"]["defense"])].append((ra, rb))
    if not groups:
        raise SystemExit("no pair of cells differs only in precision")
    print(f"A = `{args.a}`, B = `{args.b}`; Δ = B − A, mean ± sd over the paired seeds (%, seconds: the cells' wall time).\n")
    print("| attack | defense (B's label) | precision A → B | seeds | ACC A | ACC B | Δ ACC | ASR A | ASR B | Δ ASR | wall s A → B |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (attack, defense), pairs in sorted(groups.items()):
        pairs.sort(key=lambda ab: ab[1]["axes"]["seed"])
        get = lambda side, k: [100 * ab[side]["metrics"][k] for ab in pairs]   # noqa: E731
        precision = {f"{ab[0]['metrics'].get('precision')} → {ab[1]['metrics'].get('precision')}" for ab in pairs}
        acc_a, acc_b, asr_a, asr_b = get(0, "acc"), get(1, "acc"), get(0, "asr"), get(1, "asr")
        wall_a = statistics.mean(ab[0]["wall_seconds"] for ab in pairs)
        wall_b = statistics.mean(ab[1]["wall_seconds"] for ab in pairs)
        print(f"| {attack} | {defense} | {', '.join(sorted(precision))} | "
              f"{','.join(str(ab[1]['axes']['seed']) for ab in pairs)} | "
              f"{statistics.mean(acc_a):.2f} | {statistics.mean(acc_b):.2f} | "
              f"{_ms([b - a for a, b in zip(acc_a, acc_b)])} | {statistics.mean(asr_a):.2f} | "
              f"{statistics.mean(asr_b):.2f} | {_ms([b - a for a, b in zip(asr_a, asr_b)])} | "
              f"{wall_a:.0f} → {wall_b:.0f} |")


if __name__ == "__main__":
    main()
