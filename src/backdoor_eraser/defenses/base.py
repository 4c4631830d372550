"""What every defense is: ``purify(model, clean_subset) -> PurifyResult``."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from ..classifier import Classifier
from ..data.dataset import ImageDataset
from ..registry import config_to_dict, json_ready
from ..training import TrainConfig
from .lr_choice import cached_probe, check_factors


@dataclass
class DefenseTrainConfig(TrainConfig):
    """The training recipe of the training-based defenses: every TrainConfig field, with NAD's values
    (spec §5.4): SGD lr 0.1 ÷10 every 2 epochs, momentum 0.9, Nesterov, weight decay 1e-4, batch 64,
    10 epochs, crop (pad 4) + flip + Cutout(1, 3). Cutout is in the default because the releases
    train with it and it erases much of a grid trigger that crop + flip alone leave (spec §8.5)."""

    schedule: str = "step"
    augment: str = "crop+flip+cutout"
    # lr × the factor a one-epoch probe on the clean subset picks (defenses/lr_choice.py): the schedule
    # then fits the model instead of assuming the releases' weight norms.
    # Off by default, and then, with its settings, no part of a grid cell's identity (registry.identity_dict).
    auto_lr: bool = field(default=False, metadata={"neutral": False})
    lr_factors: tuple[float, ...] = field(default=(1.0, 0.5, 0.2, 0.1, 0.05), metadata={"with": "auto_lr"})
    lr_tolerance: float = field(default=0.05, metadata={"with": "auto_lr"})
    lr_held_out: float = field(default=0.2, metadata={"with": "auto_lr"})


# The NAD family's optimiser, written out in full in every preset so that a later change of a default
# never changes what a preset means (hence also ``kd_epochs=0`` in the presets without the recovery stage).
NAD_OPTIMISER = dict(batch_size=64, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
# NAD paper: 10 epochs, lr ÷10 every 2 epochs (spec §5.4 [P], [S]).
NAD_PAPER_SCHEDULE = dict(NAD_OPTIMISER, epochs=10, schedule="step", step_size=2, gamma=0.1, milestones=(),
                          augment="crop+flip+cutout", kd_epochs=0)
# NAD release (main.py at HEAD): 20 epochs, 0.1 for epochs 0-1, then 0.01; crop + flip + Cutout(1, 3).
NAD_RELEASE_SCHEDULE = dict(NAD_OPTIMISER, epochs=20, schedule="multistep", milestones=(2,), gamma=0.1,
                            augment="crop+flip+cutout", cutout_holes=1, cutout_length=3, kd_epochs=0)
# Erase, then recover (benchmarks/results/erase-harder-findings.md): 10 epochs at a constant lr 0.1 (the
# paper's schedule leaves it after 2), which erases the fixed-key Blend that the ÷10 schedule leaves at
# 16-82 % ASR, then 40 epochs distilling the input model's clean predictions back (recovery.py) to win back
# the accuracy those steps cost. The default recipe of fine-tuning, NAD and ARGD (recovery.EraseRecoverConfig).
ERASE_RECOVER_SCHEDULE = dict(NAD_OPTIMISER, epochs=10, schedule="constant", milestones=(), augment="crop+flip+cutout",
                              kd_epochs=40, kd_lr=0.05, kd_schedule="cosine", kd_temperature=4.0, kd_alpha=0.9,
                              kd_augment="crop+flip")


@dataclass(frozen=True)
class Stage:
    """One training stage of a defense: its name, the config field that counts its length (``unit``:
    epochs, or optimiser steps for ANP's mask iterations) and the sub-folder of the run folder that holds
    its checkpoint ("" = the run folder itself). An ``optional`` stage is off at length 0, and an epoch
    budget turns it off."""

    name: str
    length_field: str
    folder: str = ""
    unit: str = "epochs"
    optional: bool = False


@dataclass
class PurifyResult:
    """The purified model, its training history, bookkeeping (epochs, optimizer steps, seconds,
    conventions used) and any intermediate models worth keeping (e.g. NAD's teacher)."""

    model: Classifier
    history: list[dict] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    artifacts: dict[str, Classifier] = field(default_factory=dict)


class Defense:
    """Base class; subclasses set ``name`` and implement :meth:`purify`. The input model is never modified.

    ``presets`` names parameter sets (``paper``: what the paper states; ``release``: what the authors'
    released code runs); ``defenses.create(name, preset=...)`` applies one under the explicit values."""

    name = "defense"
    presets: dict[str, dict] = {}
    stages: tuple[Stage, ...] = ()
    # Numbers of ``PurifyResult.info`` that say what the defense decided (ABL's isolation precision, the
    # channels ANP pruned): run_purify copies them into metrics.json, so a grid store, and its report,
    # hold them without the run folders.
    diagnostics: tuple[str, ...] = ()

    def __init__(self, config):
        self.config = config
        self.preset: str | None = None
        self.explicit: dict = {}

    def diagnostic_values(self, info: dict) -> dict:
        """The ``diagnostics`` entries of ``info`` that are set (ABL has no precision without poison flags)."""
        return {k: info[k] for k in self.diagnostics if info.get(k) is not None}

    def fitted_config(self, model: Classifier, clean: ImageDataset, run_dir: Path | None = None,
                      quiet: bool = False) -> tuple:
        """(config, lr-probe record): the config itself, or with ``auto_lr`` a copy whose lr is scaled
        by the probe's factor (kept in the run folder, so a resumed run scales the same way)."""
        cfg = self.config
        if not getattr(cfg, "auto_lr", False):
            return cfg, None
        check_factors(cfg.lr_factors, cfg.lr_tolerance)
        choice = cached_probe(model, clean, cfg.train_config(), run_dir, factors=cfg.lr_factors,
                              tolerance=cfg.lr_tolerance, held_out=cfg.lr_held_out, quiet=quiet)
        return dataclasses.replace(cfg, lr=choice.lr), choice.to_dict()

    def check_model(self, model: Classifier) -> None:
        """Refuse, before any training, a config that cannot work on ``model`` (e.g. one β per attention
        site, sites the network does not have). Builds nothing that outlives the call."""

    def purify(self, model: Classifier, clean: ImageDataset, *, run_dir: str | Path | None = None,
               resume: bool = False, eval_fn=None, quiet: bool = False) -> PurifyResult:
        raise NotImplementedError

    def describe(self) -> dict:
        """What meta.json records: the resolved config, the preset it started from and the values given
        explicitly on top of it."""
        return {"name": self.name, "config": config_to_dict(self.config), "preset": self.preset,
                "explicit": json_ready(self.explicit)}
