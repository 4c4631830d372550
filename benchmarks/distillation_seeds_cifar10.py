"""Attention distillation across seeds: fine-tuning, NAD, ARGD and SAGE on the CIFAR-10 BadNets and Blend
models, each with clean-subset seeds 0, 1, 2 (the seed fixes the 5 % clean subset and the training).

Answers "do ARGD or SAGE beat NAD on ASR at equal ACC?" with more than one seed: per method the mean and
standard deviation of ACC and ASR, every (ACC, ASR) point, and a scatter plot. Seed-0 runs are the ones
of defenses_cifar10.py (same commands); the others are new. Resumable; finished runs are skipped.

    python benchmarks/distillation_seeds_cifar10.py --data-dir benchmarks/work/cifar10_jpeg
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "benchmarks" / "work" / "core"
METHODS = ["finetune", "nad", "argd", "sage"]
OVERRIDES = {"sage": ["--epochs", "20"]}  # as defenses_cifar10.py: spec §5.6 says 100 (or 50)


FINDINGS = """## Do ARGD or SAGE beat NAD on ASR at equal ACC?

Not here, on either model.

- **ARGD vs NAD**, paired by seed: ARGD keeps more clean accuracy, +0.95 ± 0.96 points on BadNets and
  +0.79 ± 0.61 on Blend. Its ASR is the same within noise: +0.15 ± 0.12 and +0.07 ± 0.86 points, all runs
  at or below 4.2 %. The direction of the ACC gain matches ARGD's Table 1 (+1.8 and +1.4 points on these
  two attacks). The paper's lower ASR (BadNets 3.62 → 2.10, Blend 2.33 → 0.12) does not show at our
  floor of 0–4 %.
- **SAGE at 20 epochs** (the CPU cut; the spec says 100) loses 4.6 ± 2.7 (BadNets) and 7.8 ± 1.0 (Blend)
  ACC points to NAD with no ASR gain. Its learning-rate rule checks every 25 epochs, so within 20 epochs it
  never halves the lr and trains at a constant 0.05. What we tried: the spec's full 100 epochs (seed 0, row
  `sage-100` of defenses_cifar10_{badnets,blend}.md). The rule then halved the lr at epochs 25, 50, 75 and
  100 on BadNets (and on Blend). SAGE reached 72.93 / 2.94 on BadNets and 72.94 / 0.87 on Blend, with ACC above NAD's seed-0
  71.76 / 2.36 and 71.61 / 0.10 but ASR not below it, at 5× NAD's epochs (100 against 10 + 10).
- Fine-tuning, NAD and ARGD lose 10–14 ACC points against the backdoored models (82.5, 82.6), SAGE at 20
  epochs 16–18. The lr study in
  defenses_cifar10_*.md (rows `finetune-lr*`, `nad-lr0.03`) traces most of that loss to the lr 0.1 restart.
"""


def folder(attack: str, method: str, seed: int) -> Path:
    return WORK / (f"{attack}-{method}" if seed == 0 else f"{attack}-{method}-s{seed}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--attacks", default="badnets,blend")
    ap.add_argument("--seeds", default="0,1,2")
    a = ap.parse_args()
    attacks = a.attacks.split(",")
    seeds = [int(s) for s in a.seeds.split(",")]
    exe = [sys.executable, "-m", "backdoor_eraser.cli"]
    for seed in seeds:
        for attack in attacks:
            for method in METHODS:
                out = folder(attack, method, seed)
                if (out / "metrics.json").exists():
                    continue
                cmd = exe + ["purify", "--model", str(WORK / attack), "--method", method, "--clean-fraction", "0.05",
                             "--seed", str(seed), "--data-dir", a.data_dir, "--out", str(out), "--resume",
                             "--no-epoch-eval"] + OVERRIDES.get(method, [])
                print("$", shlex.join(cmd), flush=True)
                t0 = time.perf_counter()
                with open(WORK / "distillation-seeds.log", "a") as fh:
                    rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT).returncode
                print(f"  {'failed' if rc else 'done'} in {time.perf_counter() - t0:.0f} s", flush=True)

    points: dict[str, dict[str, list[tuple[int, float, float]]]] = {}
    for attack in attacks:
        for method in METHODS:
            for seed in seeds:
                f = folder(attack, method, seed) / "metrics.json"
                if f.exists():
                    m = json.loads(f.read_text())
                    points.setdefault(attack, {}).setdefault(method, []).append((seed, m["acc"], m["asr"]))

    def mean_sd(values):
        values = [100 * v for v in values]
        sd = statistics.stdev(values) if len(values) > 1 else float("nan")
        return f"{statistics.mean(values):.2f} ± {sd:.2f}"

    lines = []
    for attack, per in points.items():
        lines += [f"### {attack}", "", "| method | seeds | ACC mean ± sd | ASR mean ± sd | (seed: ACC / ASR) |",
                  "|---|---|---|---|---|"]
        for method, pts in per.items():
            each = "; ".join(f"{s}: {100 * acc:.2f} / {100 * asr:.2f}" for s, acc, asr in pts)
            lines.append(f"| {method} | {len(pts)} | {mean_sd([p[1] for p in pts])} | {mean_sd([p[2] for p in pts])} "
                         f"| {each} |")
        lines.append("")
        # Paired by seed: both methods saw the same clean subset, so the difference removes the subset's effect.
        nad = {sd: (acc, asr) for sd, acc, asr in per.get("nad", [])}
        for method in ("argd", "sage", "finetune"):
            pairs = [(acc - nad[sd][0], asr - nad[sd][1]) for sd, acc, asr in per.get(method, []) if sd in nad]
            if pairs:
                lines.append(f"- {method} − NAD, paired by seed ({len(pairs)}): ΔACC {mean_sd([p[0] for p in pairs])}, "
                             f"ΔASR {mean_sd([p[1] for p in pairs])} (points)")
        lines.append("")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(points), figsize=(5 * len(points), 4), squeeze=False)
    for ax, (attack, per) in zip(axes[0], points.items()):
        for method, pts in per.items():
            ax.scatter([100 * p[1] for p in pts], [100 * p[2] for p in pts], label=method)
        ax.set(title=f"CIFAR-10 {attack}", xlabel="ACC (%)", ylabel="ASR (%)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "distillation_seeds_cifar10.png", dpi=120)
    (RESULTS / "distillation_seeds_cifar10.json").write_text(json.dumps(points, indent=2) + "\n")
    text = ["# Attention distillation across seeds: CIFAR-10 BadNets and Blend, WRN-16-1, 5 % clean data", "",
            "Backdoored models: `benchmarks/work/core/{badnets,blend}` (core_cifar10.md, defenses_cifar10_blend.md). "
            "Each seed draws its own stratified 5 % clean subset (2,500 images) and seeds the defense's training. "
            "Paper defaults except SAGE at 20 epochs (spec: 100). Metrics in % on the test split (ASR on the "
            "9,000 triggered non-target images).", "", *lines,
            "![ACC vs ASR per seed](distillation_seeds_cifar10.png)", "", FINDINGS, "",
            "Reproduce: `python benchmarks/distillation_seeds_cifar10.py --data-dir benchmarks/work/cifar10_jpeg`"]
    (RESULTS / "distillation_seeds_cifar10.md").write_text("\n".join(text) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
