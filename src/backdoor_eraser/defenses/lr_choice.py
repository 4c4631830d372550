"""Choosing a defense's learning rate from the model and the clean subset alone (``auto_lr``).

The same lr restart is gentle on one model and wrecks another: BatchNorm makes the convolutions
scale-invariant, so the effective step is about lr / ‖w‖², and how large a model's weights are depends
on how it was trained (weight decay, schedule, epochs), which a defender does not know. The fixed lr 0.1
of the NAD family costs 10-16 ACC points on models trained with weight decay 5e-4 and 2-4 on the
releases' (benchmarks/results/zoo-v2-findings.md).

The probe asks the model directly. It splits the clean subset (seeded) into a fitting part and a
held-out part, fine-tunes a copy for one epoch at a constant lr on the fitting part, with the recipe's
batch size and augmentation, and measures accuracy on the held-out part. It tries the recipe's lr times
each of ``factors`` from the largest down and keeps the first whose held-out accuracy stays within
``tolerance`` of the model's own; the whole schedule of the defense (every stage) is then scaled by that
factor. No image outside the clean subset is read.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..classifier import Classifier
from ..data.dataset import ImageDataset
from ..errors import UserError
from ..metrics import accuracy
from ..training import TrainConfig, Trainer

PROBE_FILE = "lr_probe.json"


@dataclass
class LrChoice:
    """The chosen factor and what the probe saw: held-out accuracy before (``base``) and after one
    epoch at each lr tried (``tried``: [{"factor", "lr", "acc"}], in the order tried)."""

    factor: float
    lr: float
    base: float
    tried: list[dict] = field(default_factory=list)
    held_out: int = 0
    seconds: float = 0.0
    saturated: bool = False   # no lr passed: the smallest factor was taken

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_factors(factors, tolerance: float) -> None:
    if not factors or any(not 0 < f <= 1 for f in factors):
        raise UserError(f"lr factors must be a non-empty list of values in (0, 1], got {list(factors)}")
    if not 0 <= tolerance < 1:
        raise UserError(f"lr tolerance must be in [0, 1), got {tolerance}")


def split_for_probe(clean: ImageDataset, held_out: float, seed: int) -> tuple[ImageDataset, ImageDataset]:
    """A seeded (fit, held-out) split of the clean subset; the held-out part has at least one image."""
    n = len(clean)
    if n < 2:
        raise UserError(f"the lr probe needs at least 2 clean images, got {n}")
    k = min(n - 1, max(1, round(held_out * n)))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return clean.subset(perm[k:]), clean.subset(perm[:k])


def probe_lr(model: Classifier, clean: ImageDataset, recipe: TrainConfig, *, factors=(1.0, 0.5, 0.2, 0.1, 0.05),
             tolerance: float = 0.05, held_out: float = 0.2) -> LrChoice:
    """The largest of ``recipe.lr × factors`` whose one-epoch fine-tune keeps held-out accuracy ≥ the
    model's own − ``tolerance``; the smallest factor when none does. ``model`` is not modified."""
    check_factors(factors, tolerance)
    t0 = time.perf_counter()
    fit, val = split_for_probe(clean, held_out, recipe.seed)
    base = accuracy(model, val.images, val.labels)
    order = sorted(factors, reverse=True)
    tried = []
    for f in order:
        probe = dataclasses.replace(recipe, epochs=1, schedule="constant", lr=recipe.lr * f)
        copy = model.copy()
        Trainer(probe, desc=f"lr probe {probe.lr:g}", quiet=True).fit(copy, fit)
        acc = accuracy(copy, val.images, val.labels)
        tried.append({"factor": f, "lr": probe.lr, "acc": acc})
        if acc >= base - tolerance:
            break
    chosen = tried[-1]["factor"]
    return LrChoice(chosen, recipe.lr * chosen, base, tried, len(val), time.perf_counter() - t0,
                    saturated=tried[-1]["acc"] < base - tolerance)


def cached_probe(model: Classifier, clean: ImageDataset, recipe: TrainConfig, run_dir: Path | None, *,
                 factors, tolerance: float, held_out: float, quiet: bool = False) -> LrChoice:
    """:func:`probe_lr`, kept in ``run_dir/lr_probe.json`` so that a resumed run uses the choice the
    interrupted one made (and does not probe again)."""
    path = Path(run_dir) / PROBE_FILE if run_dir else None
    if path is not None and path.is_file():
        return LrChoice(**json.loads(path.read_text()))
    choice = probe_lr(model, clean, recipe, factors=factors, tolerance=tolerance, held_out=held_out)
    if not quiet:
        seen = ", ".join(f"{t['lr']:g}: {t['acc']:.3f}" for t in choice.tried)
        print(f"lr probe: held-out accuracy {choice.base:.3f} before, after one epoch at lr {seen}; "
              f"lr × {choice.factor:g}", flush=True)
        if choice.saturated:
            print(f"warning: no lr kept held-out accuracy within {tolerance:g} of the model's own; the "
                  "smallest factor is used (a very fragile model, or a tolerance too tight)", file=sys.stderr,
                  flush=True)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(choice.to_dict(), indent=1))
        tmp.replace(path)
    return choice
