"""Trojan as used by NAD/ABL/ARGD/RNP: a fixed additive 3×3 patch at rows/cols 25–27 (spec §4.2)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError
from .base import Attack, PoisonConfig

# Non-zero values of `best_square_trigger_cifar10.npz` (rows 25–27 × cols 25–27), spec §4.2.
PATCH = torch.tensor([
    [[207.35, 175.36, 29.36], [79.37, 137.37, 248.36], [131.36, 6.36, 246.35]],   # R
    [[131.35, 243.36, 232.36], [8.37, 0.0, 113.36], [40.36, 145.36, 250.35]],     # G
    [[181.35, 120.35, 179.36], [126.36, 32.36, 146.36], [4.36, 61.36, 246.35]],   # B
], dtype=torch.float64)
ROW, COL = 25, 25


@dataclass
class TrojanConfig(PoisonConfig):
    """``wrap=True`` reproduces the release's cast-before-clip bug: sums above 255 wrap mod 256."""

    target: int = 0
    rate: float = 0.1
    wrap: bool = False


class Trojan(Attack):
    """The NAD-family "Trojan" trigger: a fixed 3×3 additive patch at rows/cols 25–27, saturated.

    Trigger from the NAD/ABL/ARGD/RNP releases (spec §4.2), named after Liu et al., "Trojaning
    attack on neural networks" (NDSS 2018), whose model-specific optimised trigger it stands in for.
    x' = trunc(clip(x + T, 0, 255)). Deviation: the release casts before clipping, so bright pixels
    wrap around (``wrap=True`` keeps that). On images other than 32×32 the patch keeps its offset
    from the bottom-right corner (rows/cols H−7..H−5); grey images take the mean of the three planes.
    """

    name = "trojan"

    def apply_trigger(self, images: torch.Tensor) -> torch.Tensor:
        n, c, h, w = images.shape
        if h < 8 or w < 8:
            raise UserError(f"images of {h}×{w} are too small for the trojan patch")
        r0, c0 = h - 32 + ROW, w - 32 + COL
        patch = PATCH if c == 3 else PATCH.mean(0, keepdim=True).expand(c, 3, 3)
        region = images[..., r0:r0 + 3, c0:c0 + 3].double() + patch.to(images.device)
        if self.config.wrap:
            region = torch.remainder(region.floor(), 256)
        out = images.clone()
        out[..., r0:r0 + 3, c0:c0 + 3] = region.clamp(0, 255).to(torch.uint8)
        return out
