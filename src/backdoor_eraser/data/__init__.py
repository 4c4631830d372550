"""Data sets as uint8 tensors in memory, looked up by name.

``load_dataset("cifar10", data_dir)`` returns :class:`DataSplits` (train and
test :class:`ImageDataset`). Loaders take paths; nothing is read from a fixed
location.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..errors import UserError
from ..registry import Registry
from .dataset import DataSplits, ImageDataset

DATASETS: Registry[Callable[..., DataSplits]] = Registry("dataset")


def load_dataset(name: str, data_dir: str | Path | None = None, **options) -> DataSplits:
    """Load data set ``name`` (see ``DATASETS.names()``) from ``data_dir``."""
    loader = DATASETS.get(name)
    needs_dir = getattr(loader, "needs_data_dir", True)
    if needs_dir and data_dir is None:
        raise UserError(f"dataset {name!r} needs --data-dir")
    splits = loader(data_dir, **options)
    where = f"dataset {name!r}" + (f" in {data_dir}" if data_dir is not None else "")
    if splits.train.num_classes < 2:
        raise UserError(f"{where} has {splits.train.num_classes} class ({', '.join(splits.train.classes)}); "
                        "a classifier needs at least 2 classes")
    for part in ("train", "test"):
        if len(getattr(splits, part)) == 0:
            raise UserError(f"{where} has no {part} images")
    return splits


# Importing the modules registers their loaders.
from . import cifar10, folder, gtsrb, mnist, synthetic  # noqa: E402,F401

__all__ = ["DATASETS", "DataSplits", "ImageDataset", "load_dataset"]
