"""Inference throughput of the layouts the toolkit's evaluation could use, on one model, alternating rounds.

Usage: python benchmarks/eval_throughput.py DATA_DIR [MODEL] > benchmarks/results/eval_throughput.md

WRN-16-1 forward on the first 4,096 CIFAR-10 test images, batches of 512 or 256, inputs contiguous (NCHW)
or channels-last; the last row is ``Classifier.predict`` itself. Also the largest logit difference to the
first layout and how many argmax labels differ. Run it alone: another job on the cores halves every number.
"""
from __future__ import annotations

import sys
import time

import torch

from backdoor_eraser.runs import load_model
from backdoor_eraser.workflows import load_data


def main(data_dir: str, model_dir: str = "zoo/v2-45ep-wd1e-4/badnets", rounds: int = 3) -> None:
    model, _ = load_model(model_dir, device=torch.device("cpu"))
    x = load_data("cifar10", data_dir).test.images[:4096]
    net = model.net.eval()

    def forward(bs: int, channels_last: bool):
        out = []
        with torch.no_grad():
            for i in range(0, len(x), bs):
                xi = model.prepare(x[i:i + bs])
                out.append(net(xi.contiguous(memory_format=torch.channels_last) if channels_last else xi))
        return torch.cat(out)

    variants = {"512, contiguous (before)": lambda: forward(512, False),
                "256, contiguous": lambda: forward(256, False),
                "256, channels-last inputs": lambda: forward(256, True),
                "Classifier.predict": lambda: model.predict(x)}
    best = {k: 0.0 for k in variants}
    outs = {}
    for _ in range(rounds):
        for name, fn in variants.items():
            t = time.perf_counter()
            outs[name] = fn()
            best[name] = max(best[name], len(x) / (time.perf_counter() - t))
    ref = outs["512, contiguous (before)"]
    print(f"# Evaluation throughput\n\n`python benchmarks/eval_throughput.py DATA_DIR {model_dir}`; torch "
          f"{torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads; best of {rounds} alternating rounds, {len(x)} test images.\n")
    print("| variant | images/s | max logit difference | argmax differences |\n|---|---|---|---|")
    for name, out in outs.items():
        if out.dim() == 1:
            diff, flips = "—", int((out != ref.argmax(1)).sum())
        else:
            diff, flips = f"{(out - ref).abs().max().item():.1e}", int((out.argmax(1) != ref.argmax(1)).sum())
        print(f"| {name} | {best[name]:,.0f} | {diff} | {flips} |")


if __name__ == "__main__":
    main(*sys.argv[1:])
