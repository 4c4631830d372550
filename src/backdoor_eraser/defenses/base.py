"""What every defense is: ``purify(model, clean_subset) -> PurifyResult``."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..classifier import Classifier
from ..data.dataset import ImageDataset
from ..registry import config_to_dict
from ..training import TrainConfig


@dataclass
class OptimConfig:
    """The optimiser recipe shared by the training-based defenses; defaults are NAD's (spec §5.4):
    SGD lr 0.1 (÷10 every 2 epochs), momentum 0.9, Nesterov, weight decay 1e-4, batch 64,
    crop (pad 4) + flip, 10 epochs."""

    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    schedule: str = "step"
    step_size: int = 2
    gamma: float = 0.1
    augment: str = "crop-flip"
    seed: int = 0
    # Speed only (see TrainConfig): "bf16" autocast and channels-last.
    amp: str = "none"
    channels_last: bool = False

    def train_config(self, **overrides) -> TrainConfig:
        base = dict(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, momentum=self.momentum,
                    nesterov=self.nesterov, weight_decay=self.weight_decay, schedule=self.schedule,
                    step_size=self.step_size, gamma=self.gamma, augment=self.augment, seed=self.seed,
                    amp=self.amp, channels_last=self.channels_last)
        base.update(overrides)
        return TrainConfig(**base)


@dataclass
class PurifyResult:
    """The purified model, its training history, bookkeeping (epochs, optimizer steps, seconds,
    conventions used) and any intermediate models worth keeping (e.g. NAD's teacher)."""

    model: Classifier
    history: list[dict] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    artifacts: dict[str, Classifier] = field(default_factory=dict)


class Defense:
    """Base class; subclasses set ``name`` and implement :meth:`purify`. The input model is never modified."""

    name = "defense"

    def __init__(self, config):
        self.config = config

    def purify(self, model: Classifier, clean: ImageDataset, *, run_dir: str | Path | None = None,
               resume: bool = False, eval_fn=None, quiet: bool = False) -> PurifyResult:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"name": self.name, "config": config_to_dict(self.config)}
