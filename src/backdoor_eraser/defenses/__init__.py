"""Backdoor defenses, looked up by name: ``defenses.create("nad", beta=(500, 1000, 1000))``."""
from __future__ import annotations

from ..registry import Registry
from .anp import ANP, ANPConfig
from .argd import ARGD, ARGDConfig
from .base import Defense, OptimConfig, PurifyResult
from .fine_pruning import FinePruning, FinePruningConfig
from .finetune import Finetune, FinetuneConfig
from .mcr import MCR, MCRConfig
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


def create(name: str, config=None, **params) -> Defense:
    """Build defense ``name`` with its paper defaults, overridden by ``params``."""
    return DEFENSES.create(name, config, **params)


def names() -> list[str]:
    return DEFENSES.names()


__all__ = ["DEFENSES", "Defense", "PurifyResult", "create", "names", "Finetune", "NAD", "FinetuneConfig", "NADConfig",
           "ARGD", "ARGDConfig", "SAGE", "SAGEConfig",
           "FinePruning", "FinePruningConfig", "MCR", "MCRConfig", "ANP", "ANPConfig", "RNP", "RNPConfig"]
