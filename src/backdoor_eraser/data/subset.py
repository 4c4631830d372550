"""Seeded, stratified selection of the defender's clean subset."""
from __future__ import annotations

import math

import torch

from ..errors import UserError
from .dataset import ImageDataset


def select_clean_subset(labels: torch.Tensor, *, fraction: float | None = None, count: int | None = None,
                        seed: int = 0, num_classes: int | None = None) -> torch.Tensor:
    """Indices (sorted, int64) of a class-stratified random subset.

    Give exactly one of ``fraction`` (0 < f ≤ 1) or ``count``. Each class gets
    its share of the total, rounded by largest remainder so the sizes add up
    exactly; the same seed always gives the same indices.
    """
    n = len(labels)
    if (fraction is None) == (count is None):
        raise UserError("give exactly one of a clean fraction or a clean count")
    if fraction is not None:
        if not (0 < fraction <= 1) or math.isnan(fraction):
            raise UserError(f"clean fraction must be in (0, 1], got {fraction}")
        total = max(1, round(fraction * n))
    else:
        if not (0 < count <= n):
            raise UserError(f"clean count must be in [1, {n}], got {count}")
        total = int(count)
    num_classes = num_classes or int(labels.max()) + 1
    per_class = torch.bincount(labels, minlength=num_classes)
    exact = per_class.double() * total / n
    take = exact.floor().long()
    short = total - int(take.sum())
    if short > 0:  # largest remainder, ties to the lower class id
        order = sorted(range(num_classes), key=lambda c: (-(exact[c] - take[c]).item(), c))
        for c in order[:short]:
            take[c] += 1
    g = torch.Generator().manual_seed(seed)
    chosen = []
    for c in range(num_classes):
        members = torch.nonzero(labels == c).flatten()
        if take[c] > 0:
            chosen.append(members[torch.randperm(len(members), generator=g)[: take[c]]])
    return torch.sort(torch.cat(chosen)).values


def clean_subset(dataset: ImageDataset, *, fraction: float | None = None, count: int | None = None,
                 seed: int = 0) -> ImageDataset:
    """The clean subset itself (``.index`` holds the chosen indices)."""
    idx = select_clean_subset(dataset.labels, fraction=fraction, count=count, seed=seed,
                              num_classes=dataset.num_classes)
    return dataset.subset(idx, name=f"{dataset.name}-clean")


# Fixed, so that every clean-subset seed is judged on (nearly) the same images.
VALIDATION_SEED = 20211
VALIDATION_COUNT = 2000


def select_validation(n_train: int, exclude: torch.Tensor | list[int], *, count: int = VALIDATION_COUNT,
                      seed: int = VALIDATION_SEED) -> torch.Tensor:
    """Indices (sorted) of ``count`` training images outside ``exclude`` (the clean subset, and the
    poisoned images where known): the developers' validation set.

    A defense never sees them. They let defaults be chosen without the test split: ACC on them (of
    images the backdoored model trained on, so a proxy for how much a defense damages it) and, triggered,
    ASR. The test split stays for reporting only."""
    keep = torch.ones(n_train, dtype=torch.bool)
    keep[torch.as_tensor(exclude, dtype=torch.int64)] = False
    pool = torch.nonzero(keep).flatten()
    g = torch.Generator().manual_seed(seed)
    return torch.sort(pool[torch.randperm(len(pool), generator=g)[: min(count, len(pool))]]).values
