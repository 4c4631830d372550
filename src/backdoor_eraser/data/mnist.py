"""MNIST (LeCun et al.): 60,000 train / 10,000 test 28×28 grey digits.

``load_mnist(data_dir)`` reads the four official idx files
(``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``), each raw or
``.gz``, from ``DIR``, ``DIR/raw`` or ``DIR/mnist/raw`` (also ``DIR/MNIST/raw``).
``size`` zero-pads the images symmetrically (e.g. 32 for LeNet-style
models); ``rgb=True`` repeats the grey channel three times.
"""
from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from . import DATASETS
from .dataset import DataSplits, ImageDataset
from .folder import existing_dir

MNIST_CLASSES = [str(i) for i in range(10)]
FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
         "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}
# idx magic: two zero bytes, dtype 0x08 (unsigned byte), number of dimensions.
IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801


def _find_file(folder: Path, name: str) -> Path | None:
    for cand in (folder / name, folder / f"{name}.gz"):
        if cand.is_file():
            return cand
    return None


def find_mnist_files(data_dir: Path) -> dict[str, Path]:
    """The four idx files, all from the first of DIR, DIR/raw, DIR/mnist/raw, DIR/MNIST/raw that has them."""
    for folder in (data_dir, data_dir / "raw", data_dir / "mnist" / "raw", data_dir / "MNIST" / "raw"):
        found = {key: _find_file(folder, name) for key, name in FILES.items()}
        if all(found.values()):
            return found  # type: ignore[return-value]
    raise UserError(f"no MNIST idx files in {data_dir} (or its raw/, mnist/raw/): need "
                    f"{', '.join(FILES.values())} (raw or .gz)")


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None


def parse_idx(data: bytes, magic: int, name: str) -> np.ndarray:
    """The uint8 array in an idx file, after checking its magic number and size."""
    if len(data) < 4:
        raise UserError(f"{name} is too short to be an idx file")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise UserError(f"{name}: magic number {found:#010x}, expected {magic:#010x}; not the right MNIST idx file")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise UserError(f"{name}: truncated idx header")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(dims, dtype=np.int64))
    if len(data) - header != expected:
        raise UserError(f"{name}: header promises {'×'.join(map(str, dims))} = {expected} bytes, "
                        f"file holds {len(data) - header}; the file is truncated or corrupt")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _read_split(images_file: Path, labels_file: Path) -> tuple[torch.Tensor, torch.Tensor]:
    images = parse_idx(_read_bytes(images_file), IMAGES_MAGIC, str(images_file))
    labels = parse_idx(_read_bytes(labels_file), LABELS_MAGIC, str(labels_file))
    if len(images) != len(labels):
        raise UserError(f"{images_file} has {len(images)} images but {labels_file} has {len(labels)} labels")
    if len(labels) and labels.max() > 9:
        raise UserError(f"{labels_file}: labels must be digits 0..9, found {int(labels.max())}")
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def _pad(images: torch.Tensor, size: int) -> torch.Tensor:
    h, w = images.shape[-2:]
    if size < max(h, w):
        raise UserError(f"mnist size must be at least {max(h, w)} (images are only padded, never shrunk), got {size}")
    top, left = (size - h) // 2, (size - w) // 2
    out = torch.zeros(*images.shape[:-2], size, size, dtype=images.dtype)
    out[..., top:top + h, left:left + w] = images
    return out


def load_mnist(data_dir, *, size: int | None = None, rgb: bool = False) -> DataSplits:
    """MNIST from the official idx files (see the module docstring); images 1×28×28 uint8 by default."""
    if size is not None and (not isinstance(size, int) or size < 1):
        raise UserError(f"mnist size must be a positive integer, got {size!r}")
    files = find_mnist_files(existing_dir(data_dir, "mnist"))
    parts = []
    for split in ("train", "test"):
        images, labels = _read_split(files[f"{split}_images"], files[f"{split}_labels"])
        if size is not None:
            images = _pad(images, size)
        if rgb:
            images = images.repeat(1, 3, 1, 1)
        parts.append(ImageDataset(images, labels, list(MNIST_CLASSES), "mnist"))
    meta = {"dataset": "mnist", "path": str(files["train_images"].parent), "size": size, "rgb": rgb}
    return DataSplits(parts[0], parts[1], meta)


DATASETS.register("mnist", help="MNIST digits from the four official idx files (raw or .gz)")(load_mnist)

__all__ = ["MNIST_CLASSES", "find_mnist_files", "load_mnist", "parse_idx"]
