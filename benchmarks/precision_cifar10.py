"""fp32 vs bf16 autocast (and channels-last) for WRN-16-1 training on this CPU.

Two measurements, written to benchmarks/results/precision_cifar10.{md,json}:
1. controlled: the same seed, model and data (the first 12,800 CIFAR-10 training images, clean), 2 epochs
   at lr 0.1, batch 128, crop + flip, for each of fp32 / fp32 channels-last / bf16 / bf16 channels-last:
   loss and train accuracy per epoch, and images/s;
2. full: the 20-epoch BadNets run of the core benchmark (fp32) against the same command with
   `--channels-last --amp bf16` (run by attacks_cifar10.py as `badnets-bf16`), read from their run folders.

    python benchmarks/precision_cifar10.py --data-dir benchmarks/work/cifar10_jpeg
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "benchmarks" / "work"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--images", type=int, default=12800)
    ap.add_argument("--epochs", type=int, default=2)
    a = ap.parse_args()
    from backdoor_eraser.classifier import Normalization
    from backdoor_eraser.runs import new_model
    from backdoor_eraser.training import Trainer, TrainConfig
    from backdoor_eraser.workflows import load_data

    splits = load_data("cifar10", a.data_dir)
    sub = splits.train.subset(torch.arange(a.images))
    controlled = {}
    for amp, cl in (("none", False), ("none", True), ("bf16", False), ("bf16", True)):
        model = new_model("wrn-16-1", splits.train.classes, splits.train.shape, Normalization(), torch.device("cpu"), 0)
        cfg = TrainConfig(epochs=a.epochs, batch_size=128, lr=0.1, weight_decay=5e-4, schedule="constant", amp=amp,
                          channels_last=cl, seed=0)
        res = Trainer(cfg, quiet=True).fit(model, sub)
        label = ("bf16" if amp == "bf16" else "fp32") + (" + channels-last" if cl else "")
        controlled[label] = [{k: r[k] for k in ("epoch", "loss", "train_acc", "images_per_s")} for r in res.history]
        print(label, controlled[label], flush=True)

    full = {}
    for label, run in (("fp32", WORK / "core" / "badnets"), ("bf16 + channels-last", WORK / "attacks" / "badnets-bf16")):
        if (run / "metrics.json").exists():
            m = json.loads((run / "metrics.json").read_text())
            hist = (run / "history.csv").read_text().splitlines()
            head = hist[0].split(",")
            acc_curve = [round(float(r.split(",")[head.index("train_acc")]), 4) for r in hist[1:]]
            full[label] = {"acc": m["acc"], "asr": m["asr"], "train_acc_per_epoch": acc_curve}
    (RESULTS / "precision_cifar10.json").write_text(json.dumps({"controlled": controlled, "full": full}, indent=2) + "\n")

    lines = ["| setting | " + " | ".join(f"epoch {e + 1} loss / train acc" for e in range(a.epochs)) + " | images/s |",
             "|---|" + "---|" * a.epochs + "---|"]
    for label, hist in controlled.items():
        cells = " | ".join(f"{r['loss']:.3f} / {r['train_acc']:.3f}" for r in hist)
        ips = sum(r["images_per_s"] for r in hist) / len(hist)
        lines.append(f"| {label} | {cells} | {ips:.0f} |")
    flines = ["| run | ACC | ASR | train accuracy per epoch |", "|---|---|---|---|"]
    for label, f in full.items():
        flines.append(f"| {label} | {100 * f['acc']:.2f} | {100 * f['asr']:.2f} | "
                      f"{', '.join(f'{v:.2f}' for v in f['train_acc_per_epoch'])} |")
    text = ["# fp32 vs bf16 autocast on this CPU (WRN-16-1, CIFAR-10)", "",
            f"**Controlled** (same seed and data: the first {a.images:,} clean training images, {a.epochs} epochs, "
            "SGD lr 0.1 constant, batch 128, crop + flip, 2 threads):", "", *lines, "",
            "**Full 20-epoch BadNets runs** (core recipe; the fp32 run is the core benchmark's, which was "
            "interrupted and resumed with other thread counts, so the two are not the same trajectory):", "",
            *flines, "",
            "Reproduce: `python benchmarks/precision_cifar10.py --data-dir benchmarks/work/cifar10_jpeg` (the full "
            "runs come from core_cifar10.py and attacks_cifar10.py)."]
    (RESULTS / "precision_cifar10.md").write_text("\n".join(text) + "\n")
    print("\n".join(lines + [""] + flines))


if __name__ == "__main__":
    main()
