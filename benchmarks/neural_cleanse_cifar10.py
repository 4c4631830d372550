"""Neural Cleanse on CIFAR-10 WRN-16-1 models: the clean reference, the BadNets and Blend models, and their
NAD-purified versions (as SAGE uses Neural Cleanse to check purified models).

Runs `backdoor-eraser detect` per model with a seeded 5 % clean subset (NC uses 1,000 of those images),
then writes benchmarks/results/neural_cleanse_cifar10.{md,json} and copies each mask grid PNG to
benchmarks/results/neural_cleanse/. Finished runs are skipped.

    python benchmarks/neural_cleanse_cifar10.py --data-dir benchmarks/work/cifar10_jpeg
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "benchmarks" / "work"
MODELS = {  # label -> (run folder, true backdoor target or None)
    "clean": (WORK / "attacks" / "clean", None),
    "badnets": (WORK / "core" / "badnets", 0),
    "blend": (WORK / "core" / "blend", 0),
    "badnets → NAD": (WORK / "core" / "badnets-nad", 0),
    "blend → NAD": (WORK / "core" / "blend-nad", 0),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--only", default=",".join(MODELS))
    ap.add_argument("--epochs", type=int, default=None, help="cap on NC epochs per class (default: NC's 1,000 "
                    "with early stopping)")
    a = ap.parse_args()
    out_root = WORK / "neural_cleanse"
    exe = [sys.executable, "-m", "backdoor_eraser.cli"]
    for label in filter(None, a.only.split(",")):
        run, _ = MODELS[label]
        out = out_root / run.name
        if (out / "detect.json").exists() or not (run / "model.safetensors").exists():
            continue
        cmd = exe + ["detect", "--model", str(run), "--data-dir", a.data_dir, "--clean-fraction", "0.05",
                     "--seed", "0", "--out", str(out)] + (["--epochs", str(a.epochs)] if a.epochs else [])
        print("$", shlex.join(cmd), flush=True)
        with open(out_root.parent / "neural_cleanse.log", "a") as fh:
            subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT)

    rows = {}
    (RESULTS / "neural_cleanse").mkdir(parents=True, exist_ok=True)
    for label, (run, target) in MODELS.items():
        f = out_root / run.name / "detect.json"
        if not f.exists():
            continue
        r = json.loads(f.read_text())
        rows[label] = {"target": target, **{k: r[k] for k in ("l1_norms", "anomaly_index", "flagged", "mad_index", "max_index",
                                                               "backdoored", "seconds", "config", "epochs", "found")}}
        shutil.copy2(out_root / run.name / "masks.png", RESULTS / "neural_cleanse" / f"{run.name}.png")
    lines = ["| model | true target | flagged classes | anomaly index of class 0 | MAD index (smallest-mask class) "
             "| smallest-mask class | L1 of class 0 / median L1 | verdict | classes stopped early / reaching 99 % | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for label, r in rows.items():
        norms = r["l1_norms"]
        median = statistics.median(norms)  # as the detector's anomaly index (mean of the two middle norms)
        smallest = min(range(len(norms)), key=norms.__getitem__)
        right = (r["backdoored"] == (r["target"] is not None and "NAD" not in label))
        lines.append(f"| {label} | {r['target'] if r['target'] is not None else '—'} | {r['flagged'] or 'none'} | "
                     f"{r['anomaly_index'][0]:.2f} | {r['mad_index']:.2f} | {smallest} | {norms[0]:.1f} / {median:.1f} | "
                     f"{'backdoored' if r['backdoored'] else 'clean'}{'' if right else ' (wrong)'} | "
                     f"{sum(e < r['config']['epochs'] for e in r['epochs'])} / {sum(r['found'])} of {len(norms)} | "
                     f"{r['seconds']:.0f} |")
    (RESULTS / "neural_cleanse_cifar10.json").write_text(json.dumps(rows, indent=2) + "\n")
    cfg = next(iter(rows.values()))["config"] if rows else {}
    text = ["# Neural Cleanse on CIFAR-10 WRN-16-1 models", "",
            "`backdoor-eraser detect` with the released visualizer's defaults (Wang et al. 2019; SAGE's use: spec §6.3) on a seeded 5 % clean "
            f"subset (NC draws {cfg.get('samples', '?')} images from it; epochs cap {cfg.get('epochs', '?')}, a CPU "
            "budget: the release allows 1,000 with early stopping, and classes still running at the cap keep their "
            "smallest mask that reached 99 % attack success). A "
            "model is flagged when a class's mask L1 is below the median with anomaly index > 2. For the "
            "NAD-purified models the right verdict is 'clean'; '(wrong)' marks a miss or a false alarm.", "",
            *lines, "", "Mask grids: " + ", ".join(f"[{run.name}](neural_cleanse/{run.name}.png)"
                                                  for label, (run, _) in MODELS.items() if label in rows) + ".",
            "", "Reproduce: `python benchmarks/neural_cleanse_cifar10.py --data-dir benchmarks/work/cifar10_jpeg"
            + (f" --epochs {cfg['epochs']}`" if cfg.get("epochs") not in (None, 1000) else "`")]
    (RESULTS / "neural_cleanse_cifar10.md").write_text("\n".join(text) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
