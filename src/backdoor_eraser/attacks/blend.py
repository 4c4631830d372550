"""Blend (Chen et al. 2017): x' = (1 − α)·x + α·k with a fixed key (spec §4.3)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from .base import Attack, PoisonConfig


@dataclass
class BlendConfig(PoisonConfig):
    """``alpha`` blend weight (0.2 at train and test); ``key_image`` a path to an image key
    (e.g. Hello Kitty), else a seeded i.i.d. uniform {0..255} noise key drawn once from
    ``key_seed``. ``per_image_noise`` redraws the noise per image like the NAD code (spec §7.11)."""

    target: int = 0
    rate: float = 0.1
    alpha: float = 0.2
    key_image: str | None = None
    key_seed: int = 0
    per_image_noise: bool = False


def blend(images: torch.Tensor, key: torch.Tensor, alpha: float) -> torch.Tensor:
    """round((1 − α)·x + α·k), computed in float64 so results are exact and platform-independent."""
    mixed = (1 - alpha) * images.double() + alpha * key.double()
    return mixed.round_().clamp_(0, 255).to(torch.uint8)


class Blend(Attack):
    """Blended injection: every poisoned image is mixed with one fixed key pattern.

    Chen, Liu, Li, Lu, Song, "Targeted backdoor attacks on deep learning systems using data
    poisoning" (2017); spec §4.3. Default key: uniform noise fixed once by ``key_seed`` (the paper's
    random pattern), α = 0.2, poisoned-label 10 %. Deviation available behind ``per_image_noise``:
    the NAD-family code draws fresh grey noise for every image, so its "key" is noise itself.
    """

    name = "blend"

    def __init__(self, config: BlendConfig):
        if not 0 <= config.alpha <= 1:
            raise UserError(f"blend alpha must be in [0, 1], got {config.alpha}")
        super().__init__(config)
        self._key: torch.Tensor | None = None
        self._noise_gen = torch.Generator().manual_seed(config.key_seed + 1)

    def key(self, shape: tuple[int, int, int]) -> torch.Tensor:
        """The key as uint8 C×H×W for images of ``shape``."""
        if self._key is not None and tuple(self._key.shape) == tuple(shape):
            return self._key
        c, h, w = shape
        if self.config.key_image:
            self._key = load_key_image(self.config.key_image, c, h, w)
        else:
            g = torch.Generator().manual_seed(self.config.key_seed)
            self._key = torch.randint(0, 256, (c, h, w), generator=g, dtype=torch.int64).to(torch.uint8)
        return self._key

    def apply_trigger(self, images: torch.Tensor) -> torch.Tensor:
        if self.config.per_image_noise:
            n, c, h, w = images.shape
            noise = torch.randint(0, 256, (n, 1, h, w), generator=self._noise_gen, dtype=torch.int64)
            return blend(images, noise.to(images.device).expand(n, c, h, w), self.config.alpha)
        key = self.key(tuple(images.shape[1:])).to(images.device)
        return blend(images, key.unsqueeze(0), self.config.alpha)

    def trigger_state(self) -> dict[str, torch.Tensor]:
        return {"key": self._key.clone()} if self._key is not None else {}

    def load_trigger_state(self, state: dict[str, torch.Tensor]) -> None:
        if "key" in state:
            self._key = state["key"].to(torch.uint8)


def load_key_image(path: str | Path, c: int, h: int, w: int) -> torch.Tensor:
    """Read an image file as a uint8 C×H×W key, resized (bilinear) to h×w."""
    from PIL import Image

    p = Path(path)
    if not p.is_file():
        raise UserError(f"blend key image {str(p)!r} does not exist")
    try:
        img = Image.open(p).convert("RGB" if c == 3 else "L").resize((w, h), Image.BILINEAR)
    except OSError as exc:
        raise UserError(f"cannot read blend key image {str(p)!r}: {exc}") from None
    arr = np.asarray(img, dtype=np.uint8)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return torch.from_numpy(arr.copy())
