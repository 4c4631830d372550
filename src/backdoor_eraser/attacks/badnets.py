"""BadNets (Gu et al. 2017) with the 3×3 grid trigger of the NAD-family code (spec §4.1)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError
from .base import Attack, PoisonConfig

# Rows 29–31 × cols 29–31 of a 32×32 image in NAD/ABL/RNP `_gridTriger`, ANP `checkerboard_1corner`
# and Turner et al.'s bottom-right trigger (spec §4.1); broadcast over channels.
GRID = torch.tensor([[0, 0, 255],
                     [0, 255, 0],
                     [255, 0, 255]], dtype=torch.uint8)
# ARGD's released "gridTrigger": NAD's adaptive centre trigger at rows/cols 18–20 (spec §4.1).
CENTRE_GRID = torch.tensor([[255, 128, 255],
                            [128, 255, 128],
                            [255, 128, 128]], dtype=torch.uint8)
POSITIONS = ("bottom-right", "four-corners", "centre")


@dataclass
class BadNetsConfig(PoisonConfig):
    """``position``: ``bottom-right`` (default, NAD/ABL/RNP/ANP), ``four-corners`` (the grid mirrored
    into each corner, NAD ``fourCornerTrigger``) or ``centre`` (ARGD's released trigger at rows/cols 18–20)."""

    target: int = 0
    rate: float = 0.1
    position: str = "bottom-right"


class BadNets(Attack):
    """BadNets: an opaque 3×3 black/white grid stamped in the bottom-right corner.

    Gu, Dolan-Gavitt, Garg, "BadNets" (2017/2019), as implemented for CIFAR-10 by the
    NAD/ABL/RNP releases (spec §4.1). Poisoned-label all-to-one at 10 %, target 0 by default
    (spec §3 decision; the NAD demo used target 5).
    """

    name = "badnets"

    def __init__(self, config: BadNetsConfig):
        if config.position not in POSITIONS:
            raise UserError(f"badnets position must be one of {', '.join(POSITIONS)}, got {config.position!r}")
        super().__init__(config)

    def apply_trigger(self, images: torch.Tensor) -> torch.Tensor:
        out = images.clone()
        h, w = images.shape[-2:]
        if h < 3 or w < 3:
            raise UserError(f"images of {h}×{w} are too small for a 3×3 trigger")
        pos = self.config.position
        if pos == "centre":
            if h < 21 or w < 21:
                raise UserError("the centre grid sits at rows/cols 18–20 and needs images of at least 21×21")
            out[..., 18:21, 18:21] = CENTRE_GRID.to(images.device)
            return out
        grid = GRID.to(images.device)
        out[..., h - 3:, w - 3:] = grid
        if pos == "four-corners":
            out[..., h - 3:, :3] = grid.flip(1)
            out[..., :3, w - 3:] = grid.flip(0)
            out[..., :3, :3] = grid.flip(0).flip(1)
        return out
