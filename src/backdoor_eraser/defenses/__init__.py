"""Backdoor defenses, looked up by name: ``defenses.create("nad", beta=(500, 1000, 1000))``."""
from __future__ import annotations

from ..registry import Registry
from .abl import ABL, ABLConfig
from .anp import ANP, ANPConfig
from .argd import ARGD, ARGDConfig
from .base import Defense, OptimConfig, PurifyResult
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


def create(name: str, config=None, **params) -> Defense:
    """Build defense ``name`` with its paper defaults, overridden by ``params``."""
    return DEFENSES.create(name, config, **params)


def names() -> list[str]:
    return DEFENSES.names()


__all__ = ["DEFENSES", "Defense", "PurifyResult", "create", "names", "Finetune", "NAD", "FinetuneConfig", "NADConfig",
           "ARGD", "ARGDConfig", "SAGE", "SAGEConfig",
           "FinePruning", "FinePruningConfig", "MCR", "MCRConfig", "ANP", "ANPConfig", "RNP", "RNPConfig",
           "ABL", "ABLConfig", "DETECTORS", "NeuralCleanse", "NCConfig", "NCReport", "save_masks_png"]


# Config fields that count training epochs, per defense: an epoch budget sets each of them, so every
# stage (NAD's teacher and student, MCR's endpoint and curve, …) gets the same number of passes over
# the clean data, as in SAGE's equal-budget comparison (spec §5.6).
_EPOCH_FIELDS = {"finetune": ("epochs",), "nad": ("epochs", "teacher_epochs"), "argd": ("epochs", "teacher_epochs"),
                 "sage": ("epochs",), "fine-pruning": ("epochs",), "mcr": ("epochs", "curve_epochs"),
                 "rnp": ("unlearn_epochs", "recover_epochs")}


def epoch_budget_params(name: str, budget: int, clean_size: int, batch_size: int | None = None) -> dict:
    """Parameters that give defense ``name`` ``budget`` epochs per training stage on ``clean_size`` images
    (ANP counts mask iterations: budget × clean_size / batch size)."""
    from ..errors import UserError

    if budget < 1:
        raise UserError(f"--epochs-budget must be ≥ 1, got {budget}")
    key = name.lower()
    if key == "anp":
        bs = batch_size or DEFENSES.make_config("anp").batch_size
        return {"iterations": max(1, -(-budget * clean_size // bs))}
    if key not in _EPOCH_FIELDS:
        raise UserError(f"defense {name!r} has no epoch budget mapping; set its epochs directly")
    return {f: budget for f in _EPOCH_FIELDS[key]}
