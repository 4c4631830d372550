"""WaNet (Nguyen & Tran, ICLR 2021): an imperceptible fixed warp, poisoned per batch (spec §4.7)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.dataset import ImageDataset
from ..errors import UserError
from .base import Attack, PoisonConfig, PoisonedDataset


@dataclass
class WaNetConfig(PoisonConfig):
    """Warp field from ``k``×``k`` random control points (``field_seed``), strength ``s``,
    ``grid_rescale``; per batch ``rate`` (pc) of the samples are warped and relabelled and a further
    ``cross_ratio``·pc get the noise mode with their true labels."""

    target: int = 0
    rate: float = 0.1
    k: int = 4
    s: float = 0.5
    grid_rescale: float = 1.0
    cross_ratio: float = 2.0
    field_seed: int = 0


def control_points(k: int, seed: int) -> torch.Tensor:
    """P ~ U[−1, 1]^{1×2×k×k}, scaled to mean |P| = 1."""
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(1, 2, k, k, generator=g) * 2 - 1
    return p / p.abs().mean()


def upsample_field(points: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Bicubic upsampling (align_corners) of the control points to a 1×H×W×2 displacement field."""
    return F.interpolate(points, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)


def identity_grid(h: int, w: int) -> torch.Tensor:
    """1×H×W×2 sampling grid with (x, y) = (column, row) in [−1, 1], grid_sample's convention."""
    rows, cols = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    return torch.stack((cols, rows), dim=2)[None]


def warp(images: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Resample uint8 images through ``grid`` (1×H×W×2 or N×H×W×2) in float on [0, 1]."""
    x = images.float() / 255
    grid = grid.to(device=images.device, dtype=x.dtype).expand(len(images), -1, -1, -1)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return (out * 255).round_().clamp_(0, 255).to(torch.uint8)


class WaNet(Attack):
    """WaNet: warping-based backdoor with a fixed smooth field and on-the-fly poisoning.

    Nguyen & Tran, "WaNet — Imperceptible warping-based backdoor attack" (ICLR 2021); spec §4.7,
    following the VinAI release: k = 4, s = 0.5, grid_rescale = 1, pc = 0.1, cross_ratio = 2.
    The field M = clamp(G + s·P_up/H, −1, 1)·grid_rescale is fixed per attack by ``field_seed`` and
    saved as trigger state. ``poison`` leaves the training set untouched; the trainer's batch hook
    warps the first round(pc·B) samples of each (already shuffled) batch and relabels them, and
    gives the next round(cross_ratio·pc·B) samples the noise mode (M + U[−1,1]/H, clamped, true
    label). Deviations: counts use round() where the release truncates with int(); the release
    applies grid_rescale before the clamp (identical at the default 1); displacements of non-square
    images are scaled by H on both axes; pixels are rounded back to uint8 after warping, so the
    trigger lives in the same uint8 space as every other attack.
    """

    name = "wanet"

    def __init__(self, config: WaNetConfig):
        if config.k < 2:
            raise UserError(f"wanet needs k ≥ 2 control points per side, got {config.k}")
        if config.s < 0 or config.cross_ratio < 0 or config.grid_rescale <= 0:
            raise UserError("wanet s and cross_ratio must be ≥ 0 and grid_rescale > 0")
        if config.rate * (1 + config.cross_ratio) > 1:
            raise UserError(f"wanet rate·(1 + cross_ratio) = {config.rate * (1 + config.cross_ratio):g} "
                            "exceeds the batch")
        super().__init__(config)
        self._noise_grid: torch.Tensor | None = None   # P_up, 1×H×W×2
        self._loaded = False

    # -- the field --------------------------------------------------------------------------
    def noise_grid(self, h: int, w: int) -> torch.Tensor:
        """The upsampled displacement P_up for H×W images (built once from ``field_seed``)."""
        if self._noise_grid is None or tuple(self._noise_grid.shape[1:3]) != (h, w):
            if self._loaded:
                raise UserError(f"the saved wanet field is {tuple(self._noise_grid.shape[1:3])}, "
                                f"the images are {h}×{w}")
            self._noise_grid = upsample_field(control_points(self.config.k, self.config.field_seed), h, w)
        return self._noise_grid

    def field(self, h: int, w: int) -> torch.Tensor:
        """The sampling grid M (1×H×W×2) of the backdoor warp."""
        cfg = self.config
        m = identity_grid(h, w) + cfg.s * self.noise_grid(h, w) / h
        return m.clamp(-1, 1) * cfg.grid_rescale

    def fit_trigger(self, train: ImageDataset, *, seed: int = 0, device="cpu", quiet: bool = False) -> None:
        # Built here so trigger_state() holds the field even before the first batch.
        self.noise_grid(*train.shape[1:])

    def trigger_state(self) -> dict[str, torch.Tensor]:
        return {"noise_grid": self._noise_grid.clone()} if self._noise_grid is not None else {}

    def load_trigger_state(self, state: dict[str, torch.Tensor]) -> None:
        if "noise_grid" in state:
            self._noise_grid = state["noise_grid"].float()
            self._loaded = True

    # -- trigger and poisoning --------------------------------------------------------------
    def apply_trigger(self, images: torch.Tensor) -> torch.Tensor:
        return warp(images, self.field(*images.shape[-2:]))

    def poison(self, dataset: ImageDataset, seed: int = 0) -> PoisonedDataset:
        """The training set unchanged: WaNet poisons inside each batch (see :meth:`training_batch_hook`)."""
        self._check_target(dataset.num_classes)
        self.noise_grid(*dataset.shape[1:])
        return PoisonedDataset(dataset.images.clone(), dataset.labels.clone(), list(dataset.classes),
                               f"{dataset.name}-{self.name}", dataset.index.clone())

    def batch_counts(self, batch_size: int) -> tuple[int, int]:
        """(warped, noise-mode) sample counts for a batch of ``batch_size``."""
        n_bd = min(batch_size, int(round(self.config.rate * batch_size)))
        n_noise = int(round(self.config.cross_ratio * self.config.rate * batch_size))
        return n_bd, min(batch_size - n_bd, n_noise)

    def training_batch_hook(self, num_classes: int):
        self._check_target(num_classes)

        def hook(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator):
            n, _, h, w = x.shape
            n_bd, n_noise = self.batch_counts(n)
            grid = self.field(h, w)
            x, y = x.clone(), y.clone()
            if n_bd:
                x[:n_bd] = warp(x[:n_bd], grid)
                y[:n_bd] = self.target_labels(y[:n_bd], num_classes)
            if n_noise:
                # Drawn on the CPU so the stream (and the run) is the same on every device.
                jitter = torch.rand(n_noise, h, w, 2, generator=generator, device="cpu") * 2 - 1
                noisy = (grid + jitter / h).clamp(-1, 1)
                x[n_bd:n_bd + n_noise] = warp(x[n_bd:n_bd + n_noise], noisy)
            return x, y

        return hook
