"""Architectures (methods_spec.md §2, §9) and the hook-based feature taps."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from backdoor_eraser.errors import UserError
from backdoor_eraser.models import MODELS, attention_sites, create_model
from backdoor_eraser.models.taps import FeatureTaps, resolve_module
from backdoor_eraser.models.wrn import WideResNet


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def bn_channels(model: nn.Module) -> int:
    return sum(m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))


@pytest.fixture(scope="module")
def wrn():
    torch.manual_seed(0)
    return create_model("wrn-16-1").eval()


@pytest.fixture(scope="module")
def preact():
    torch.manual_seed(0)
    return create_model("preact-resnet18").eval()


# ---------------------------------------------------------------- reference xternalz WRN
# An independent copy of xternalz/WideResNet-pytorch's control flow (and/or idioms,
# in-place ReLUs, avg_pool2d(8)). Used to check that our WideResNet computes the same thing.
class _RefBlock(nn.Module):
    def __init__(self, i, o, s):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(i)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(i, o, 3, s, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(o)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(o, o, 3, 1, 1, bias=False)
        self.equalInOut = i == o
        self.convShortcut = (not self.equalInOut) and nn.Conv2d(i, o, 1, s, 0, bias=False) or None

    def forward(self, x):
        if not self.equalInOut:
            x = self.relu1(self.bn1(x))
        else:
            out = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(out if self.equalInOut else x)))
        out = self.conv2(out)
        return torch.add(x if self.equalInOut else self.convShortcut(x), out)


class _RefGroup(nn.Module):
    def __init__(self, n, i, o, s):
        super().__init__()
        self.layer = nn.Sequential(*[_RefBlock(k == 0 and i or o, o, k == 0 and s or 1) for k in range(n)])

    def forward(self, x):
        return self.layer(x)


class _RefWRN(nn.Module):
    def __init__(self, depth=16, num_classes=10, k=1):
        super().__init__()
        c = [16, 16 * k, 32 * k, 64 * k]
        n = (depth - 4) // 6
        self.conv1 = nn.Conv2d(3, c[0], 3, 1, 1, bias=False)
        self.block1 = _RefGroup(n, c[0], c[1], 1)
        self.block2 = _RefGroup(n, c[1], c[2], 2)
        self.block3 = _RefGroup(n, c[2], c[3], 2)
        self.bn1 = nn.BatchNorm2d(c[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(c[3], num_classes)
        self.nChannels = c[3]

    def forward(self, x):
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.relu(self.bn1(out))
        out = F.avg_pool2d(out, 8).view(-1, self.nChannels)
        return self.fc(out)


def _randomise_bn(model: nn.Module) -> None:
    """Non-trivial BN affine parameters and running statistics, so eval mode is really tested."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            with torch.no_grad():
                m.weight.copy_(1 + 0.2 * torch.randn(c, generator=g))
                m.bias.copy_(0.1 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
                m.running_var.copy_(1 + 0.3 * torch.rand(c, generator=g))
                m.num_batches_tracked.fill_(7)


# ------------------------------------------------------------------------- WideResNet
def test_wrn16_1_shapes_via_taps(wrn):
    x = torch.randn(2, 3, 32, 32)
    with FeatureTaps(wrn, attention_sites(wrn)) as taps:
        logits = wrn(x)
        a1, a2, a3 = taps.outputs()
    assert attention_sites(wrn) == ["block1", "block2", "block3"]
    assert a1.shape == (2, 16, 32, 32)
    assert a2.shape == (2, 32, 16, 16)
    assert a3.shape == (2, 64, 8, 8)
    assert logits.shape == (2, 10)


def test_wrn16_1_param_count_and_bn_channels(wrn):
    # By hand: stem 3·16·9 = 432
    # group1: 2 × (BN16 32 + 16·16·9 + BN16 32 + 16·16·9) = 2 × 4,672 = 9,344
    # group2: (BN16 32 + 16·32·9 + BN32 64 + 32·32·9 + 1×1 16·32) + (64 + 9,216 + 64 + 9,216) = 14,432 + 18,560 = 32,992
    # group3: (BN32 64 + 32·64·9 + BN64 128 + 64·64·9 + 32·64) + (128 + 36,864 + 128 + 36,864) = 57,536 + 73,984 = 131,520
    # head: BN64 128 + fc 64·10 + 10 = 778           total = 175,066
    assert n_params(wrn) == 175_066
    # 16·4 + (16+32+32+32) + (32+64+64+64) + 64 = 464   (methods_spec.md §2)
    assert bn_channels(wrn) == 464


BN = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
# The keys of one block, written out for block1.layer.0 (16→16, identity shortcut) ...
BLOCK_EQUAL = (
    [f"bn1.{k}" for k in BN] + ["conv1.weight"] + [f"bn2.{k}" for k in BN] + ["conv2.weight"]
)
# ... and block2.layer.0 (16→32, stride 2): the same plus the 1×1 convShortcut.
BLOCK_SHORTCUT = BLOCK_EQUAL + ["convShortcut.weight"]


def test_wrn16_1_state_dict_keys_match_xternalz_nad_layout(wrn):
    keys = set(wrn.state_dict())
    expected = {"conv1.weight", "fc.weight", "fc.bias"} | {f"bn1.{k}" for k in BN}
    for group in ("block1", "block2", "block3"):
        for b in (0, 1):
            suffixes = BLOCK_SHORTCUT if (group != "block1" and b == 0) else BLOCK_EQUAL
            expected |= {f"{group}.layer.{b}.{s}" for s in suffixes}
    assert keys == expected
    assert len(keys) == 1 + 12 + 12 + 13 + 12 + 13 + 12 + 5 + 2
    for k in ["block2.layer.0.convShortcut.weight", "block1.layer.0.bn1.running_mean",
              "fc.weight", "bn1.num_batches_tracked", "block3.layer.1.conv2.weight"]:
        assert k in keys
    assert "block1.layer.0.convShortcut.weight" not in keys
    assert "block2.layer.1.convShortcut.weight" not in keys
    sd = wrn.state_dict()
    assert sd["block2.layer.0.convShortcut.weight"].shape == (32, 16, 1, 1)
    assert sd["block3.layer.0.conv1.weight"].shape == (64, 32, 3, 3)
    assert sd["fc.weight"].shape == (10, 64)


def test_wrn_loads_xternalz_checkpoint_strict_and_matches_reference(tmp_path):
    torch.manual_seed(3)
    ref = _RefWRN(16, 10, 1)
    _randomise_bn(ref)
    ref.eval()
    path = tmp_path / "nad_layout.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))

    ours = create_model("wrn-16-1").eval()
    ours.load_state_dict(load_file(str(path)), strict=True)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = ref(x)
        got = ours(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)

    # Round trip: our own state dict saved and re-loaded gives bit-identical outputs.
    path2 = tmp_path / "ours.safetensors"
    save_file({k: v.contiguous() for k, v in ours.state_dict().items()}, str(path2))
    again = create_model("wrn-16-1").eval()
    again.load_state_dict(load_file(str(path2)), strict=True)
    with torch.no_grad():
        assert torch.equal(again(x), got)


def test_wrn_init_follows_xternalz():
    torch.manual_seed(0)
    m = create_model("wrn-16-2")
    w = m.block3.layer[1].conv1.weight  # 128×128×3×3
    assert abs(w.std().item() - math.sqrt(2 / (9 * 128))) < 0.01
    assert torch.all(m.bn1.weight == 1) and torch.all(m.bn1.bias == 0)
    assert torch.all(m.fc.bias == 0)


def test_registered_wrn_names_and_pattern_parsing():
    for name in ["wrn-10-1", "wrn-10-2", "wrn-16-1", "wrn-16-2", "wrn-40-1", "wrn-40-2", "preact-resnet18"]:
        assert name in MODELS.names()
    m = create_model("wrn-22-1", num_classes=43)  # not registered: parsed as depth 22, widen 1
    assert isinstance(m, WideResNet)
    assert len(m.block1.layer) == 3 and m.fc.out_features == 43
    assert create_model("WRN-10-2").fc.in_features == 128


def test_bad_depth_and_unknown_arch_raise_user_error():
    with pytest.raises(UserError, match="6n\\+4"):
        create_model("wrn-15-1")
    with pytest.raises(UserError, match="preact-resnet18"):
        create_model("resnet-99")


def test_wrn_mnist_input():
    torch.manual_seed(0)
    m = create_model("wrn-16-1", num_classes=10, in_channels=1).eval()
    assert m.conv1.weight.shape == (16, 1, 3, 3)
    with FeatureTaps(m, attention_sites(m)) as taps, torch.no_grad():
        logits = m(torch.randn(2, 1, 28, 28))
        shapes = [tuple(t.shape[1:]) for t in taps.outputs()]
    assert shapes == [(16, 28, 28), (32, 14, 14), (64, 7, 7)]
    assert logits.shape == (2, 10)


# ------------------------------------------------------------------ PreAct-ResNet-18
def test_preact_resnet18_shapes_and_params(preact):
    # By hand (kuangliu / BackdoorBench layout, no final BN):
    # stem 3·64·9 = 1,728
    # layer1: 2 × (128 + 64·64·9 + 128 + 64·64·9) = 147,968
    # layer2: (128 + 64·128·9 + 256 + 128·128·9 + 64·128) + (256 + 147,456 + 256 + 147,456) = 229,760 + 295,424 = 525,184
    # layer3: (256 + 128·256·9 + 512 + 256·256·9 + 128·256) + (512 + 589,824 + 512 + 589,824) = 918,272 + 1,180,672 = 2,098,944
    # layer4: (512 + 256·512·9 + 1,024 + 512·512·9 + 256·512) + (1,024 + 2,359,296·2 + 1,024) = 3,671,552 + 4,720,640 = 8,392,192
    # linear: 512·10 + 10 = 5,130                 total = 11,171,146
    assert n_params(preact) == 11_171_146
    assert attention_sites(preact) == ["layer1", "layer2", "layer3", "layer4"]
    keys = set(preact.state_dict())
    assert {"conv1.weight", "layer1.0.bn1.running_var", "layer1.0.conv1.weight",
            "layer2.0.shortcut.0.weight", "layer4.1.conv2.weight", "linear.weight", "linear.bias"} <= keys
    assert "layer1.0.shortcut.0.weight" not in keys and "layer2.1.shortcut.0.weight" not in keys
    assert not any(k.startswith("bn.") for k in keys)
    with FeatureTaps(preact, attention_sites(preact)) as taps, torch.no_grad():
        logits = preact(torch.randn(1, 3, 32, 32))
        shapes = [tuple(t.shape[1:]) for t in taps.outputs()]
    assert shapes == [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4)]
    assert logits.shape == (1, 10)


# ------------------------------------------------------------------------ FeatureTaps
def _tiny():
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, stride=2, padding=1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2),
    )


def test_taps_architecture_agnostic_and_gradients_flow():
    torch.manual_seed(0)
    m = _tiny()
    with FeatureTaps(m, ["0", "2"]) as taps:
        m(torch.randn(2, 3, 8, 8))
        f0, f2 = taps.outputs()
        assert f0.shape == (2, 4, 8, 8) and f2.shape == (2, 8, 4, 4)
        assert taps["2"] is f2 and taps.names == ["0", "2"]
        f2.pow(2).mean().backward()  # the captured output is not detached
    assert m[0].weight.grad is not None and m[0].weight.grad.abs().sum() > 0
    assert m[5].weight.grad is None  # only the layers before the tap get gradients


def test_taps_on_1x1_site_raise_user_error_naming_module():
    m = _tiny()
    with FeatureTaps(m, ["3"]):
        with pytest.raises(UserError, match=r"'3' gives a 1×1 map.*earlier module"):
            m(torch.randn(1, 3, 8, 8))
    with FeatureTaps(m, ["4"]):  # a flattened (B, C) output is not a feature map either
        with pytest.raises(UserError, match="'4'"):
            m(torch.randn(1, 3, 8, 8))


def test_unknown_module_name_lists_available(wrn):
    with pytest.raises(UserError, match="block2") as info:
        FeatureTaps(wrn, ["blok2"])
    assert "available" in str(info.value)
    with pytest.raises(UserError, match="no module 'x'"):
        resolve_module(_tiny(), "x")
    assert resolve_module(wrn, "block2.layer.0") is wrn.block2.layer[0]


def test_hooks_removed_after_context_exit():
    m = _tiny()
    with FeatureTaps(m, ["0"]) as taps:
        with pytest.raises(UserError, match="forward"):
            taps.outputs()
        m(torch.randn(1, 3, 8, 8))
        first = taps["0"]
    m(torch.randn(1, 3, 8, 8))
    assert taps["0"] is first  # no capture after exit
    assert not m[0]._forward_hooks
    taps.clear()
    with pytest.raises(UserError):
        taps.outputs()


def test_tuple_output_takes_first_element():
    class Pair(nn.Module):
        def forward(self, x):
            return x * 2, x

    m = nn.Sequential(Pair())
    x = torch.randn(1, 2, 3, 3)
    with FeatureTaps(m, ["0"]) as taps:
        m(x)
        assert torch.equal(taps["0"], x * 2)


def test_attention_sites_missing_raises_user_error():
    with pytest.raises(UserError, match="--sites"):
        attention_sites(_tiny())
