"""Backdoor defenses, looked up by name: ``defenses.create("nad", beta=(500, 1000, 1000))``."""
from __future__ import annotations

from ..errors import UserError
from ..registry import Registry
from .abl import ABL, ABLConfig
from .anp import ANP, ANPConfig
from .argd import ARGD, ARGDConfig
from .base import Defense, DefenseTrainConfig, PurifyResult
from .fine_pruning import FinePruning, FinePruningConfig
from .finetune import Finetune, FinetuneConfig
from .mcr import MCR, MCRConfig
from .neural_cleanse import NCConfig, NCReport, NeuralCleanse, save_masks_png
from .nad import NAD, NADConfig
from .rnp import RNP, RNPConfig
from .sage import SAGE, SAGEConfig

DEFENSES: Registry[Defense] = Registry("defense")
DEFENSES.register("finetune", FinetuneConfig)(Finetune)
DEFENSES.register("nad", NADConfig)(NAD)
DEFENSES.register("argd", ARGDConfig)(ARGD)
DEFENSES.register("sage", SAGEConfig)(SAGE)
DEFENSES.register("fine-pruning", FinePruningConfig)(FinePruning)
DEFENSES.register("mcr", MCRConfig)(MCR)
DEFENSES.register("anp", ANPConfig)(ANP)
DEFENSES.register("rnp", RNPConfig)(RNP)
DEFENSES.register("abl", ABLConfig)(ABL)

# Detectors say whether a model is backdoored (and which class); they do not change it.
DETECTORS: Registry = Registry("detector")
DETECTORS.register("neural-cleanse", NCConfig)(NeuralCleanse)


def presets(name: str) -> dict[str, dict]:
    """The named parameter sets of defense ``name`` (e.g. ``paper``, ``release``)."""
    return dict(getattr(DEFENSES.get(name), "presets", {}))


def resolve_params(name: str, preset: str | None = None, params: dict | None = None) -> dict:
    """The parameters of ``preset`` (if any) overridden by ``params``: explicit values always win."""
    params = dict(params or {})
    if preset is None:
        return params
    table = presets(name)
    if preset not in table:
        known = ", ".join(sorted(table)) or "none"
        raise UserError(f"defense {name!r} has no preset {preset!r}; its presets: {known}")
    return {**table[preset], **params}


def create(name: str, config=None, *, preset: str | None = None, **params) -> Defense:
    """Build defense ``name`` from its defaults, or from ``preset``, overridden by ``params``; the
    defense records both (``describe()``)."""
    defense = DEFENSES.create(name, config, **resolve_params(name, preset, params))
    defense.preset, defense.explicit = preset, params
    return defense


def names() -> list[str]:
    return DEFENSES.names()


__all__ = ["DEFENSES", "Defense", "PurifyResult", "create", "names", "Finetune", "NAD", "FinetuneConfig", "NADConfig",
           "ARGD", "ARGDConfig", "SAGE", "SAGEConfig",
           "FinePruning", "FinePruningConfig", "MCR", "MCRConfig", "ANP", "ANPConfig", "RNP", "RNPConfig",
           "ABL", "ABLConfig", "DefenseTrainConfig", "presets", "resolve_params", "DETECTORS", "NeuralCleanse", "NCConfig", "NCReport", "save_masks_png"]


def epoch_budget_params(name: str, budget: int, clean_size: int, batch_size: int | None = None) -> dict:
    """Parameters that give defense ``name`` ``budget`` epochs in each of its training stages on
    ``clean_size`` images, as in SAGE's equal-budget comparison (spec §5.6). A stage counted in
    optimiser steps (ANP's mask iterations) gets budget × clean_size / batch size steps; an optional
    stage (the recovery, on by default for fine-tuning, NAD and ARGD) is turned off, so that the budget
    is all the training there is."""
    if budget < 1:
        raise UserError(f"--epochs-budget must be ≥ 1, got {budget}")
    stages = DEFENSES.get(name).stages
    if not stages:
        raise UserError(f"defense {name!r} has no training stages to budget; set its epochs directly")
    out = {}
    for stage in stages:
        if stage.optional:
            out[stage.length_field] = 0
            continue
        if stage.unit == "steps":
            bs = batch_size or DEFENSES.make_config(name).batch_size
            out[stage.length_field] = max(1, -(-budget * clean_size // bs))
        else:
            out[stage.length_field] = budget
    return out
