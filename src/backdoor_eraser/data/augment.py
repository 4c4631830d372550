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
