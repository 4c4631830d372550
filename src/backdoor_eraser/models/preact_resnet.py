"""PreAct-ResNet-18 in the kuangliu/pytorch-cifar layout, which VinAI (WaNet, Input-aware)
and SCLBD/BackdoorBench (``models/preact_resnet.py``) also use.

Parameter names: ``conv1``; ``layerL.B.{bn1,conv1,bn2,conv2}``; ``layerL.0.shortcut.0`` (a 1x1
conv with no bias, only where the stride or width changes); ``linear``. Those layouts have
**no** final BatchNorm/ReLU before pooling, and neither has this one: the output of
``layer4`` goes straight to global average pooling. Their checkpoints therefore load with
``strict=True``. For 10 classes that gives 11,171,146 parameters. ``forward`` returns the
logits. The stage outputs (``attention_sites``) are read with forward hooks.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3(stride)-BN-ReLU-conv3x3. The shortcut is the identity on the raw input,
    or ``shortcut`` (a 1x1 conv) applied to the pre-activated input."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    """Stem conv3x3(in→64), four stages (64, 128, 256, 512; strides 1, 2, 2, 2), global average pooling, ``linear``."""

    attention_sites = ["layer1", "layer2", "layer3", "layer4"]

    def __init__(self, num_blocks=(2, 2, 2, 2), num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.attention_sites = list(type(self).attention_sites)
        self.in_planes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.layer1 = self._make_layer(64, num_blocks[0], 1)
        self.layer2 = self._make_layer(128, num_blocks[1], 2)
        self.layer3 = self._make_layer(256, num_blocks[2], 2)
        self.layer4 = self._make_layer(512, num_blocks[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(512 * PreActBlock.expansion, num_classes)

    def _make_layer(self, planes: int, n: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(PreActBlock(self.in_planes, planes, s))
            self.in_planes = planes * PreActBlock.expansion
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = self.avgpool(out).flatten(1)
        return self.linear(out)


def _register() -> None:
    from . import MODELS

    @MODELS.register("preact-resnet18")
    def preact_resnet18(num_classes: int = 10, in_channels: int = 3) -> PreActResNet:
        """PreAct-ResNet-18 (kuangliu / BackdoorBench layout)"""
        return PreActResNet((2, 2, 2, 2), num_classes, in_channels)


_register()
