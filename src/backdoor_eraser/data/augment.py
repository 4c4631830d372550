"""Batched augmentation on uint8 tensors, on the model's device."""
from __future__ import annotations

import torch


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero-pad by ``padding`` and take a random crop of the original size, per image."""
    if padding <= 0:
        return x
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device="cpu").to(x.device)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device="cpu").to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # N×H×1
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]  # N×1×W
    batch = torch.arange(n, device=x.device)[:, None, None]
    # Advanced indexing with the channel slice in the middle puts channels last.
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()


def random_flip(x: torch.Tensor, generator: torch.Generator | None = None, p: float = 0.5) -> torch.Tensor:
    """Flip each image left-right with probability ``p``."""
    flip = (torch.rand(x.shape[0], generator=generator, device="cpu") < p).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(3), x)


class CropFlip:
    """Random crop (pad ``padding``) then horizontal flip: the standard CIFAR augmentation."""

    def __init__(self, padding: int = 4, flip: bool = True):
        self.padding = padding
        self.flip = flip

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = random_crop(x, self.padding, generator)
        return random_flip(x, generator) if self.flip else x

    def __repr__(self) -> str:
        return f"CropFlip(padding={self.padding}, flip={self.flip})"


def cutout(x: torch.Tensor, holes: int = 1, length: int = 3, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero ``holes`` squares per image, as DeVries & Taylor's Cutout in the NAD/ARGD/ABL releases
    (spec §1.3): a centre (cy, cx) uniform over the image, rows ``clip(cy - length // 2, cy + length // 2)``
    and the same for columns, half-open, so ``length=3`` zeroes a 2×2 square, less where it is clipped
    at the border. The releases apply it after ``ToTensor`` on unnormalised [0, 1] images, so the hole
    is black; here it is pixel value 0 on the uint8 image, the same thing for those models."""
    if holes <= 0 or length <= 0:
        return x
    n, _, h, w = x.shape
    half = length // 2
    keep = torch.ones(n, h, w, dtype=torch.bool, device=x.device)
    rows = torch.arange(h, device=x.device)[None, :, None]
    cols = torch.arange(w, device=x.device)[None, None, :]
    for _ in range(holes):
        cy = torch.randint(0, h, (n,), generator=generator, device="cpu").to(x.device)[:, None, None]
        cx = torch.randint(0, w, (n,), generator=generator, device="cpu").to(x.device)[:, None, None]
        hole = (rows >= cy - half) & (rows < cy + half) & (cols >= cx - half) & (cols < cx + half)
        keep &= ~hole
    return x * keep[:, None].to(x.dtype)


AUGMENT_OPS = ("crop", "flip", "cutout")
# Names kept from before augmentation became a list of steps.
AUGMENT_ALIASES = {"crop-flip": "crop+flip", "none": ""}


def parse_augment(spec: str) -> tuple[str, ...]:
    """``"crop+flip+cutout"`` → ``("crop", "flip", "cutout")``; ``"crop-flip"`` and ``"none"`` are aliases.
    Steps always run in the releases' order (crop, flip, Cutout) whatever order they are written in."""
    text = AUGMENT_ALIASES.get(spec.strip(), spec.strip())
    steps = [s.strip() for s in text.split("+") if s.strip()]
    bad = [s for s in steps if s not in AUGMENT_OPS]
    if bad:
        raise ValueError(f"unknown augmentation step {bad[0]!r}; steps: {', '.join(AUGMENT_OPS)} joined with '+' "
                         f"(e.g. crop+flip+cutout), or {', '.join(AUGMENT_ALIASES)}")
    if len(set(steps)) != len(steps):
        raise ValueError(f"augmentation {spec!r} repeats a step")
    return tuple(s for s in AUGMENT_OPS if s in steps)


class Augment:
    """The configured steps, applied to a uint8 batch with one generator (so a seed fixes them all)."""

    def __init__(self, steps: tuple[str, ...], *, crop_padding: int = 4, cutout_holes: int = 1,
                 cutout_length: int = 3):
        self.steps = tuple(steps)
        self.crop_padding, self.cutout_holes, self.cutout_length = crop_padding, cutout_holes, cutout_length

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if "crop" in self.steps:
            x = random_crop(x, self.crop_padding, generator)
        if "flip" in self.steps:
            x = random_flip(x, generator)
        if "cutout" in self.steps:
            x = cutout(x, self.cutout_holes, self.cutout_length, generator)
        return x

    def __repr__(self) -> str:
        return (f"Augment({'+'.join(self.steps) or 'none'}, crop_padding={self.crop_padding}, "
                f"cutout={self.cutout_holes}x{self.cutout_length})")


def make_augment(config) -> Augment | None:
    """The augmentation of a config with ``augment``, ``crop_padding``, ``cutout_holes`` and
    ``cutout_length`` fields (a TrainConfig or a defense config); None when it has no steps."""
    steps = parse_augment(config.augment)
    if not steps:
        return None
    return Augment(steps, crop_padding=getattr(config, "crop_padding", 4),
                   cutout_holes=getattr(config, "cutout_holes", 1), cutout_length=getattr(config, "cutout_length", 3))
