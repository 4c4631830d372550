"""Fine-pruning, MCR, ANP, RNP and the BN-mask helpers they share (spec §5.2, §5.3, §5.7, §5.9)."""
import copy
import json

import pytest
import torch
from torch import nn

from backdoor_eraser.classifier import Classifier
from backdoor_eraser.errors import UserError
from backdoor_eraser.data.dataset import ImageDataset
from backdoor_eraser.defenses.anp import ANP, ANPConfig
from backdoor_eraser.defenses.bn_masks import (BNMasks, bn_channel_count, bn_layers, prune_bn_channels,
                                               threshold_sweep)
from backdoor_eraser.defenses.fine_pruning import FinePruning, FinePruningConfig
from backdoor_eraser.defenses.mcr import MCR, BezierCurve, MCRConfig, ibm_lr_factor, recompute_bn_stats
from backdoor_eraser.defenses.rnp import RNP, RNPConfig
from backdoor_eraser.metrics import evaluate
from backdoor_eraser.models import create_model
from backdoor_eraser.runs import load_model
from conftest import same_rows


def bn_model(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    return Classifier(net, "tiny-bn", ["a", "b", "c"], input_shape=(3, 8, 8))


def random_data(n=48, size=8):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, size, size), generator=g).to(torch.uint8)
    return ImageDataset(x, torch.arange(n) % 3, ["a", "b", "c"])


def state(model):
    return {k: v.clone() for k, v in model.net.state_dict().items()}


def same_state(model, before):
    return all(torch.equal(v, before[k]) for k, v in model.net.state_dict().items())


# --- BN masks ----------------------------------------------------------------------------------------------

def test_wrn16_1_has_464_bn_channels():
    net = create_model("wrn-16-1")
    layers = bn_layers(net)
    assert len(layers) == 13 and layers[0][0] == "block1.layer.0.bn1" and layers[-1][0] == "bn1"
    assert bn_channel_count(net) == 464


def test_bn_masks_scale_gamma_and_noise_without_touching_weights():
    model = bn_model()
    net = model.net.eval()
    for _, bn in bn_layers(net):  # non-trivial β and running stats
        nn.init.uniform_(bn.bias, -1, 1)
        bn.running_mean.uniform_(-0.5, 0.5)
    before = state(model)
    masks = BNMasks(net, noise=True)
    with torch.no_grad():
        for m, d, xi in zip(masks.masks, masks.weight_noise, masks.bias_noise):
            m.uniform_(0, 1), d.uniform_(-0.4, 0.4), xi.uniform_(-0.4, 0.4)
    x = torch.rand(4, 3, 8, 8)
    ref = copy.deepcopy(net)
    with torch.no_grad():
        for (_, bn), m in zip(bn_layers(ref), masks.masks):
            bn.weight.mul_(m)
    assert torch.allclose(masks(x), ref(x), atol=1e-6)
    masks.perturbed = True
    ref = copy.deepcopy(net)
    with torch.no_grad():
        for (_, bn), m, d, xi in zip(bn_layers(ref), masks.masks, masks.weight_noise, masks.bias_noise):
            bn.weight.mul_(m + d)
            bn.bias.mul_(1 + xi)
    assert torch.allclose(masks(x), ref(x), atol=1e-6)
    assert same_state(model, before)


def test_prune_bn_channels_zeroes_gamma_only_and_counts_match():
    net = create_model("wrn-16-1")
    for _, bn in bn_layers(net):
        nn.init.uniform_(bn.weight, 0.5, 1.5)
        nn.init.uniform_(bn.bias, -1, 1)
    g = torch.Generator().manual_seed(1)
    masks = {name: torch.rand(bn.num_features, generator=g) for name, bn in bn_layers(net)}
    expected = sum(int((m <= 0.2).sum()) for m in masks.values())
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert prune_bn_channels(net, masks, 0.2) == expected > 0
    for name, bn in bn_layers(net):
        sel = masks[name] <= 0.2
        assert torch.all(bn.weight[sel] == 0)
        assert torch.equal(bn.weight[~sel], before[f"{name}.weight"][~sel])
        assert torch.equal(bn.bias, before[f"{name}.bias"])

    net2 = create_model("wrn-16-1")
    assert prune_bn_channels(net2, masks, count=50) == 50
    zeroed = sum(int((bn.weight == 0).sum()) for _, bn in bn_layers(net2))
    assert zeroed == 50
    sweep = threshold_sweep(Classifier(net2, "wrn-16-1", list("0123456789")), masks)
    assert [r["pruned"] for r in sweep] == sorted(r["pruned"] for r in sweep)
    assert sweep[4] == {"threshold": 0.2, "pruned": expected}


# --- ANP and RNP -------------------------------------------------------------------------------------------

def test_anp_masks_stay_in_unit_interval_and_prune_by_threshold_or_fraction():
    model, data = bn_model(), random_data()
    before = state(model)
    anp = ANP(ANPConfig(iterations=15, batch_size=16, lr=5.0))  # a large lr makes the clamp matter
    masks, history = anp.learn_masks(model, data)
    flat = torch.cat(list(masks.values()))
    assert flat.min() >= 0 and flat.max() <= 1 and not torch.all(flat == 1)
    assert history[-1]["iteration"] == 15

    res = ANP(ANPConfig(iterations=15, batch_size=16, lr=5.0)).purify(model, data, quiet=True)
    assert res.info["pruned"] == int((flat <= 0.2).sum())  # same seed, same masks
    gammas = torch.cat([bn.weight.detach() for _, bn in bn_layers(res.model.net)])
    assert int((gammas == 0).sum()) == res.info["pruned"]
    res = ANP(ANPConfig(iterations=15, batch_size=16, fraction=0.25)).purify(model, data, quiet=True)
    assert res.info["pruned"] == 4
    assert same_state(model, before)


def test_anp_resumes_exactly_and_stops_at_the_iteration_budget(tmp_path, interrupt_after_checkpoint):
    """Epochs of ⌈48 / 16⌉ = 3 iterations; 8 iterations stop the third after two. A kill after the first
    epoch's checkpoint and a resume give the uninterrupted masks, noise draws included (two ascent steps)."""
    cfg = ANPConfig(iterations=8, batch_size=16, noise_steps=2)
    model, data = bn_model(), random_data()
    masks, history = ANP(cfg).learn_masks(model, data)
    assert [r["iteration"] for r in history] == [3, 6, 8]
    interrupt_after_checkpoint(1)
    with pytest.raises(KeyboardInterrupt):
        ANP(cfg).purify(model, data, run_dir=tmp_path, quiet=True)
    assert (tmp_path / "masks" / "checkpoint.pt").exists()
    again, history2 = ANP(cfg).learn_masks(model, data, run_dir=tmp_path / "masks", resume=True)
    assert all(torch.equal(again[k], masks[k]) for k in masks)
    keys = ("iteration", "loss", "train_acc", "robust_ce", "mask_mean", "below_threshold")
    assert [[r[k] for k in keys] for r in history2] == [[r[k] for k in keys] for r in history]


def test_rnp_masks_stay_in_unit_interval_and_unlearning_stops_at_the_accuracy_bound():
    model, data = bn_model(), random_data()
    before = state(model)
    rnp = RNP(RNPConfig(unlearn_acc=1.0, recover_epochs=3, batch_size=16, recover_lr=5.0))
    res = rnp.purify(model, data, quiet=True)
    assert res.info["unlearn_epochs"] == 1 and res.info["unlearn_stopped_early"]
    flat = torch.tensor([v for vals in res.info["masks"].values() for v in vals])
    assert flat.min() >= 0 and flat.max() <= 1 and not torch.all(flat == 1)
    assert res.info["pruned"] == int((flat <= 0.2).sum())
    assert same_state(model, before)

    res = RNP(RNPConfig(unlearn_lr=0.0, unlearn_epochs=2, recover_epochs=0, batch_size=16)).purify(
        model, data, quiet=True)
    assert res.info["unlearn_epochs"] == 2 and not res.info["unlearn_stopped_early"]


# --- Fine-pruning ------------------------------------------------------------------------------------------

def fp_model():
    """1×1 conv → ReLU → mean → Linear. Channel activations: c0 = 0.3, c1 = 0.1 (constant, unused by the
    head), c2 = 4·red, c3 = 6·green (class evidence). Red images are class 0, green ones class 1."""
    conv, head = nn.Conv2d(3, 4, 1), nn.Linear(4, 2)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[2, 0], conv.weight[3, 1] = 4.0, 6.0
        conv.bias.copy_(torch.tensor([0.3, 0.1, 0.0, 0.0]))
        head.weight.copy_(torch.tensor([[0.0, 0.0, 1.0, -1.0], [0.0, 0.0, -1.0, 1.0]]))
        head.bias.copy_(torch.tensor([0.0, 0.5]))  # without channel 2, class 0 becomes class 1
    net = nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)
    return Classifier(net, "fp-toy", ["red", "green"], input_shape=(3, 4, 4))


def fp_data(n=40):
    labels = torch.arange(n) % 2
    x = torch.zeros(n, 3, 4, 4, dtype=torch.uint8)
    x[labels == 0, 0] = 255
    x[labels == 1, 1] = 255
    return ImageDataset(x, labels, ["red", "green"])


def test_fine_pruning_prunes_lowest_activation_first_and_stops_at_the_bound():
    model, data = fp_model(), fp_data()
    before = state(model)
    res = FinePruning(FinePruningConfig(epochs=0)).purify(model, data, quiet=True)
    info = res.info
    assert info["layer"] == "4" and info["on_head_input"]
    assert [round(a, 4) for a in info["activation"]] == [0.3, 0.1, 2.0, 3.0]
    assert info["pruned_channels"] == [1, 0]
    assert [r["val_acc"] for r in info["acc_trace"]] == [1.0, 1.0, 1.0, 0.5]
    head = res.model.net[4].weight
    assert torch.all(head[:, [0, 1]] == 0) and torch.equal(head[:, 2:], model.net[4].weight[:, 2:])
    assert same_state(model, before)

    # a looser bound keeps going, but never prunes the last channel
    res = FinePruning(FinePruningConfig(epochs=0, max_acc_drop=0.6)).purify(model, data, quiet=True)
    assert res.info["pruned_channels"] == [1, 0, 2]

    # a named conv layer: the same order, zeroed filters and biases
    res = FinePruning(FinePruningConfig(epochs=0, layer="0")).purify(model, data, quiet=True)
    conv = res.model.net[0]
    assert res.info["pruned_channels"] == [1, 0]
    assert torch.all(conv.weight[[0, 1]] == 0) and torch.all(conv.bias[[0, 1]] == 0) and conv.bias[2:].eq(0).all()


def test_fine_pruning_keeps_pruned_weights_at_zero_while_fine_tuning():
    model, data = fp_model(), fp_data()
    res = FinePruning(FinePruningConfig(epochs=2, batch_size=8, augment="none")).purify(model, data, quiet=True)
    head = res.model.net[4].weight
    assert torch.all(head[:, [0, 1]] == 0)
    assert not torch.equal(head[:, 2:], model.net[4].weight[:, 2:])
    assert res.info["steps"] == 10


# --- MCR ---------------------------------------------------------------------------------------------------

def test_bezier_curve_hits_both_endpoints_exactly_and_the_midpoint_formula():
    a, b = bn_model(0).net, bn_model(1).net
    curve = BezierCurve(a, b)
    with torch.no_grad():
        for th in curve.theta:
            th.normal_()  # a bend far from the midpoint: t = 0 and 1 must still ignore it
    p0, p1, mid = curve.point(0.0), curve.point(1.0), curve.point(0.5)
    for (name, w0), (_, w1), th in zip(a.named_parameters(), b.named_parameters(), curve.theta):
        assert torch.equal(p0[name], w0) and torch.equal(p1[name], w1)
        assert torch.allclose(mid[name], 0.25 * w0 + 0.5 * th + 0.25 * w1, atol=1e-6)
    assert all(p.requires_grad for p in curve.point(0.3).values())


def test_bn_recompute_gives_the_clean_data_statistics():
    torch.manual_seed(0)
    model = Classifier(create_model("wrn-16-1"), "wrn-16-1", list("0123456789"))
    data = random_data(n=50, size=32)
    captured = []
    first = bn_layers(model.net)[0][1]
    handle = first.register_forward_hook(lambda m, i, o: captured.append(i[0].detach()))
    model.net.eval()
    with torch.no_grad():
        model(data.images)
    handle.remove()
    expected = captured[0].mean(dim=(0, 2, 3))
    assert not torch.allclose(first.running_mean, expected, atol=1e-3)
    recompute_bn_stats(model, data, batch_size=16)  # batches 16, 16, 16, 2: the short one counts less
    assert torch.allclose(first.running_mean, expected, atol=1e-5)
    assert first.momentum == 0.1 and not model.net.training


def test_ibm_schedule():
    assert [ibm_lr_factor(e, 100) for e in (0, 50)] == [1.0, 1.0]
    assert ibm_lr_factor(70, 100) == pytest.approx(0.505)
    assert ibm_lr_factor(90, 100) == pytest.approx(0.01) and ibm_lr_factor(99, 100) == 0.01


# --- Each defense erases the synthetic BadNets backdoor (reduced budgets) --------------------------------------
# Thresholds: ASR at most 0.20 (from ≈ 1.00) and ACC within 0.05 of the backdoored model's, unless a
# test says otherwise. They must hold on every host: the fixture's weights, and so the defenses'
# trajectories, differ with the CPU's kernels (AVX-512, AVX2, default). Plain fine-tuning with the
# NAD optimiser (2 epochs at lr 0.1) is not one of the guarantees relied on: on some trajectories of
# the same recipe it leaves the backdoor in place (ASR 0.55-0.95 with ACC 0.96-0.99 seen), so the
# budgets below were checked on such a model too.

MAX_ASR = 0.20
MAX_ACC_DROP = 0.05


def purify_and_report(defense, fx, name, *, max_asr=MAX_ASR, max_acc_drop=MAX_ACC_DROP, **kwargs):
    assert fx.metrics["asr"] >= 0.9 and fx.metrics["acc"] >= 0.9, fx.metrics  # the fixture is backdoored
    before = state(fx.model)
    res = defense.purify(fx.model, fx.clean, quiet=True, **kwargs)
    assert same_state(fx.model, before)
    json.dumps(res.info)  # run folders store it as JSON
    after = evaluate(res.model, fx.splits.test, fx.attack, fx.triggered)
    print(f"\n{name}: ACC {fx.metrics['acc']:.3f} → {after['acc']:.3f}, "
          f"ASR {fx.metrics['asr']:.3f} → {after['asr']:.3f}")
    assert after["asr"] <= max_asr, (name, after)
    assert fx.metrics["acc"] - after["acc"] <= max_acc_drop, (name, fx.metrics, after)
    return res, after


def test_fine_pruning_lowers_asr(synthetic_backdoor):
    fx = synthetic_backdoor
    res, _ = purify_and_report(FinePruning(FinePruningConfig(epochs=2)), fx, "fine-pruning")
    assert 0 < res.info["pruned"] < 64


def test_mcr_lowers_asr(synthetic_backdoor, demo_run):
    """MCR between the backdoored model and a backdoor-free endpoint: the demo's NAD student (its ASR is
    checked by test_end_to_end; here it is only a precondition). The curve point at t = 0.3 is 70 % of
    the way back to the backdoored weights, yet already erases the backdoor (ASR ≤ 0.002 seen from
    t = 0.3 on). MCR's own endpoint, fine-tuning for 2 epochs, is no such guarantee (see above):
    with an endpoint that kept the backdoor, t = 0.3 kept ASR 1.00."""
    fx = synthetic_backdoor
    endpoint, _ = load_model(demo_run / "nad")
    end = evaluate(endpoint, fx.splits.test, fx.attack, fx.triggered)
    assert end["asr"] < MAX_ASR, end
    res, _ = purify_and_report(MCR(MCRConfig(curve_epochs=4)), fx, "mcr", endpoint=endpoint)
    assert res.info["t"] == 0.3 and len(res.history) == 4 and "ft_epochs" not in res.info


def test_mcr_trains_its_own_endpoint_without_one():
    model, data = bn_model(), random_data()
    before = state(model)
    res = MCR(MCRConfig(epochs=1, batch_size=16, curve_epochs=2, curve_batch_size=16)).purify(model, data, quiet=True)
    assert res.info["ft_epochs"] == 1 and res.info["ft_steps"] == 3 and len(res.history) == 2
    assert res.info["total_steps"] == 3 + 2 * 3
    assert not torch.equal(res.artifacts["endpoint"].net[0].weight, model.net[0].weight)
    assert same_state(model, before)


def test_anp_lowers_asr(synthetic_backdoor):
    res, _ = purify_and_report(ANP(ANPConfig(iterations=100, batch_size=32)), synthetic_backdoor, "anp")
    assert res.info["pruned"] > 0


def test_rnp_lowers_asr(synthetic_backdoor):
    """RNP prunes the channels whose masks the recovery drives to (nearly) zero. On this 464-channel
    network, unlearned to 20 % accuracy, recovery drives 30-40 masks to exactly 0, and pruning them
    costs 0.11 ACC with AVX-512 kernels (seen 0.87-0.89 from 0.99-1.00), 0.21 with ATen's AVX2 kernels
    (0.78 from 1.00, ATEN_CPU_CAPABILITY=avx2 on the same machine) and 0.31 with oneDNN held to AVX2 as
    well (0.68 from 0.995, ONEDNN_MAX_CPU_ISA=AVX2 added): which channels reach 0 depends on the
    kernels' rounding. The default threshold 0.2 adds channels still mid-recovery, and ACC then varied
    from 0.53 to 0.88. So the threshold here is 0.05 and the bound is what RNP promises on any host:
    the backdoor gone and the task kept at over five times chance (10 classes), ACC drop ≤ 0.45."""
    cfg = RNPConfig(batch_size=64, unlearn_lr=0.003, recover_epochs=8, threshold=0.05)
    res, _ = purify_and_report(RNP(cfg), synthetic_backdoor, "rnp", max_acc_drop=0.45)
    assert res.info["unlearn_acc"] <= 0.2 and res.info["pruned"] > 0


def test_rnp_unlearning_stop_is_checked_per_step_over_a_window_or_per_epoch():
    data = random_data(n=128)
    # unlearn_acc = 1 makes the check pass at its first opportunity: that shows where the check happens.
    res = RNP(RNPConfig(unlearn_acc=1.0, unlearn_window=32, recover_epochs=0, batch_size=16)).purify(
        bn_model(), data, quiet=True)
    assert res.info["unlearn_steps"] == 2 and res.info["unlearn_epochs"] == 1 and res.info["unlearn_stopped_early"]
    res = RNP(RNPConfig(unlearn_acc=1.0, unlearn_window=0, recover_epochs=0, batch_size=16)).purify(
        bn_model(), data, quiet=True)
    assert res.info["unlearn_steps"] is None and res.info["unlearn_epochs"] == 1 and res.info["unlearn_stopped_early"]
    # With an unreachable bound nothing stops: both epochs run.
    res = RNP(RNPConfig(unlearn_acc=0.0, unlearn_lr=0.0, unlearn_window=32, unlearn_epochs=2, recover_epochs=0,
                        batch_size=16)).purify(bn_model(), data, quiet=True)
    assert res.info["unlearn_epochs"] == 2 and not res.info["unlearn_stopped_early"]
    # No unlearning at all: nothing recorded, nothing stopped.
    res = RNP(RNPConfig(unlearn_epochs=0, recover_epochs=0, batch_size=16)).purify(bn_model(), data, quiet=True)
    assert res.info["unlearn_epochs"] == 0 and res.info["unlearn_steps"] is None
    assert res.info["unlearn_acc"] is None and not res.info["unlearn_stopped_early"]
    with pytest.raises(UserError, match="unlearn_window"):
        RNPConfig(unlearn_window=-1).check()


# --- exact resume of the defenses that used to train in loops of their own ----------------------------------

def _same_weights(a, b):
    sa, sb = a.net.state_dict(), b.net.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("kill_after", [1, 3])
def test_mcr_resumes_exactly_in_either_stage(kill_and_resume, kill_after):
    """One endpoint epoch (checkpoint 1), then three curve epochs (checkpoints 2-4): a kill after the
    endpoint stage or in the middle of the curve, then a resume, give the uninterrupted curve point."""
    cfg = MCRConfig(epochs=1, batch_size=16, curve_epochs=3, curve_batch_size=16)
    whole, again = kill_and_resume(lambda: MCR(cfg), bn_model(), random_data(), kill_after)
    assert _same_weights(again.model, whole.model)
    assert _same_weights(again.artifacts["endpoint"], whole.artifacts["endpoint"])
    assert same_rows(again.history, whole.history) and len(whole.history) == 3


@pytest.mark.parametrize("kill_after", [1, 3])
def test_rnp_resumes_exactly_in_either_stage(kill_and_resume, kill_after):
    """Unlearning in epochs of three steps whose stop test looks at the last 48 images (callback state),
    then two recovery epochs. A kill after unlearning's first epoch or during recovery, and a resume, give
    the same masks, pruning and records as one uninterrupted run. The bound 0.292 sits just above the
    accuracy of the window of steps 2-4 seen on an AVX-512 host (14 of 48): the stop then falls on
    the first step after the kill, which only a resumed window can see."""
    cfg = RNPConfig(batch_size=16, unlearn_epochs=3, unlearn_acc=0.292, unlearn_window=48, recover_epochs=2,
                    threshold=0.5)
    whole, again = kill_and_resume(lambda: RNP(cfg), bn_model(), random_data(), kill_after)
    for key in ("masks", "pruned", "unlearn_steps", "unlearn_epochs", "unlearn_stopped_early"):
        assert again.info[key] == whole.info[key], key
    assert _same_weights(again.model, whole.model)
    assert _same_weights(again.artifacts["unlearned"], whole.artifacts["unlearned"])
    assert same_rows(again.history, whole.history)
    assert [r["phase"] for r in whole.history].count("recover") == 2
