"""Core benchmark: CIFAR-10 (JPEG copy), WRN-16-1, BadNets 10 % → fine-tuning and NAD with 5 % clean data.

Runs the real CLI for each step, times it, and writes benchmarks/results/core_cifar10.{json,md} and the
attention-map PNG. Resumable: rerun the same command after an interruption (each step resumes from its
per-epoch checkpoint; finished steps are skipped).

    python benchmarks/core_cifar10.py --data-dir benchmarks/work/cifar10_jpeg --epochs 20
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def run(cmd: list[str], log: Path) -> float:
    print("$", shlex.join(cmd), flush=True)
    t0 = time.perf_counter()
    with open(log, "a") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode:
        sys.exit(f"step failed ({proc.returncode}); see {log}")
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--work", default=str(ROOT / "benchmarks" / "work" / "core"))
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "log.txt"
    exe = [sys.executable, "-m", "backdoor_eraser.cli"]
    steps = {}
    commands = {
        "attack": exe + ["attack", "--dataset", "cifar10", "--data-dir", a.data_dir, "--arch", "wrn-16-1",
                         "--attack", "badnets", "--target", "0", "--rate", "0.1", "--epochs", str(a.epochs),
                         "--batch-size", "128", "--lr", "0.1", "--weight-decay", "5e-4", "--schedule", "cosine",
                         "--seed", str(a.seed), "--out", str(work / "badnets"), "--resume"],
        "finetune": exe + ["purify", "--model", str(work / "badnets"), "--method", "finetune", "--clean-fraction",
                           "0.05", "--seed", str(a.seed), "--out", str(work / "badnets-finetune")],
        "nad": exe + ["purify", "--model", str(work / "badnets"), "--method", "nad", "--clean-fraction", "0.05",
                      "--seed", str(a.seed), "--out", str(work / "badnets-nad")],
    }
    for name, cmd in commands.items():
        out = Path(cmd[cmd.index("--out") + 1])
        if (out / "metrics.json").exists():
            print(f"{name}: done already ({out})")
            continue
        steps[name] = run(cmd, log)
    metrics = {name: json.loads((Path(cmd[cmd.index("--out") + 1]) / "metrics.json").read_text())
               for name, cmd in commands.items()}
    hist = (work / "badnets" / "history.csv").read_text().splitlines()
    header = hist[0].split(",")
    ips = [float(r.split(",")[header.index("images_per_s")]) for r in hist[1:]]
    # The attack may have been resumed across interruptions: its training time is the sum over epochs.
    attack_train_seconds = sum(float(r.split(",")[header.index("seconds")]) for r in hist[1:])

    # attention figure: backdoored, teacher, NAD student on one triggered test image
    sys.path.insert(0, str(ROOT / "src"))
    from backdoor_eraser.runs import load_model
    from backdoor_eraser.viz import attention_figure
    from backdoor_eraser.workflows import attack_for, load_data
    from backdoor_eraser.runs import read_meta
    splits = load_data("cifar10", a.data_dir)
    atk = attack_for(read_meta(work / "badnets"), work / "badnets", None, None)
    trig = atk.triggered_test_set(splits.test)
    models = {"backdoored": load_model(work / "badnets")[0], "teacher (FT)": load_model(work / "badnets-nad" / "teacher")[0],
              "NAD student": load_model(work / "badnets-nad")[0]}
    attention_figure(models, trig.images[0], RESULTS / "core_cifar10_attention.png",
                     title=f"CIFAR-10 BadNets, triggered test image (true class {splits.test.classes[int(trig.true_labels[0])]})")

    rows = {"backdoored": metrics["attack"], "finetune": metrics["finetune"], "nad": metrics["nad"]}
    previous = json.loads((RESULTS / "core_cifar10.json").read_text()) if (RESULTS / "core_cifar10.json").exists() else {}
    wall = {**previous.get("wall_seconds", {}), **steps}
    wall["attack"] = attack_train_seconds
    for name in ("finetune", "nad"):
        wall[name] = metrics[name]["wall_seconds"]
    record = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
              "epochs": a.epochs, "commands": {k: shlex.join(v) for k, v in commands.items()},
              "wall_seconds": wall, "wall_seconds_note": "attack: sum of per-epoch training time (excludes per-epoch "
              "evaluation); finetune/nad: purify wall time including the NAD teacher",
              "attack_train_images_per_s_per_epoch": ips, "metrics": rows}
    (RESULTS / "core_cifar10.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = ["| model | ACC (10k) | ACC (9k non-target) | ASR | RA | time of step |", "|---|---|---|---|---|---|"]
    wall_key = {"backdoored": "attack", "finetune": "finetune", "nad": "nad"}
    for name, m in rows.items():
        w = wall.get(wall_key[name])
        lines.append(f"| {name} | {100 * m['acc']:.2f} | {100 * m['acc_nontarget']:.2f} | {100 * m['asr']:.2f} | "
                     f"{100 * m['ra']:.2f} | {f'{w:.0f} s' if w else 'n/a'} |")
    ips_txt = ", ".join(f"{v:.0f}" for v in ips)
    text = [
        "# Core benchmark: CIFAR-10, WRN-16-1, BadNets → fine-tuning and NAD",
        "",
        f"CIFAR-10 from the `../shared/data` JPEG copy (50,000 train / 10,000 test). BadNets 3×3 corner grid, 10 % "
        f"poisoning, target 0, trained {a.epochs} epochs (SGD lr 0.1 cosine, momentum 0.9, Nesterov, wd 5e-4, batch 128, "
        "crop + flip). Defenses use a seeded stratified 5 % clean subset (2,500 images) of the training set with "
        "the NAD recipe (10 epochs, lr 0.1 ÷10 every 2 epochs, batch 64, crop + flip; NAD: teacher = 10-epoch "
        "fine-tune, β = (500, 1000, 1000), mean-squared attention distance). Metrics in %; ASR and RA on the 9,000 "
        "triggered non-target test images. Machine: " + record["machine"] + ".",
        "",
        *lines,
        "",
        "Time of step: attack = sum of per-epoch training time (without the per-epoch test evaluation); "
        "finetune / nad = wall time of `purify` (NAD includes its teacher), with per-epoch evaluation.",
        "",
        f"Attack training images/s per epoch: {ips_txt}. These vary because the run shared the 2 cores with "
        "other jobs and was resumed once with 1 thread (epochs 9–20); `trainer_throughput.md` has a controlled "
        "comparison of the trainer against a bare PyTorch loop.",
        "",
        "Reproduce (resumable):",
        "",
        "```bash",
        "mkdir -p benchmarks/work && tar -xzf ../shared/data/cifar10_jpeg.tar.gz -C benchmarks/work",
        f"python benchmarks/core_cifar10.py --data-dir benchmarks/work/cifar10_jpeg --epochs {a.epochs}",
        "```",
        "",
        "Commands it runs:",
        "",
        *[f"- `{shlex.join(v[2:])}`" for v in commands.values()],
        "",
        "![attention maps](core_cifar10_attention.png)",
    ]
    (RESULTS / "core_cifar10.md").write_text("\n".join(text) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
