"""Backdoor attacks, looked up by name: ``attacks.create("badnets", target=0)``."""
from __future__ import annotations

from ..registry import Registry
from .badnets import BadNets, BadNetsConfig
from .base import Attack, PoisonConfig, PoisonedDataset, TriggeredTestSet
from .blend import Blend, BlendConfig
from .clean_label import CleanLabel, CleanLabelConfig
from .input_aware import InputAware, InputAwareConfig
from .patch import MultiTrigger, MultiTriggerConfig, Patch, PatchConfig
from .refool import Refool, RefoolConfig
from .sig import SIG, SIGConfig
from .trojan import Trojan, TrojanConfig
from .trojannn import TrojanNN, TrojanNNConfig
from .wanet import WaNet, WaNetConfig

ATTACKS: Registry[Attack] = Registry("attack")
ATTACKS.register("badnets", BadNetsConfig)(BadNets)
ATTACKS.register("blend", BlendConfig)(Blend)
ATTACKS.register("trojan", TrojanConfig)(Trojan)
ATTACKS.register("sig", SIGConfig)(SIG)
ATTACKS.register("wanet", WaNetConfig)(WaNet)
ATTACKS.register("refool", RefoolConfig)(Refool)
ATTACKS.register("patch", PatchConfig)(Patch)
ATTACKS.register("multi-trigger", MultiTriggerConfig)(MultiTrigger)
ATTACKS.register("clean-label", CleanLabelConfig)(CleanLabel)
ATTACKS.register("trojannn", TrojanNNConfig)(TrojanNN)
ATTACKS.register("input-aware", InputAwareConfig)(InputAware)


def create(name: str, config=None, **params) -> Attack:
    """Build attack ``name`` with its paper defaults, overridden by ``params``."""
    return ATTACKS.create(name, config, **params)


def names() -> list[str]:
    return ATTACKS.names()


# Fields renamed because a training flag of the same name (--step-size, --lr, --batch-size) shadowed them
# on the command line; run folders written before keep their old names in meta.json.
RENAMED_FIELDS = {"clean-label": {"step_size": "pgd_step_size"},
                  "trojannn": {"lr": "trigger_lr", "batch_size": "trigger_batch_size"}}


def from_description(desc: dict, trigger_state: dict | None = None) -> Attack:
    """Rebuild an attack from the ``{"name", "config"}`` stored in a run's meta.json."""
    renamed = RENAMED_FIELDS.get(desc["name"], {})
    attack = create(desc["name"], **{renamed.get(k, k): v for k, v in desc.get("config", {}).items()})
    if trigger_state:
        attack.load_trigger_state(trigger_state)
    return attack


__all__ = ["ATTACKS", "Attack", "PoisonConfig", "PoisonedDataset", "TriggeredTestSet", "create", "names",
           "from_description", "BadNets", "Blend", "Trojan", "SIG", "WaNet", "Refool", "Patch", "MultiTrigger",
           "CleanLabel", "TrojanNN", "InputAware"]
