"""Per-channel masks (and ANP's noise) on every BatchNorm2d of a model, and BN-channel pruning.

ANP (spec §5.9) and RNP (spec §5.7) treat the channels of all BatchNorm2d layers as the "neurons"
(464 in WRN-16-1). Both learn a mask m ∈ [0, 1] per channel that scales the BN weight γ, and then
prune the channels with small masks by zeroing γ while keeping β, as both releases do.

Instead of swapping BN modules for masked subclasses (what the releases do), :class:`BNMasks`
evaluates the unchanged network with ``torch.func.functional_call`` and substitutes γ·(m+δ) and
β·(1+ξ) for the BN parameters. This works on any architecture and never writes to the weights.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.func import functional_call

from ..classifier import Classifier
from ..errors import UserError

# The releases' reporting sweep (spec §5.7, §5.9): thresholds 0, 0.05, …, 0.9.
SWEEP_THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(19))


def bn_layers(net: nn.Module) -> list[tuple[str, nn.BatchNorm2d]]:
    """``(name, module)`` of every affine BatchNorm2d, in module order. A BN without γ cannot be masked."""
    return [(name, m) for name, m in net.named_modules() if isinstance(m, nn.BatchNorm2d) and m.weight is not None]


def bn_channel_count(net: nn.Module) -> int:
    """Total number of maskable BN channels (464 for WRN-16-1)."""
    return sum(m.num_features for _, m in bn_layers(net))


class BNMasks:
    """Trainable per-channel masks m (init 1) for every BN layer of ``net``; with ``noise=True`` also
    ANP's weight noise δ and bias noise ξ (init 0).

    Calling it runs ``net`` with BN weight γ·m, or γ·(m+δ) and bias β·(1+ξ) while :attr:`perturbed`
    is set; ``net``'s own parameters are read, never written. Freeze them (``requires_grad_(False)``)
    so that only the masks and noise receive gradients. BN running statistics still update in train
    mode, as in the releases, so use a scratch copy of the model.
    """

    def __init__(self, net: nn.Module, *, noise: bool = False):
        self.net = net
        self.layers = bn_layers(net)
        if not self.layers:
            raise UserError(f"{type(net).__name__} has no BatchNorm2d layers with affine weights to mask")
        like = [bn.weight.detach() for _, bn in self.layers]
        self.masks = [nn.Parameter(torch.ones_like(w)) for w in like]
        self.weight_noise = [nn.Parameter(torch.zeros_like(w)) for w in like] if noise else []
        self.bias_noise = [nn.Parameter(torch.zeros_like(w)) for w in like] if noise else []
        self.perturbed = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        overrides = {}
        for i, (name, bn) in enumerate(self.layers):
            if self.perturbed:
                overrides[f"{name}.weight"] = bn.weight * (self.masks[i] + self.weight_noise[i])
                if bn.bias is not None:
                    overrides[f"{name}.bias"] = bn.bias * (1 + self.bias_noise[i])
            else:
                overrides[f"{name}.weight"] = bn.weight * self.masks[i]
        return functional_call(self.net, overrides, (x,))

    def noise(self) -> list[nn.Parameter]:
        return self.weight_noise + self.bias_noise

    @torch.no_grad()
    def clamp_(self) -> None:
        for m in self.masks:
            m.clamp_(0.0, 1.0)

    def values(self) -> dict[str, torch.Tensor]:
        """Current mask values per BN layer name (detached CPU copies)."""
        return {name: m.detach().cpu().clone() for (name, _), m in zip(self.layers, self.masks)}


def _flat(masks: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([m.flatten() for m in masks.values()]) if masks else torch.zeros(0)


@torch.no_grad()
def prune_bn_channels(net: nn.Module, masks: dict[str, torch.Tensor], threshold: float | None = None, *,
                      count: int | None = None) -> int:
    """Zero the BN weight γ (keep the bias β, as ANP and RNP do) of every channel whose mask is
    ≤ ``threshold``, or of the ``count`` channels with the smallest masks. Returns how many."""
    if (threshold is None) == (count is None):
        raise UserError("give exactly one of a pruning threshold or a channel count")
    modules = dict(bn_layers(net))
    missing = [name for name in masks if name not in modules]
    if missing:
        raise UserError(f"masks name BN layers the model lacks: {', '.join(missing[:5])}")
    if count is not None:
        flat = _flat(masks)
        if not 0 <= count <= len(flat):
            raise UserError(f"cannot prune {count} of {len(flat)} BN channels")
        chosen = torch.zeros(len(flat), dtype=torch.bool)
        chosen[torch.argsort(flat, stable=True)[:count]] = True
        selected = dict(zip(masks, chosen.split([m.numel() for m in masks.values()])))
    else:
        selected = {name: m <= threshold for name, m in masks.items()}
    pruned = 0
    for name, sel in selected.items():
        bn = modules[name]
        bn.weight[sel.to(bn.weight.device)] = 0.0
        pruned += int(sel.sum())
    return pruned


def threshold_sweep(model: Classifier, masks: dict[str, torch.Tensor],
                    eval_fn: Callable[[Classifier], dict] | None = None, thresholds=SWEEP_THRESHOLDS) -> list[dict]:
    """Channels pruned at each threshold and, with ``eval_fn``, the pruned model's metrics. ``model`` is untouched."""
    flat = _flat(masks)
    rows = []
    for th in thresholds:
        row = {"threshold": th, "pruned": int((flat <= th).sum())}
        if eval_fn is not None:
            pruned = model.copy()
            prune_bn_channels(pruned.net, masks, th)
            row.update(eval_fn(pruned))
        rows.append(row)
    return rows


def masks_to_lists(masks: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """JSON-friendly mask values, for ``PurifyResult.info``."""
    return {name: [round(float(v), 6) for v in m] for name, m in masks.items()}
