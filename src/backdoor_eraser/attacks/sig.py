"""SIG (Barni, Kallas, Tondi, ICIP 2019): a horizontal sinusoid added to target-class images (spec §4.4)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import UserError
from .base import Attack, PoisonConfig

# NAD/ABL/ARGD/RNP `signal_cifar10_mask.npy`: 20·sin(0.8·j), independent of the image width (spec §4.4).
COMPAT_AMPLITUDE = 20.0
COMPAT_RAD_PER_PX = 0.8
COMPAT_ALPHA = 0.2


@dataclass
class SIGConfig(PoisonConfig):
    """``delta`` amplitude Δ and ``frequency`` f (cycles across the width) of v(j) = Δ·sin(2π·j·f/m);
    clean-label on ``rate`` = 80 % of the target class. ``nad_compat`` switches to the NAD-family
    release's blend with a wrapped stored mask, x' = uint8(0.8·x + 0.2·M), ignoring Δ and f."""

    target: int = 0
    rate: float = 0.8
    label_mode: str = "clean"
    delta: float = 20.0
    frequency: float = 6.0
    nad_compat: bool = False


def sine_signal(width: int, delta: float, frequency: float) -> torch.Tensor:
    """v(j) = Δ·sin(2π·j·f/m) for j = 0..m−1, float64."""
    j = torch.arange(width, dtype=torch.float64)
    return delta * torch.sin(2 * math.pi * j * frequency / width)


def compat_mask(width: int) -> torch.Tensor:
    """The release's stored mask row: trunc(20·sin(0.8·j)) mod 256 as uint8.

    numpy's float→uint8 cast truncates toward zero and, on x86, wraps negatives modulo 256,
    so the negative lobes become 236–255 (bright stripes) rather than dark ones.
    """
    j = torch.arange(width, dtype=torch.float64)
    values = torch.trunc(COMPAT_AMPLITUDE * torch.sin(COMPAT_RAD_PER_PX * j)).to(torch.int64)
    return torch.remainder(values, 256).to(torch.uint8)


class SIG(Attack):
    """SIG: clean-label backdoor with a column-wise sinusoidal signal, constant down each column.

    Barni, Kallas, Tondi, "A new backdoor attack in CNNs by training set corruption without label
    poisoning" (ICIP 2019); spec §4.4. Default (faithful): x' = clip(round(x + Δ·sin(2π·j·f/m)))
    with Δ = 20, f = 6 (the NAD/ABL README values), broadcast over rows and channels, applied to
    80 % of the target class at train time and to every non-target test image with the same Δ.
    Deviations: rounding to the nearest grey level (the paper does not say); ``nad_compat=True``
    reproduces what the NAD-family code actually ran (a 20 % contrast cut plus a wrapped,
    non-zero-mean stripe mask, truncated like numpy's uint8 cast).
    """

    name = "sig"

    def __init__(self, config: SIGConfig):
        if config.frequency < 0:
            raise UserError(f"sig frequency must be ≥ 0, got {config.frequency}")
        super().__init__(config)

    def apply_trigger(self, images: torch.Tensor) -> torch.Tensor:
        w = images.shape[-1]
        if self.config.nad_compat:
            mask = compat_mask(w).double().to(images.device)
            mixed = (1 - COMPAT_ALPHA) * images.double() + COMPAT_ALPHA * mask
            return mixed.clamp_(0, 255).to(torch.uint8)  # truncation, as the release's np.uint8
        signal = sine_signal(w, self.config.delta, self.config.frequency).to(images.device)
        return (images.double() + signal).round_().clamp_(0, 255).to(torch.uint8)
