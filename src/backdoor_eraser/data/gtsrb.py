"""GTSRB, the German Traffic Sign Recognition Benchmark (Stallkamp et al. 2012): 43 classes.

``load_gtsrb(data_dir)`` accepts the official tree

* ``GTSRB/Final_Training/Images/000NN/*.ppm`` with ``GT-000NN.csv`` per class, and
* ``GTSRB/Final_Test/Images/*.ppm`` with labels in ``GT-final_test.csv``
  (from ``GTSRB_Final_Test_GT.zip``), in ``Final_Test/`` or ``Final_Test/Images/``,

where ``data_dir`` is ``GTSRB`` itself, its parent, or a folder holding one
such parent (e.g. ``gtsrb32/``). The csv files are semicolon-separated with
``Filename`` and ``ClassId`` columns. Whole images (no ROI crop) are resized to
``size``×``size`` with PIL bilinear filtering. Classes are named
``"00000"``..``"00042"`` after the official folders, in ClassId order.
"""
from __future__ import annotations

import csv
from pathlib import Path

import torch

from ..errors import UserError
from . import DATASETS
from .cache import cached_splits
from .dataset import DataSplits, ImageDataset
from .folder import decode_images, existing_dir, is_image_file, locate

NUM_CLASSES = 43
GTSRB_CLASSES = [f"{i:05d}" for i in range(NUM_CLASSES)]


def read_gt_csv(file: Path, need_label: bool = True) -> list[tuple[str, int]]:
    """(Filename, ClassId) rows of a GTSRB ground-truth csv (semicolon-separated)."""
    try:
        with open(file, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, delimiter=";")
            fields = [h.strip() for h in reader.fieldnames or []]
            if "Filename" not in fields or (need_label and "ClassId" not in fields):
                raise UserError(f"{file} is not a GTSRB ground-truth csv (needs Filename;...;ClassId columns, "
                                f"found {';'.join(fields)})")
            reader.fieldnames = fields
            return [(row["Filename"].strip(), _class_id(row["ClassId"], file)) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"cannot read {file}: {exc}") from None


def _class_id(value: str | None, file: Path) -> int:
    try:
        label = int(str(value).strip())
    except ValueError:
        raise UserError(f"{file}: ClassId {value!r} is not an integer") from None
    if not 0 <= label < NUM_CLASSES:
        raise UserError(f"{file}: ClassId {label} is outside 0..{NUM_CLASSES - 1}")
    return label


def _has_csv_label_column(file: Path) -> bool:
    with open(file, newline="", encoding="utf-8-sig") as f:
        header = f.readline()
    return "ClassId" in [h.strip() for h in header.split(";")]


def _is_gtsrb_root(path: Path) -> bool:
    return (path / "Final_Training" / "Images").is_dir() and (path / "Final_Test" / "Images").is_dir()


def _existing(folder: Path, names: list[str], csv_file: Path) -> list[Path]:
    paths = [folder / n for n in names]
    for p in paths:
        if not p.is_file():
            raise UserError(f"{csv_file} lists {p.name}, which is missing from {folder}")
    return paths


def gtsrb_train_files(root: Path) -> tuple[list[Path], list[int]]:
    """Training images class folder by class folder, in the order of each ``GT-000NN.csv``.

    A class folder without its csv falls back to sorted file names, labelled by the folder name.
    """
    images_dir = root / "Final_Training" / "Images"
    paths, labels = [], []
    for folder in sorted(p for p in images_dir.iterdir() if p.is_dir()):
        gt = folder / f"GT-{folder.name}.csv"
        if gt.is_file():
            rows = read_gt_csv(gt)
            paths += _existing(folder, [r[0] for r in rows], gt)
            labels += [r[1] for r in rows]
        else:
            files = sorted(p for p in folder.iterdir() if is_image_file(p))
            paths += files
            labels += [_class_id(folder.name, folder)] * len(files)
    if not paths:
        raise UserError(f"{images_dir} holds no class folders with images (expected 00000/ .. 00042/)")
    return paths, labels


def gtsrb_test_files(root: Path) -> tuple[list[Path], list[int]]:
    """Test images in the order of the labelled ``GT-final_test.csv``."""
    test_dir = root / "Final_Test"
    candidates = [test_dir / "GT-final_test.csv", test_dir / "Images" / "GT-final_test.csv",
                  *sorted(test_dir.glob("GT-final_test*.csv")), *sorted((test_dir / "Images").glob("GT-final_test*.csv"))]
    # The csv shipped inside Final_Test/Images has no ClassId column; the labels come in a separate download.
    gt = next((c for c in candidates if c.is_file() and _has_csv_label_column(c)), None)
    if gt is None:
        raise UserError(f"no GTSRB test labels: put GT-final_test.csv (with a ClassId column, from "
                        f"GTSRB_Final_Test_GT.zip) into {test_dir} or {test_dir / 'Images'}")
    rows = read_gt_csv(gt)
    if not rows:
        raise UserError(f"{gt} lists no test images")
    return _existing(test_dir / "Images", [r[0] for r in rows], gt), [r[1] for r in rows]


def _build(root: Path, size: int) -> DataSplits:
    parts = []
    for paths, labels in (gtsrb_train_files(root), gtsrb_test_files(root)):
        parts.append(ImageDataset(decode_images(paths, size), torch.tensor(labels, dtype=torch.int64),
                                  list(GTSRB_CLASSES), "gtsrb"))
    return DataSplits(parts[0], parts[1], {"dataset": "gtsrb", "path": str(root), "size": size})


def load_gtsrb(data_dir, *, size: int = 32, cache_dir: str | Path | bool | None = None) -> DataSplits:
    """GTSRB from the official folder tree (see the module docstring), resized to ``size``.

    Decoded splits are cached in ``cache_dir`` (False: no cache).
    """
    if not isinstance(size, int) or size < 1:
        raise UserError(f"gtsrb size must be a positive integer, got {size!r}")
    path = existing_dir(data_dir, "gtsrb")
    root = locate(path, _is_gtsrb_root, nested=("GTSRB",))
    if root is None:
        raise UserError(f"no GTSRB tree in {path}: expected GTSRB/Final_Training/Images/000NN/ and "
                        "GTSRB/Final_Test/Images/ (with GT-final_test.csv)")
    return cached_splits("gtsrb", root, {"size": size}, cache_dir, lambda: _build(root, size))


DATASETS.register("gtsrb", help="GTSRB traffic signs (43 classes) from the official Final_Training/Final_Test tree")(load_gtsrb)

__all__ = ["GTSRB_CLASSES", "load_gtsrb", "read_gt_csv", "gtsrb_test_files", "gtsrb_train_files"]
