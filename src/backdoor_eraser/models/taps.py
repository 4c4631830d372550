"""Capture intermediate feature maps by module name with forward hooks. This works on any
architecture, like the hook-based NAD in BackdoorBox.

    with FeatureTaps(model, ["block1", "block2", "block3"]) as taps:
        logits = model(x)
        a1, a2, a3 = taps.outputs()

The captured outputs keep their autograd graph, so a distillation loss can backpropagate
through them. Callers detach them where needed, e.g. for a teacher.
"""
from __future__ import annotations

import difflib
from typing import Sequence

import torch
import torch.nn as nn

from ..errors import UserError


def resolve_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name`` in ``model.named_modules()``. An unknown name raises a
    ``UserError`` that lists up to 20 available names, closest matches first."""
    modules = dict(model.named_modules())
    if name in modules:
        return modules[name]
    available = [n for n in modules if n]
    close = difflib.get_close_matches(name, available, n=20, cutoff=0.5)
    shown = close + [n for n in available if n not in close][: 20 - len(close)]
    more = f", ... ({len(available) - len(shown)} more)" if len(available) > len(shown) else ""
    raise UserError(
        f"{type(model).__name__} has no module {name!r}; available: {', '.join(shown)}{more}"
    )


class FeatureTaps:
    """Keeps the latest forward output of each named module of ``model``.

    Each output must be a 4-D (B, C, H, W) map with H*W > 1. Otherwise the forward pass
    raises ``UserError``, because a 1x1 attention map normalises to the constant 1 and
    distilling it does nothing. If a module returns a tuple, the first element is kept.
    """

    def __init__(self, model: nn.Module, names: Sequence[str]):
        if isinstance(names, str):
            names = [names]
        self.names: list[str] = list(names)
        if not self.names:
            raise UserError("no attention sites given; name at least one module")
        self._outputs: dict[str, torch.Tensor] = {}
        self._handles = []
        for name in dict.fromkeys(self.names):  # one hook per distinct name, in order
            module = resolve_module(model, name)
            self._handles.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def hook(module, inputs, output):
            if isinstance(output, (tuple, list)):
                output = output[0]
            if not isinstance(output, torch.Tensor) or output.dim() != 4:
                shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
                raise UserError(
                    f"attention site {name!r} gives output {shape}, not a (B, C, H, W) feature map; "
                    "choose an earlier (convolutional) module"
                )
            h, w = output.shape[-2:]
            if h * w == 1:
                raise UserError(
                    f"attention site {name!r} gives a {h}×{w} map, whose attention is constant "
                    "after normalisation; choose an earlier module"
                )
            self._outputs[name] = output

        return hook

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._outputs:
            if name not in self.names:
                raise UserError(f"{name!r} is not tapped; tapped: {', '.join(self.names)}")
            raise UserError(f"no output captured for {name!r} yet; run a forward pass first")
        return self._outputs[name]

    def outputs(self) -> list[torch.Tensor]:
        """The captured outputs in ``names`` order, from the most recent forward pass."""
        return [self[name] for name in self.names]

    def clear(self) -> None:
        """Forget the captured outputs and free their graphs. The hooks stay registered."""
        self._outputs.clear()

    def remove(self) -> None:
        """Remove the hooks. Outputs captured so far stay readable. Calling it more than once is safe."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> "FeatureTaps":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
