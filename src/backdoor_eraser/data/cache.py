"""A cache of decoded data splits as safetensors files, for the image-tree loaders.

Decoding tens of thousands of JPEG/PPM files takes far longer than reading one
uint8 tensor file, so the loaders that read image trees (cifar10 JPEG tree,
gtsrb, folder) store what they decoded in ``cache_dir`` and reuse it while the
source folder is unchanged. The cache never lives in the data folder, which
may be read-only.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Callable

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .dataset import DataSplits, ImageDataset

CACHE_ENV = "BACKDOOR_ERASER_CACHE"
# Bump when the decoding changes in a way that changes the tensors.
CACHE_VERSION = 1


def resolve_cache_dir(cache_dir: str | Path | bool | None = None) -> Path | None:
    """The folder to cache in: ``cache_dir`` itself, the default when None/True, or None when False."""
    if cache_dir is False:
        return None
    if cache_dir is None or cache_dir is True:
        env = os.environ.get(CACHE_ENV)
        return Path(env).expanduser() if env else Path.home() / ".cache" / "backdoor-eraser"
    return Path(cache_dir).expanduser()


def tree_fingerprint(path: str | Path) -> str:
    """A digest of every file under ``path``: its relative path, size, mtime, ctime and inode.

    The newest mtime alone misses a file replaced by one with an older mtime (``cp -p``, ``tar x``,
    ``rsync -t``); a replaced file has a new inode or ctime, and ctime cannot be set back by the user.
    """
    root = Path(path)
    rows = []
    stack = [root]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=True):
                    stack.append(Path(entry.path))
                    continue
                st = entry.stat(follow_symlinks=True)
                rows.append(f"{os.path.relpath(entry.path, root)}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}"
                            f"\0{st.st_dev}\0{st.st_ino}")
    rows.sort()
    return hashlib.sha256("\n".join(rows).encode(errors="surrogateescape")).hexdigest()


def cache_key(loader: str, path: str | Path, options: dict) -> str:
    """A hex digest of the loader name, the resolved source path, the options and the source's fingerprint."""
    resolved = Path(path).resolve()
    blob = json.dumps({"v": CACHE_VERSION, "loader": loader, "path": str(resolved),
                       "options": options, "files": tree_fingerprint(resolved)},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def save_splits(splits: DataSplits, file: Path) -> None:
    """Write ``splits`` to ``file`` atomically (a half-written file is never picked up)."""
    tensors, meta = {}, {"meta": json.dumps(splits.meta, default=str)}
    for part in ("train", "test"):
        ds: ImageDataset = getattr(splits, part)
        tensors[f"{part}.images"] = ds.images.contiguous()
        tensors[f"{part}.labels"] = ds.labels.contiguous()
        tensors[f"{part}.index"] = ds.index.contiguous()
        meta[f"{part}.classes"] = json.dumps(ds.classes)
        meta[f"{part}.name"] = ds.name
    file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=file.name, suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, file)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_splits(file: Path) -> DataSplits:
    """Read splits written by :func:`save_splits`."""
    tensors = load_file(str(file))
    with safe_open(str(file), framework="pt") as f:
        meta = f.metadata()
    parts = [ImageDataset(tensors[f"{p}.images"], tensors[f"{p}.labels"], json.loads(meta[f"{p}.classes"]),
                          meta[f"{p}.name"], tensors[f"{p}.index"]) for p in ("train", "test")]
    return DataSplits(parts[0], parts[1], meta=json.loads(meta["meta"]))


def cached_splits(loader: str, source: str | Path, options: dict, cache_dir: str | Path | bool | None,
                  build: Callable[[], DataSplits]) -> DataSplits:
    """``build()``'s result, read from the cache when the same source and options were decoded before.

    A cache that cannot be written (read-only home, full disk) or read
    (truncated file) only costs time: the splits are rebuilt with a warning.
    """
    folder = resolve_cache_dir(cache_dir)
    if folder is None:
        return build()
    file = folder / f"{loader}-{cache_key(loader, source, options)[:24]}.safetensors"
    if file.is_file():
        try:
            return load_splits(file)
        except (OSError, SafetensorError, KeyError, ValueError, json.JSONDecodeError) as exc:
            warnings.warn(f"ignoring unreadable data cache {file}: {exc}", stacklevel=2)
    splits = build()
    try:
        save_splits(splits, file)
    except OSError as exc:
        warnings.warn(f"could not write data cache {file}: {exc}", stacklevel=2)
    return splits


__all__ = ["CACHE_ENV", "cache_key", "cached_splits", "load_splits", "resolve_cache_dir", "save_splits",
           "tree_fingerprint"]
