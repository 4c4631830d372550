"""Clean-label (label-consistent) backdoor of Turner, Tsipras, Madry (2019): adversarially
perturbed target-class images plus a corner trigger, labels unchanged (spec §4.5)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..classifier import Classifier, Normalization
from ..data.dataset import ImageDataset
from ..errors import UserError
from .badnets import GRID
from .base import Attack, PoisonConfig, PoisonedDataset

CORNERS = ("bottom-right", "four-corners")
BUILT_IN_SURROGATES = ("adversarial", "standard", "none")


@dataclass
class CleanLabelConfig(PoisonConfig):
    """Clean-label on ``rate`` = 80 % of the target class (spec §4.5 decision, the ANP recipe).

    ``surrogate``: ``adversarial`` (train a ``surrogate_arch`` with PGD adversarial training,
    ℓ∞ ``surrogate_epsilon`` = 8/255, ``surrogate_steps`` = 7 steps of ``surrogate_step`` = 2/255, for
    ``surrogate_epochs``), ``standard`` (plain training; faster, not faithful), ``none`` (no
    perturbation: the NAD in-repo ``cleanLabel``, not faithful) or a path to a run folder/checkpoint.
    Poisoning PGD: ℓ∞ ``epsilon`` = 16/255, ``pgd_step_size`` = 2/255, ``steps`` = 100, no random start.
    ε and steps are in grey levels (/255). Trigger: ``corners`` ``four-corners`` (default: the grid
    mirrored into each corner, Turner et al.'s answer to flips, and the ANP recipe) or ``bottom-right``
    (the spec's one corner: it failed under crop + flip, 0.4 % ASR in zoo/fragile); ``amplitude`` None
    overwrites the grid with 0/255, an integer a in 1..255 adds ±a instead.
    """

    target: int = 0
    rate: float = 0.8
    label_mode: str = "clean"
    corners: str = "four-corners"
    amplitude: int | None = None
    surrogate: str = "adversarial"
    surrogate_arch: str = "wrn-16-1"
    surrogate_epochs: int = 30
    surrogate_batch_size: int = 128
    surrogate_lr: float = 0.1
    surrogate_epsilon: float = 8.0
    surrogate_step: float = 2.0
    surrogate_steps: int = 7
    epsilon: float = 16.0
    pgd_step_size: float = 2.0
    steps: int = 100
    pgd_batch_size: int = 256


# -- PGD in [0, 1] image space -----------------------------------------------------------------
def to_unit(model: Classifier, inputs: torch.Tensor) -> torch.Tensor:
    """Undo the classifier's input normalisation: normalised inputs → images in [0, 1]."""
    norm = model.normalization
    if norm.mean is None:
        return inputs
    mean = torch.tensor(norm.mean, device=inputs.device, dtype=inputs.dtype).view(1, -1, 1, 1)
    std = torch.tensor(norm.std, device=inputs.device, dtype=inputs.dtype).view(1, -1, 1, 1)
    return inputs * std + mean


def pgd(model: Classifier, x: torch.Tensor, y: torch.Tensor, *, epsilon: float, step: float, steps: int,
        random_start: bool = False) -> torch.Tensor:
    """ℓ∞ PGD maximising CE(model(x + δ), y), with x and ε in [0, 1] units; returns x + δ, detached.

    The model's mode (train/eval) is left as the caller set it. Summed loss, so each image's
    step is independent of the batch it shares.
    """
    x = x.detach()
    delta = torch.zeros_like(x)
    if random_start:
        delta.uniform_(-epsilon, epsilon)
        delta = (x + delta).clamp_(0, 1) - x
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model.net(model.prepare(x + delta)), y, reduction="sum")
        grad, = torch.autograd.grad(loss, delta)
        delta = (delta.detach() + step * grad.sign()).clamp_(-epsilon, epsilon)
        delta = (x + delta).clamp_(0, 1) - x
    return (x + delta).detach()


class AdversarialTraining:
    """Trainer objective for Madry-style PGD adversarial training: the loss is CE on PGD examples
    (random start) built from the already augmented batch; the clean CE is logged as a term."""

    def __init__(self, model: Classifier, epsilon: float, step: float, steps: int):
        self.model, self.epsilon, self.step, self.steps = model, epsilon, step, steps

    def __call__(self, logits, inputs, labels):
        adv = pgd(self.model, to_unit(self.model, inputs), labels, epsilon=self.epsilon, step=self.step,
                  steps=self.steps, random_start=True)
        loss = F.cross_entropy(self.model.net(self.model.prepare(adv)), labels)
        return loss, {"clean_ce": F.cross_entropy(logits.detach(), labels)}


# -- the trigger ---------------------------------------------------------------------------------
def corner_signs(h: int, w: int, corners: str) -> torch.Tensor:
    """int8 H×W map: +1 where the grid is 255, −1 where it is 0, 0 off the trigger."""
    if h < 3 or w < 3:
        raise UserError(f"images of {h}×{w} are too small for a 3×3 trigger")
    grid = torch.where(GRID > 0, 1, -1).to(torch.int8)
    signs = torch.zeros(h, w, dtype=torch.int8)
    signs[h - 3:, w - 3:] = grid
    if corners == "four-corners":   # mirrored into each corner, as NAD's fourCornerTrigger / ANP
        signs[h - 3:, :3] = grid.flip(1)
        signs[:3, w - 3:] = grid.flip(0)
        signs[:3, :3] = grid.flip(0).flip(1)
    return signs


class CleanLabel(Attack):
    """Label-consistent backdoor: target-class training images are made hard to classify with a
    PGD perturbation against a surrogate model, then stamped with a corner trigger; labels stay.

    Turner, Tsipras, Madry, "Label-consistent backdoor attacks" (2019, arXiv:1912.02771); spec §4.5
    with the project decision: PGD ℓ∞ ε = 16/255, step 2/255, 100 steps, no random start, against an
    adversarially trained WRN-16-1 (ℓ∞ 8/255, 7 × 2/255 PGD during training); 80 % of the target
    class, target 0; the 3×3 bottom-right ±1 grid at full amplitude (optionally four corners or a
    reduced additive amplitude). Test-time trigger = the stamp only.

    Deviations: the original attacks a Madry-lab robust ResNet trained far longer (about 200
    epochs); here the surrogate is trained on the same (clean) training set for
    ``surrogate_epochs`` with SGD 0.1/0.9/5e-4, cosine, crop+flip. The perturbed images are
    rounded to uint8 (and re-clipped to ±ε there). ``surrogate="standard"`` (PGD on a normally
    trained model) and ``surrogate="none"`` (no perturbation, NAD's in-repo ``cleanLabel``) are
    recorded as ``faithful: false`` in :meth:`describe`.

    Trigger state: the original dataset indices of the poisoned samples and their perturbed
    (unstamped) uint8 images, so a saved run rebuilds exactly the same poisoned set.
    """

    name = "clean-label"

    def __init__(self, config: CleanLabelConfig):
        if config.label_mode != "clean":
            raise UserError("clean-label keeps every label: label_mode must be 'clean'")
        if config.corners not in CORNERS:
            raise UserError(f"clean-label corners must be one of {', '.join(CORNERS)}, got {config.corners!r}")
        a = config.amplitude
        if a is not None and not (isinstance(a, (int, float)) and a == int(a) and 1 <= a <= 255):
            raise UserError(f"clean-label amplitude must be None or an integer in 1..255, got {a!r}")
        if config.epsilon < 0 or config.pgd_step_size < 0 or config.steps < 0:
            raise UserError("clean-label epsilon, pgd_step_size and steps must be ≥ 0")
        super().__init__(config)
        self.surrogate: Classifier | None = None
        self._indices: torch.Tensor | None = None    # original dataset indices, sorted
        self._perturbed: torch.Tensor | None = None  # uint8 N×C×H×W, unstamped

    # -- trigger ---------------------------------------------------------------------------------
    def apply_trigger(self, images: torch.Tensor) -> torch.Tensor:
        signs = corner_signs(*images.shape[-2:], self.config.corners).to(images.device)
        on = signs != 0
        if self.config.amplitude is None:
            stamped = torch.where(signs > 0, 255, 0).to(torch.uint8)
            return torch.where(on, stamped, images)
        shifted = images.to(torch.int16) + int(self.config.amplitude) * signs.to(torch.int16)
        return torch.where(on, shifted.clamp(0, 255).to(torch.uint8), images)

    # -- adversarial perturbation ---------------------------------------------------------------------
    @property
    def faithful(self) -> bool | None:
        """True for the built-in adversarial surrogate, False for ``standard``/``none``, None (unknown)
        for a supplied model, whose robustness this code cannot check."""
        s = self.config.surrogate
        return True if s == "adversarial" else False if s in ("standard", "none") else None

    def fit_trigger(self, train: ImageDataset, *, seed: int = 0, device="cpu", quiet: bool = False) -> None:
        """Get the surrogate, then PGD-perturb the target-class images chosen for poisoning."""
        self._check_target(train.num_classes)
        cfg = self.config
        self._indices, self._perturbed = None, None
        pos = self.select_poison(train, seed)
        images = train.images[pos]
        if cfg.surrogate != "none" and len(pos):
            self.surrogate = self._get_surrogate(train, seed, device, quiet)
            images = self.perturb(images, train.labels[pos], quiet=quiet)
        order = torch.argsort(train.index[pos])
        self._indices, self._perturbed = train.index[pos][order].clone(), images[order].clone()

    def _get_surrogate(self, train: ImageDataset, seed: int, device, quiet: bool = False) -> Classifier:
        from ..runs import load_model, new_model
        from ..training import Task, TrainConfig, Trainer

        cfg = self.config
        if cfg.surrogate not in BUILT_IN_SURROGATES:
            path = Path(cfg.surrogate)
            model, _ = load_model(path, arch=None if path.is_dir() else cfg.surrogate_arch, device=device)
            return model
        model = new_model(cfg.surrogate_arch, train.classes, train.shape, Normalization(), device, seed)
        recipe = TrainConfig(epochs=cfg.surrogate_epochs, batch_size=cfg.surrogate_batch_size, lr=cfg.surrogate_lr,
                             nesterov=False, weight_decay=5e-4, schedule="cosine", seed=seed,
                             amp="none")  # fp32: the PGD inside adversarial training needs input gradients
        objective = None
        if cfg.surrogate == "adversarial":
            objective = AdversarialTraining(model, cfg.surrogate_epsilon / 255, cfg.surrogate_step / 255,
                                            cfg.surrogate_steps)
        Trainer(recipe, desc=f"clean-label {cfg.surrogate} surrogate", quiet=quiet).fit(model, train, task=Task(objective))
        return model

    def perturb(self, images: torch.Tensor, labels: torch.Tensor, *, quiet: bool = True) -> torch.Tensor:
        """uint8 images pushed away from their true labels by PGD on the surrogate, ≤ ε per pixel; a
        progress line per batch unless ``quiet`` (4,000 CIFAR-10 images take minutes on a CPU)."""
        cfg, model = self.config, self.surrogate
        model.net.eval()
        eps = int(cfg.epsilon)
        out = []
        t0 = time.perf_counter()
        for i in range(0, len(images), cfg.pgd_batch_size):
            x = images[i:i + cfg.pgd_batch_size]
            adv = pgd(model, x.to(model.device).float() / 255, labels[i:i + len(x)].to(model.device),
                      epsilon=cfg.epsilon / 255, step=cfg.pgd_step_size / 255, steps=cfg.steps)
            adv = (adv * 255).round_().cpu()
            # Rounding must not step outside the ε-ball in grey levels.
            base = x.float()
            out.append(torch.minimum(torch.maximum(adv, base - eps), base + eps).clamp_(0, 255).to(torch.uint8))
            if not quiet:
                print(f"clean-label PGD ({cfg.steps} steps): {i + len(x)} of {len(images)} images, "
                      f"{time.perf_counter() - t0:.0f} s", flush=True)
        return torch.cat(out)

    # -- poisoning -----------------------------------------------------------------------------------
    def select_poison(self, dataset: ImageDataset, seed: int) -> torch.Tensor:
        """The stored samples once :meth:`fit_trigger` ran (or a saved state was loaded), else the seeded draw."""
        if self._indices is None:
            return super().select_poison(dataset, seed)
        return torch.nonzero(torch.isin(dataset.index, self._indices)).flatten()

    def poison(self, dataset: ImageDataset, seed: int = 0) -> PoisonedDataset:
        """Swap in the perturbed images, then stamp the trigger (labels kept)."""
        if self._indices is None:
            raise UserError("clean-label needs fit_trigger (the adversarial perturbation) or a saved trigger "
                            "state before poisoning")
        pos = self.select_poison(dataset, seed)
        rows = torch.searchsorted(self._indices, dataset.index[pos])
        images = dataset.images.clone()
        images[pos] = self._perturbed[rows]
        adv = ImageDataset(images, dataset.labels, list(dataset.classes), dataset.name, dataset.index)
        return super().poison(adv, seed)

    def trigger_state(self) -> dict[str, torch.Tensor]:
        if self._indices is None:
            return {}
        return {"indices": self._indices.clone(), "perturbed": self._perturbed.clone()}

    def load_trigger_state(self, state: dict[str, torch.Tensor]) -> None:
        if "indices" in state:
            order = torch.argsort(state["indices"])
            self._indices = state["indices"].to(torch.int64)[order]
            self._perturbed = state["perturbed"].to(torch.uint8)[order]

    def describe(self) -> dict:
        d = super().describe()
        d["faithful"] = self.faithful
        if self.faithful is False:
            d["deviation"] = ("PGD against a standard (non-robust) surrogate" if self.config.surrogate == "standard"
                              else "no adversarial perturbation (trigger only)")
        elif self.faithful is None:
            d["deviation"] = "PGD against a supplied surrogate; faithful only if that model is adversarially trained"
        return d
