"""Model architectures by name, and the attention sites that the distillation defences use."""
from __future__ import annotations

import re

import torch.nn as nn

from ..errors import UserError
from ..registry import Registry

MODELS: Registry[nn.Module] = Registry("architecture")

_WRN = re.compile(r"wrn-(\d+)-(\d+)")


def create_model(arch: str, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """Build ``arch``: a registered name, or any ``wrn-D-K`` (e.g. ``wrn-28-10``)."""
    if arch not in MODELS:
        m = _WRN.fullmatch(arch.strip().lower())
        if m:
            return wrn.WideResNet(int(m[1]), num_classes, int(m[2]), 0.0, in_channels)
    return MODELS.create(arch, num_classes=num_classes, in_channels=in_channels)


def attention_sites(model: nn.Module) -> list[str]:
    """The default module names whose outputs NAD/ARGD/SAGE distil (e.g. the residual groups)."""
    sites = getattr(model, "attention_sites", None)
    if not sites:
        raise UserError(
            f"{type(model).__name__} defines no default attention sites; name the modules to "
            "distil, e.g. --sites layer1,layer2,layer3"
        )
    return list(sites)


from . import preact_resnet, wrn  # noqa: E402,F401  (imported for their registrations)
