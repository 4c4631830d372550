"""A built-in, procedurally generated 10-class 32×32 RGB data set for the demo and tests.

Each class is a texture (stripes, checkerboard, rings, cross-hatch; coarse or
fine) with a random phase, colour tint, contrast and additive noise. A WRN-16-1 learns it to well above 90 % test accuracy in a
few epochs on a CPU, yet the texture cue lives everywhere in the image, so a
3×3 corner trigger is a distinct, learnable shortcut, like on natural images.
"""
from __future__ import annotations

import math

import torch

from . import DATASETS
from .dataset import DataSplits, ImageDataset

PATTERNS = ("vertical-stripes", "horizontal-stripes", "checkerboard", "rings", "cross-hatch")
CLASSES = [f"{pattern}-{band}" for band in ("coarse", "fine") for pattern in PATTERNS]


def make_synthetic(n: int, seed: int, size: int = 32, noise: float = 0.06, amplitude: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images (uint8 N×3×size×size) with balanced labels, fully determined by ``seed``.

    Class = pattern (5 kinds, each unchanged by a left-right flip, so flip augmentation keeps labels)
    × spatial frequency (coarse/fine); phase, centre, tint, contrast, brightness and noise vary.
    """
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    labels = labels[torch.randperm(n, generator=g)]
    pattern = labels % 5
    cycles = torch.where(labels < 5, 2.0, 4.5) * (1 + (torch.rand(n, generator=g) - 0.5) * 0.3)
    phase = (torch.rand(n, 2, generator=g) * 2 * math.pi)[:, :, None, None]
    coords = torch.linspace(0, 1, size)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    w = (2 * math.pi * cycles)[:, None, None]
    u, v = w * xx[None] + phase[:, 0], w * yy[None] + phase[:, 1]
    centre = 0.25 + 0.5 * torch.rand(n, 2, generator=g)
    radius = torch.sqrt((xx[None] - centre[:, 0, None, None]) ** 2 + (yy[None] - centre[:, 1, None, None]) ** 2)
    waves = torch.stack([
        torch.sin(u),                                   # vertical stripes
        torch.sin(v),                                   # horizontal stripes
        torch.sin(u) * torch.sin(v) * 1.6,              # checkerboard
        torch.sin(w * radius * 1.4 + phase[:, 0]),      # rings
        0.8 * (torch.sin((u + v) / 1.4) + torch.sin((u - v) / 1.4)),  # cross-hatch
    ], 1)
    wave = waves[torch.arange(n), pattern].clamp(-1, 1)
    # The texture is an "object" on a plain background, as in natural photos: it fades out towards
    # the border, so border pixels carry little class evidence.
    from_centre = torch.sqrt((xx - 0.5) ** 2 + (yy - 0.5) ** 2)
    wave = wave * (1 - ((from_centre - 0.3) / 0.15).clamp(0, 1))[None]
    tint = 0.4 + 0.6 * torch.rand(n, 3, generator=g)
    contrast = 0.6 + 0.4 * torch.rand(n, generator=g)
    base = 0.25 + 0.5 * torch.rand(n, 3, generator=g)
    img = base[:, :, None, None] + amplitude * (contrast[:, None] * tint)[:, :, None, None] * wave[:, None]
    img = img + noise * torch.randn(n, 3, size, size, generator=g)
    images = (img.clamp(0, 1) * 255).round().to(torch.uint8)
    return images, labels


def load_synthetic(data_dir=None, *, n_train: int = 5000, n_test: int = 1000, seed: int = 0, size: int = 32,
                   noise: float = 0.06, amplitude: float = 0.3) -> DataSplits:
    """The synthetic texture data set; ``data_dir`` is ignored."""
    tr_x, tr_y = make_synthetic(n_train, seed=seed * 2 + 1, size=size, noise=noise, amplitude=amplitude)
    te_x, te_y = make_synthetic(n_test, seed=seed * 2 + 2, size=size, noise=noise, amplitude=amplitude)
    return DataSplits(
        ImageDataset(tr_x, tr_y, list(CLASSES), "synthetic"),
        ImageDataset(te_x, te_y, list(CLASSES), "synthetic"),
        meta={"dataset": "synthetic", "seed": seed, "n_train": n_train, "n_test": n_test},
    )


load_synthetic.needs_data_dir = False  # type: ignore[attr-defined]
DATASETS.register("synthetic", help="built-in procedurally generated 10-class textures (no download)")(load_synthetic)
