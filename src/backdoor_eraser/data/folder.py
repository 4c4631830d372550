"""Class-folder image trees: the "folder" data set and the image-tree reading the other loaders share.

``load_folder(DIR)`` accepts either

* ``DIR/train/<class>/*`` and ``DIR/test/<class>/*`` (also when DIR holds a
  single subfolder laid out like that), or
* ``DIR/<class>/*``, split into train and test per class with a seeded
  ``test_fraction``.

Images (jpg jpeg png ppm bmp gif webp, any case) are decoded with PIL,
converted to RGB and resized to ``size``×``size`` with bilinear filtering.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import UserError
from . import DATASETS
from .cache import cached_splits
from .dataset import DataSplits, ImageDataset

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".gif", ".webp"})
# Images per thread-pool task: large enough that task overhead is negligible.
_CHUNK = 256


def existing_dir(data_dir: str | Path | None, what: str) -> Path:
    """``data_dir`` as a Path, or a UserError when it is missing or not a folder."""
    if data_dir is None:
        raise UserError(f"{what} needs a data folder")
    path = Path(data_dir).expanduser()
    if not path.exists():
        raise UserError(f"{what} data folder {path} does not exist")
    if not path.is_dir():
        raise UserError(f"{what} data path {path} is not a folder")
    return path


def _subdirs(path: Path) -> list[Path]:
    return sorted((p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def locate(data_dir: Path, accept: Callable[[Path], bool], nested: Sequence[str] = ()) -> Path | None:
    """The folder, among ``data_dir``, its subfolders and their ``nested`` children, that ``accept`` takes.

    ``data_dir`` (and its ``nested`` children) win outright; otherwise exactly
    one subfolder may match, so archives that unpack into one top folder
    (``cifar10_jpeg/``, ``gtsrb32/``) work when given their parent.
    """
    def candidates(base: Path) -> list[Path]:
        return [base, *(base / n for n in nested)]

    for cand in candidates(data_dir):
        if accept(cand):
            return cand
    found = [c for sub in _subdirs(data_dir) for c in candidates(sub) if accept(c)]
    if len(found) > 1:
        raise UserError(f"{data_dir} holds several data sets ({', '.join(str(f) for f in found)}); point at one of them")
    return found[0] if found else None


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".") and path.is_file()


def list_class_tree(split_dir: Path, classes: Sequence[str] | None = None, *,
                    require_all: bool = True) -> tuple[list[Path], list[int], list[str]]:
    """Image paths (class by class, files sorted by name), their labels and the class names.

    Classes are the sorted subfolder names unless ``classes`` gives the order;
    then a subfolder not in ``classes`` is an error, and so is a missing one
    when ``require_all``.
    """
    split_dir = existing_dir(split_dir, "image tree")
    folders = {p.name: p for p in _subdirs(split_dir)}
    if classes is None:
        classes = sorted(folders)
        if not classes:
            raise UserError(f"{split_dir} has no class subfolders (expected {split_dir}/<class>/<image files>)")
    classes = list(classes)
    extra = sorted(set(folders) - set(classes))
    if extra:
        raise UserError(f"{split_dir} has class folders not in the class list {classes}: {', '.join(extra)}")
    missing = [c for c in classes if c not in folders]
    if missing and require_all:
        raise UserError(f"{split_dir} lacks class folders: {', '.join(missing)}")
    paths, labels = [], []
    for label, name in enumerate(classes):
        if name not in folders:
            continue
        files = sorted((p for p in folders[name].iterdir() if is_image_file(p)), key=lambda p: p.name)
        if not files:
            raise UserError(f"class folder {folders[name]} holds no images "
                            f"({' '.join(sorted(e[1:] for e in IMAGE_EXTENSIONS))})")
        paths += files
        labels += [label] * len(files)
    return paths, labels, classes


def _decode_one(path: Path, size: int | None) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UserError(f"cannot decode image {path}: {exc}") from None


def decode_images(paths: Sequence[Path], size: int | None = None, workers: int | None = None) -> torch.Tensor:
    """The images at ``paths`` as one uint8 N×3×H×W tensor, in the order given.

    With ``size`` every image is resized to size×size (PIL bilinear);
    without, all images must already share one size.
    """
    paths = list(paths)
    if size is not None and (not isinstance(size, int) or size < 1):
        raise UserError(f"image size must be a positive integer, got {size!r}")
    if not paths:
        raise UserError("no images to decode")
    first = _decode_one(paths[0], size)
    out = np.empty((len(paths), *first.shape), dtype=np.uint8)

    def work(start: int) -> None:
        for i in range(start, min(start + _CHUNK, len(paths))):
            arr = first if i == 0 else _decode_one(paths[i], size)
            if arr.shape != first.shape:
                raise UserError(f"image {paths[i]} is {arr.shape[1]}×{arr.shape[0]} but {paths[0]} is "
                                f"{first.shape[1]}×{first.shape[0]}; pass a size to resize all images")
            out[i] = arr

    # PIL releases the GIL while decoding, so threads overlap; map() keeps the order deterministic.
    workers = workers or max(2, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(work, range(0, len(paths), _CHUNK)))
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def read_class_tree(split_dir: str | Path, classes: Sequence[str] | None = None, size: int | None = None, *,
                    require_all: bool = True) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Decode ``split_dir/<class>/*`` into (uint8 N×3×H×W images, int64 labels, class names).

    Order: class by class (sorted names, or the order of ``classes``), files
    sorted by name within a class.
    """
    paths, labels, classes = list_class_tree(Path(split_dir), classes, require_all=require_all)
    return decode_images(paths, size), torch.tensor(labels, dtype=torch.int64), classes


def stratified_split(labels: torch.Tensor, test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted (train, test) positions; each class with ≥ 2 samples puts ≥ 1 in each part."""
    if not (0 < test_fraction < 1):
        raise UserError(f"test_fraction must be between 0 and 1 (exclusive), got {test_fraction}")
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_test = min(max(round(len(idx) * test_fraction), 1), len(idx) - 1) if len(idx) > 1 else 0
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def _has_splits(path: Path) -> bool:
    return (path / "train").is_dir() and (path / "test").is_dir()


def _build_folder(root: Path, split_root: bool, size: int | None, test_fraction: float, seed: int) -> DataSplits:
    meta = {"dataset": "folder", "root": str(root), "size": size}
    if split_root:
        tr_x, tr_y, classes = read_class_tree(root / "train", size=size)
        te_x, te_y, _ = read_class_tree(root / "test", classes, size=size, require_all=False)
        meta["split"] = "train/test folders"
        return DataSplits(ImageDataset(tr_x, tr_y, classes, root.name),
                          ImageDataset(te_x, te_y, list(classes), root.name), meta)
    x, y, classes = read_class_tree(root, size=size)
    tr, te = stratified_split(y, test_fraction, seed)
    meta.update(split="stratified", test_fraction=test_fraction, seed=seed)
    return DataSplits(ImageDataset(x[tr], y[tr], classes, root.name),
                      ImageDataset(x[te], y[te], list(classes), root.name), meta)


def load_folder(data_dir, *, size: int | None = 32, test_fraction: float = 0.2, seed: int = 0,
                cache_dir: str | Path | bool | None = None) -> DataSplits:
    """Any class-folder image tree.

    Accepts ``DIR/train/<class>/*`` + ``DIR/test/<class>/*`` (or a parent
    holding one such folder), else ``DIR/<class>/*`` split per class by a
    seeded ``test_fraction``. Images are converted to RGB and resized to
    ``size`` (None keeps their size, which must then be uniform). Decoded
    splits are cached in ``cache_dir`` (False: no cache).
    """
    path = existing_dir(data_dir, "folder")
    found = locate(path, _has_splits)
    root, split_root = (found, True) if found is not None else (path, False)
    if not split_root and not (0 < test_fraction < 1):
        raise UserError(f"test_fraction must be between 0 and 1 (exclusive), got {test_fraction}")
    options = {"size": size} if split_root else {"size": size, "test_fraction": test_fraction, "seed": seed}
    return cached_splits("folder", root, options, cache_dir,
                         lambda: _build_folder(root, split_root, size, test_fraction, seed))


DATASETS.register("folder", help="any class-folder image tree: DIR/{train,test}/<class>/* or DIR/<class>/*")(load_folder)

__all__ = ["IMAGE_EXTENSIONS", "decode_images", "list_class_tree", "load_folder", "locate", "read_class_tree",
           "stratified_split"]
