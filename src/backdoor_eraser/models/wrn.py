"""WideResNet as used by the NAD, ARGD and ABL releases (``models/wresnet.py``).

Those releases adapt xternalz/WideResNet-pytorch; methods_spec.md §2 describes
the architecture. Module names and parameter shapes match theirs, so their
checkpoints load with ``load_state_dict(strict=True)``. There is one change:
``forward`` returns only the logits. The residual-group outputs that NAD, ARGD
and SAGE distil (``attention_sites``) are read with forward hooks
(:class:`backdoor_eraser.models.taps.FeatureTaps`).

The ReLUs are not in-place. The original uses ``inplace=True``, which has no
effect on the numbers or the state dict, but an in-place ReLU would overwrite a
hooked BatchNorm output after it had been captured.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError


class BasicBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3(stride)-BN-ReLU-[dropout]-conv3x3, plus a shortcut.

    If in == out (``equalInOut``), the shortcut is the identity on the raw input.
    Otherwise x is BN-ReLU'd first, and that pre-activated x feeds both the
    residual branch and the 1x1 ``convShortcut``, as in xternalz.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, dropRate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.droprate = dropRate
        self.equalInOut = in_planes == out_planes
        self.convShortcut = (
            None if self.equalInOut
            else nn.Conv2d(in_planes, out_planes, 1, stride=stride, padding=0, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.equalInOut:
            out = self.relu1(self.bn1(x))
        else:
            x = self.relu1(self.bn1(x))
            out = x
        out = self.relu2(self.bn2(self.conv1(out)))
        if self.droprate > 0:
            out = F.dropout(out, p=self.droprate, training=self.training)
        out = self.conv2(out)
        return (x if self.equalInOut else self.convShortcut(x)) + out


class NetworkBlock(nn.Module):
    """A residual group of ``nb_layers`` blocks. Only the first block changes the width and stride."""

    def __init__(self, nb_layers: int, in_planes: int, out_planes: int, block, stride: int,
                 dropRate: float = 0.0):
        super().__init__()
        self.layer = nn.Sequential(*[
            block(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, dropRate)
            for i in range(nb_layers)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-widen_factor (methods_spec.md §2): stem conv, three groups (strides 1, 2, 2),
    then BN-ReLU, global average pooling and ``fc``. ``forward`` returns the logits."""

    attention_sites = ["block1", "block2", "block3"]

    def __init__(self, depth: int = 16, num_classes: int = 10, widen_factor: int = 1,
                 dropRate: float = 0.0, in_channels: int = 3):
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise UserError(f"WideResNet depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 40, ...); got {depth}")
        if widen_factor < 1:
            raise UserError(f"WideResNet widen factor must be >= 1; got {widen_factor}")
        n = (depth - 4) // 6
        ch = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.attention_sites = list(type(self).attention_sites)
        self.conv1 = nn.Conv2d(in_channels, ch[0], 3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, ch[0], ch[1], BasicBlock, 1, dropRate)
        self.block2 = NetworkBlock(n, ch[1], ch[2], BasicBlock, 2, dropRate)
        self.block3 = NetworkBlock(n, ch[2], ch[3], BasicBlock, 2, dropRate)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.relu = nn.ReLU()
        self.fc = nn.Linear(ch[3], num_classes)
        self.nChannels = ch[3]

        # xternalz init: He-normal convs (fan-out), BN weight 1 and bias 0, Linear bias 0
        # (the Linear weight keeps PyTorch's default init).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.block3(self.block2(self.block1(out)))
        out = self.relu(self.bn1(out))
        # Same as the original avg_pool2d(out, 8) at 32x32 input; also works at 28x28.
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


def wrn_factory(depth: int, widen_factor: int):
    """A ``(num_classes=10, in_channels=3)`` factory for WRN-depth-widen_factor."""

    def factory(num_classes: int = 10, in_channels: int = 3) -> WideResNet:
        return WideResNet(depth, num_classes, widen_factor, 0.0, in_channels)

    factory.__doc__ = f"WideResNet-{depth}-{widen_factor} (NAD/ARGD/ABL layout, from xternalz)"
    return factory


def _register() -> None:
    from . import MODELS

    for depth, widen in [(10, 1), (10, 2), (16, 1), (16, 2), (40, 1), (40, 2)]:
        MODELS.register(f"wrn-{depth}-{widen}")(wrn_factory(depth, widen))


_register()
