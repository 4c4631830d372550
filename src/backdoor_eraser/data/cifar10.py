"""CIFAR-10 (Krizhevsky 2009): 50,000 train / 10,000 test 32×32 RGB images, 10 classes.

``load_cifar10(data_dir)`` accepts

a. the official ``cifar-10-python.tar.gz`` (md5-checked, read without extracting), or a folder holding it;
b. the extracted ``cifar-10-batches-py`` folder, or a folder holding it;
c. a class-folder image tree ``DIR/{train,test}/<class>/*.jpg`` (or a parent with one such
   folder, e.g. ``cifar10_jpeg/``), with optional ``classes.txt`` and
   ``{train,test}_index_to_jpeg.tsv`` (official index, label, path) restoring the official order;
d. with ``download=True``, a folder without any of these: the tarball is downloaded into it.

The official batches are Python pickles; they are read with an unpickler that
only rebuilds numpy arrays, so a tampered file cannot run code.
"""
from __future__ import annotations

import csv
import hashlib
import importlib
import io
import os
import pickle
import sys
import tarfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from ..errors import UserError
from . import DATASETS
from .cache import cached_splits
from .dataset import DataSplits, ImageDataset
from .folder import IMAGE_EXTENSIONS, decode_images, existing_dir, list_class_tree, locate

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
TARBALL_NAME = "cifar-10-python.tar.gz"
BATCHES_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_BATCH = "test_batch"


# ---------------------------------------------------------------- safe batch unpickling

def _numpy_attr(suffix: str, name: str):
    # numpy 2 moved numpy.core to numpy._core; importing the old path only warns, but the new one is the real object.
    for prefix in ("numpy._core", "numpy.core"):
        try:
            return getattr(importlib.import_module(f"{prefix}.{suffix}"), name)
        except (ImportError, AttributeError):
            continue
    return None


def _allowed_globals() -> dict[tuple[str, str], object]:
    reconstruct = _numpy_attr("multiarray", "_reconstruct")
    frombuffer = _numpy_attr("numeric", "_frombuffer")
    allowed: dict[tuple[str, str], object] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for prefix in ("numpy._core", "numpy.core"):
        if reconstruct is not None:
            allowed[(f"{prefix}.multiarray", "_reconstruct")] = reconstruct
        if frombuffer is not None:  # protocol-5 pickles of numpy arrays
            allowed[(f"{prefix}.numeric", "_frombuffer")] = frombuffer
    # Python 3 writes bytes in protocol-2 pickles as _codecs.encode(str, "latin1"): a pure conversion.
    import _codecs
    allowed[("_codecs", "encode")] = _codecs.encode
    return allowed


class BatchUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batches, refusing every global except numpy array reconstruction."""

    _allowed = _allowed_globals()

    def find_class(self, module: str, name: str):
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UserError(f"refusing to unpickle {module}.{name}: this is not a plain CIFAR-10 batch "
                            "(the file may be tampered with; use the official cifar-10-python.tar.gz)") from None


def read_batch(fileobj: BinaryIO, name: str) -> tuple[np.ndarray, np.ndarray]:
    """One official batch as (uint8 N×3×32×32 images, int64 labels)."""
    try:
        batch = BatchUnpickler(fileobj, encoding="bytes").load()
    except UserError:
        raise
    except Exception as exc:  # a corrupt pickle can raise almost anything
        raise UserError(f"{name} is not a readable CIFAR-10 batch: {type(exc).__name__}: {exc}") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise UserError(f"{name} is not a CIFAR-10 batch (expected a dict with b'data' and b'labels')")
    data, labels = batch[b"data"], np.asarray(batch[b"labels"])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise UserError(f"{name}: b'data' must be an N×3072 uint8 array")
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer) \
            or (len(labels) and (labels.min() < 0 or labels.max() > 9)):
        raise UserError(f"{name}: b'labels' must hold one label in 0..9 per image")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _splits_from_batches(batches: dict[str, tuple[np.ndarray, np.ndarray]], source: str, path: Path) -> DataSplits:
    missing = [b for b in [*TRAIN_BATCHES, TEST_BATCH] if b not in batches]
    if missing:
        raise UserError(f"{path} lacks CIFAR-10 batches: {', '.join(missing)}")
    tr_x = np.concatenate([batches[b][0] for b in TRAIN_BATCHES])
    tr_y = np.concatenate([batches[b][1] for b in TRAIN_BATCHES])
    te_x, te_y = batches[TEST_BATCH]
    meta = {"dataset": "cifar10", "source": source, "path": str(path)}
    return DataSplits(ImageDataset(torch.from_numpy(tr_x.copy()), torch.from_numpy(tr_y), list(CIFAR10_CLASSES), "cifar10"),
                      ImageDataset(torch.from_numpy(te_x.copy()), torch.from_numpy(te_y), list(CIFAR10_CLASSES), "cifar10"),
                      meta)


# ---------------------------------------------------------------- tarball and batches folder

def file_md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_md5(path: Path) -> None:
    """UserError unless ``path`` has the official tarball's md5."""
    actual = file_md5(path)
    if actual != CIFAR10_MD5:
        hint = ("the file is corrupt or a different version, download it again" if path.name.startswith(TARBALL_NAME)
                else "an archive of an image tree must be unpacked first and its folder passed")
        raise UserError(f"{path} has md5 {actual}, expected {CIFAR10_MD5} for the official {TARBALL_NAME}; {hint}")


def load_tarball(path: Path) -> DataSplits:
    """Splits read straight from the official tarball (md5-checked, nothing extracted)."""
    check_md5(path)
    wanted = {*TRAIN_BATCHES, TEST_BATCH}
    batches = {}
    try:
        # One sequential pass: seeking backwards in a gzip stream would decompress it again.
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:
                name = member.name.rsplit("/", 1)[-1]
                if member.isfile() and name in wanted:
                    batches[name] = read_batch(io.BytesIO(tar.extractfile(member).read()), f"{path}:{member.name}")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise UserError(f"cannot read {path} as a tar.gz archive: {exc}") from None
    return _splits_from_batches(batches, "tarball", path)


def _is_batches_dir(path: Path) -> bool:
    return (path / TEST_BATCH).is_file() and (path / TRAIN_BATCHES[0]).is_file()


def load_batches_dir(path: Path) -> DataSplits:
    """Splits read from an extracted ``cifar-10-batches-py`` folder."""
    batches = {}
    for name in [*TRAIN_BATCHES, TEST_BATCH]:
        if (path / name).is_file():
            with open(path / name, "rb") as f:
                batches[name] = read_batch(f, str(path / name))
    return _splits_from_batches(batches, "batches", path)


# ---------------------------------------------------------------- image tree

def _read_classes_txt(root: Path) -> list[str] | None:
    file = root / "classes.txt"
    if not file.is_file():
        return None
    classes = [line.strip() for line in file.read_text().splitlines() if line.strip()]
    if not classes or len(set(classes)) != len(classes):
        raise UserError(f"{file} must list each class name once, one per line")
    return classes


def read_index_tsv(file: Path) -> list[tuple[int, int, str]]:
    """Rows (official index, label, relative path) of an ``*_index_to_jpeg.tsv``, sorted by index.

    A header line is recognised by a non-numeric first field; with a header
    the columns are found by name (index / label / *path*), else by position.
    """
    with open(file, newline="") as f:
        rows = [r for r in csv.reader(f, delimiter="\t") if r and any(x.strip() for x in r)]
    cols, first_line = (0, 1, 2), 1
    if rows and not rows[0][0].strip().lstrip("-").isdigit():
        header, first_line = [h.strip().lower() for h in rows.pop(0)], 2
        try:
            cols = (header.index("index"), header.index("label"),
                    next(i for i, h in enumerate(header) if "path" in h or "file" in h))
        except (ValueError, StopIteration):
            raise UserError(f"{file}: header {header} needs index, label and path columns") from None
    out = []
    for lineno, row in enumerate(rows, start=first_line):
        try:
            out.append((int(row[cols[0]]), int(row[cols[1]]), row[cols[2]].strip()))
        except (ValueError, IndexError):
            raise UserError(f"{file}: row {lineno} is not 'index<TAB>label<TAB>path': {row}") from None
    out.sort()
    if [r[0] for r in out] != list(range(len(out))):
        raise UserError(f"{file}: the official indices must be 0..{len(out) - 1}, each once")
    return out


def _tsv_path(root: Path, split: str, rel: str, file: Path) -> Path:
    if Path(rel).is_absolute() or ".." in Path(rel).parts:
        raise UserError(f"{file}: path {rel} must be relative to {root} without '..'")
    for cand in (root / rel, root / split / rel):
        if cand.is_file():
            return cand
    raise UserError(f"{file} lists {rel}, which is not under {root}")


def _ordered_by_tsv(root: Path, split: str, classes: list[str], file: Path) -> tuple[list[Path], list[int]]:
    rows = read_index_tsv(file)
    paths = [_tsv_path(root, split, rel, file) for _, _, rel in rows]
    labels = [label for _, label, _ in rows]
    for (idx, label, rel), path in zip(rows, paths):
        folder = path.parent.name
        if not 0 <= label < len(classes) or (folder in classes and classes.index(folder) != label):
            raise UserError(f"{file}: index {idx} has label {label} but {rel} is in class folder {folder!r} "
                            f"(classes: {', '.join(classes)})")
    on_disk = sum(1 for p in (root / split).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if on_disk != len(rows):
        raise UserError(f"{root / split} holds {on_disk} images but {file.name} lists {len(rows)}; "
                        "the tree is incomplete or the tsv belongs to another copy")
    return paths, labels


def read_tree_split(root: str | Path, split: str) -> ImageDataset:
    """One split (``"train"`` or ``"test"``) of a CIFAR-10 image tree rooted at ``root``.

    Sample order is the official one when ``{split}_index_to_jpeg.tsv``
    exists, else class by class with files sorted by name. Classes follow
    ``classes.txt`` when present, else the sorted folder names (which for
    CIFAR-10 is the official order).
    """
    root = Path(root)
    classes = _read_classes_txt(root)
    tsv = root / f"{split}_index_to_jpeg.tsv"
    if classes is None:
        classes = list_class_tree(root / split)[2]
    if tsv.is_file():
        paths, labels = _ordered_by_tsv(root, split, classes, tsv)
    else:
        paths, labels, classes = list_class_tree(root / split, classes)
    return ImageDataset(decode_images(paths, size=None), torch.tensor(labels, dtype=torch.int64),
                        list(classes), "cifar10")


def _is_tree_root(path: Path) -> bool:
    return (path / "train").is_dir() and (path / "test").is_dir()


def load_tree(root: Path, cache_dir=None) -> DataSplits:
    """Both splits of a CIFAR-10 image tree, cached after the first decode."""
    def build() -> DataSplits:
        return DataSplits(read_tree_split(root, "train"), read_tree_split(root, "test"),
                          {"dataset": "cifar10", "source": "image tree", "path": str(root)})

    return cached_splits("cifar10", root, {"source": "tree"}, cache_dir, build)


# ---------------------------------------------------------------- download

def download_cifar10(folder: str | Path) -> Path:
    """Download the official tarball into ``folder`` (md5-checked); returns its path."""
    folder = Path(folder).expanduser()
    target = folder / TARBALL_NAME
    part = folder / (TARBALL_NAME + ".part")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(CIFAR10_URL, timeout=60) as resp, open(part, "wb") as out:
            _copy_with_progress(resp, out, int(resp.headers.get("Content-Length") or 0) or None)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        part.unlink(missing_ok=True)
        raise UserError(f"downloading CIFAR-10 from {CIFAR10_URL} failed ({exc}); download {TARBALL_NAME} "
                        f"yourself and pass the file or its folder as the data dir") from None
    try:
        check_md5(part)
    except UserError:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, target)
    return target


def _copy_with_progress(src, dst, total: int | None) -> None:
    bar = None
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, desc=TARBALL_NAME)
    try:
        for block in iter(lambda: src.read(1 << 20), b""):
            dst.write(block)
            if bar is not None:
                bar.update(len(block))
    finally:
        if bar is not None:
            bar.close()


# ---------------------------------------------------------------- entry point

def _load_found(path: Path, cache_dir) -> DataSplits | None:
    if (path / TARBALL_NAME).is_file():
        return load_tarball(path / TARBALL_NAME)
    for cand in (path, path / BATCHES_DIR):
        if _is_batches_dir(cand):
            return load_batches_dir(cand)
    root = locate(path, _is_tree_root)
    return load_tree(root, cache_dir) if root is not None else None


def load_cifar10(data_dir, *, download: bool = False, cache_dir: str | Path | bool | None = None) -> DataSplits:
    """CIFAR-10 from the official tarball, an extracted batches folder or a JPEG/PNG class tree.

    See the module docstring for the accepted layouts. ``download=True``
    fetches the tarball into ``data_dir`` when nothing usable is there.
    ``cache_dir`` (False: none) caches decoded image trees.
    """
    if data_dir is None:
        raise UserError("cifar10 needs a data folder")
    path = Path(data_dir).expanduser()
    if path.is_file():
        if path.name.endswith((".tar.gz", ".tgz")):
            return load_tarball(path)
        raise UserError(f"{path} is a file but not {TARBALL_NAME}")
    if path.exists():
        found = _load_found(existing_dir(path, "cifar10"), cache_dir)
        if found is not None:
            return found
    if download:
        return load_tarball(download_cifar10(path))
    if not path.exists():
        raise UserError(f"cifar10 data folder {path} does not exist (--download, or download=True, fetches it)")
    raise UserError(f"no CIFAR-10 data in {path}: expected {TARBALL_NAME}, a {BATCHES_DIR} folder or "
                    "train/<class>/ and test/<class>/ image folders (--download fetches the tarball)")


DATASETS.register("cifar10", help="CIFAR-10: official tarball, cifar-10-batches-py, or a JPEG/PNG class tree")(load_cifar10)

__all__ = ["CIFAR10_CLASSES", "CIFAR10_MD5", "CIFAR10_URL", "BatchUnpickler", "check_md5", "download_cifar10",
           "load_batches_dir", "load_cifar10", "load_tarball", "load_tree", "read_batch", "read_index_tsv",
           "read_tree_split"]
