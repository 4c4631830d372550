"""What every attack is: a trigger (uint8 batch in, uint8 batch out) plus a poisoning plan."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.dataset import ImageDataset
from ..errors import UserError
from ..registry import config_to_dict

LABEL_MODES = ("poisoned", "clean")
TARGET_MODES = ("all2one", "all2all")


@dataclass
class PoisonConfig:
    """The poisoning plan shared by all attacks.

    ``rate`` is the poisoned share of the whole training set for poisoned-label
    attacks (spec §1.5: target-class images may be drawn too), and the share of
    the *target class* for clean-label attacks (spec §4.4–4.6).
    ``all2all`` relabels class ``c`` as ``(c + 1) mod C``.
    """

    target: int = 0
    rate: float = 0.1
    mode: str = "all2one"
    label_mode: str = "poisoned"

    def check(self):
        if not 0 <= self.rate <= 1:
            raise UserError(f"poisoning rate must be in [0, 1], got {self.rate}")
        if self.mode not in TARGET_MODES:
            raise UserError(f"mode must be one of {', '.join(TARGET_MODES)}, got {self.mode!r}")
        if self.label_mode not in LABEL_MODES:
            raise UserError(f"label_mode must be one of {', '.join(LABEL_MODES)}, got {self.label_mode!r}")
        if self.mode == "all2all" and self.label_mode == "clean":
            raise UserError("a clean-label attack cannot be all-to-all: it never changes labels")


@dataclass
class PoisonedDataset(ImageDataset):
    """A training set after poisoning; per sample it keeps the original index (``index``),
    whether it was poisoned (``poison_flag``) and its original label (``original_label``)."""

    poison_flag: torch.Tensor | None = None
    original_label: torch.Tensor | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.poison_flag is None:
            self.poison_flag = torch.zeros(len(self), dtype=torch.bool)
        if self.original_label is None:
            self.original_label = self.labels.clone()

    @property
    def poison_indices(self) -> torch.Tensor:
        return self.index[self.poison_flag]

    def subset(self, indices, name: str | None = None) -> "PoisonedDataset":
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return PoisonedDataset(self.images[idx], self.labels[idx], list(self.classes), name or self.name,
                               self.index[idx], self.poison_flag[idx], self.original_label[idx])


@dataclass
class TriggeredTestSet:
    """Triggered test images for ASR/RA: only images whose true label differs from their attack target."""

    images: torch.Tensor
    target_labels: torch.Tensor
    true_labels: torch.Tensor
    source_index: torch.Tensor

    def __len__(self) -> int:
        return len(self.images)


class Attack:
    """Base class. Subclasses set ``name`` and implement :meth:`apply_trigger`.

    ``config`` is the attack's dataclass; it extends :class:`PoisonConfig`.
    """

    name = "attack"

    def __init__(self, config):
        self.config = config
        config.check()

    # -- the trigger ------------------------------------------------------------------------
    def apply_trigger(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 N×C×H×W → uint8 N×C×H×W with the trigger; must not modify ``images``."""
        raise NotImplementedError

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"triggers take uint8 N×C×H×W batches, got {images.dtype} {tuple(images.shape)}")
        return self.apply_trigger(images)

    def trigger_state(self) -> dict[str, torch.Tensor]:
        """Tensors that define the trigger beyond the config (e.g. a blend key), saved with a run."""
        return {}

    def load_trigger_state(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise UserError(f"attack {self.name!r} has no trigger state to load")

    # -- optional stages for attacks that need more than a fixed trigger -------------------
    def fit_trigger(self, train: ImageDataset, *, seed: int = 0, device="cpu", quiet: bool = False) -> None:
        """Build data-dependent trigger state before poisoning (e.g. an optimised patch or a
        surrogate model for adversarial perturbations), with progress lines unless ``quiet``.
        Default: nothing to do."""

    def training_batch_hook(self, num_classes: int):
        """A ``batch_hook(x_uint8, y, generator) -> (x, y)`` for the trainer when poisoning happens
        on the fly per batch (e.g. WaNet's warp and noise modes); ``None`` when ``poison`` does it all."""
        return None

    def training_objective(self, model, num_classes: int):
        """An objective ``(logits, inputs, labels) -> (loss, terms)`` replacing plain cross-entropy
        during attack training, for attacks whose trigger is learned jointly with the classifier
        (e.g. input-aware dynamic); ``None`` for plain cross-entropy."""
        return None

    def training_parameters(self) -> list:
        """Extra parameters the trainer optimises with the model's SGD (e.g. a trigger generator)."""
        return []

    def training_optimizers(self) -> list:
        """Optimizers of trigger parameters that the trainer steps with the model's (input-aware's
        Adam on its generator); the same objects on every call."""
        return []

    def learns_trigger_in_training(self) -> bool:
        return bool(self.training_parameters() or self.training_optimizers())

    # -- labels -----------------------------------------------------------------------------
    def target_labels(self, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
        """The label each triggered image should be classified as."""
        if self.config.mode == "all2all":
            return (labels + 1) % num_classes
        return torch.full_like(labels, self.config.target)

    def _check_target(self, num_classes: int):
        if not 0 <= self.config.target < num_classes:
            raise UserError(f"target class {self.config.target} is outside 0..{num_classes - 1}")

    # -- poisoning --------------------------------------------------------------------------
    def select_poison(self, dataset: ImageDataset, seed: int) -> torch.Tensor:
        """Positions (sorted) of the samples to poison; fixed by ``seed``."""
        cfg = self.config
        g = torch.Generator().manual_seed(seed)
        if cfg.label_mode == "clean":
            pool = torch.nonzero(dataset.labels == cfg.target).flatten()
            count = int(round(cfg.rate * len(pool)))
            chosen = pool[torch.randperm(len(pool), generator=g)[:count]]
        else:
            count = int(round(cfg.rate * len(dataset)))
            chosen = torch.randperm(len(dataset), generator=g)[:count]
        return torch.sort(chosen).values

    def poison(self, dataset: ImageDataset, seed: int = 0) -> PoisonedDataset:
        """A poisoned copy of ``dataset``: triggered images at the selected positions,
        relabelled unless the attack is clean-label."""
        self._check_target(dataset.num_classes)
        return self._poison_at(dataset, self.select_poison(dataset, seed), self)

    def _poison_at(self, dataset: ImageDataset, pos: torch.Tensor, trigger) -> PoisonedDataset:
        """``dataset`` with ``trigger(images[pos])`` at ``pos``, relabelled there unless clean-label."""
        images = dataset.images.clone()
        labels = dataset.labels.clone()
        if len(pos):
            images[pos] = trigger(dataset.images[pos])
            if self.config.label_mode == "poisoned":
                labels[pos] = self.target_labels(dataset.labels[pos], dataset.num_classes)
        flag = torch.zeros(len(dataset), dtype=torch.bool)
        flag[pos] = True
        return PoisonedDataset(images, labels, list(dataset.classes), f"{dataset.name}-{self.name}",
                               dataset.index.clone(), flag, dataset.labels.clone())

    def triggered_test_set(self, test: ImageDataset) -> TriggeredTestSet:
        """Every test image whose true label differs from its target, with the trigger applied (spec §1.4)."""
        self._check_target(test.num_classes)
        targets = self.target_labels(test.labels, test.num_classes)
        keep = torch.nonzero(targets != test.labels).flatten()
        triggered = torch.cat([self(test.images[keep[i:i + 1024]]) for i in range(0, len(keep), 1024)]) \
            if len(keep) else test.images[:0]
        return TriggeredTestSet(triggered, targets[keep], test.labels[keep], test.index[keep])

    def describe(self) -> dict:
        return {"name": self.name, "config": config_to_dict(self.config)}
