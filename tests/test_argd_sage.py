"""ARGD and SAGE losses on hand-computed tensors, SAGE's dynamic lr rule, the NAD teacher options, and both
defenses on the shared synthetic BadNets backdoor."""
import math

import pytest
import torch
import torch.nn.functional as F

from backdoor_eraser.classifier import Classifier
from backdoor_eraser.data.dataset import ImageDataset
from backdoor_eraser.defenses.argd import (ARGD, ARGDConfig, AttentionGraphDistillation, RelationEmbedding,
                                           edge_loss, embedding_loss, unit_maps)
from backdoor_eraser.defenses.attention import attention_distance
from backdoor_eraser.defenses.nad import NAD, NADConfig
from backdoor_eraser.defenses.sage import (SAGE, DynamicLR, SAGEConfig, SelfAttentionDistillation, clean_loss,
                                           parse_paths, sad_loss, sad_maps)
from backdoor_eraser.errors import UserError
from backdoor_eraser.metrics import evaluate
from backdoor_eraser.models import create_model
from conftest import same_rows


def _clf(arch="wrn-16-1", seed=0):
    torch.manual_seed(seed)
    return Classifier(create_model(arch), arch, [str(i) for i in range(10)], sites=["block1", "block2", "block3"])


def _map(rows):
    """One sample's map as a 1×H×W tensor."""
    return torch.tensor([rows], dtype=torch.float32)


# ----------------------------------------------------------------------------------------------- ARGD


def test_argd_node_maps_and_distance_by_hand():
    # two channels whose mean square is [3, 4] (teacher) and [4, 3] (student); norm 5 → [.6, .8] and [.8, .6]
    t = torch.tensor([[[[math.sqrt(3), 2.0]], [[math.sqrt(3), 2.0]]]])
    s = torch.tensor([[[[2.0, math.sqrt(3)]], [[2.0, math.sqrt(3)]]]])
    (tm,), (sm,) = unit_maps([t]), unit_maps([s])
    assert tm.shape == (1, 1, 2)  # maps keep their H×W layout
    assert torch.allclose(tm, torch.tensor([[[0.6, 0.8]]]), atol=1e-6)
    # diff (−.2, .2): MSE 0.04, per-sample L2 √0.08
    assert attention_distance(sm.flatten(1), tm.flatten(1), "code").item() == pytest.approx(0.04, rel=1e-4)
    assert attention_distance(sm.flatten(1), tm.flatten(1), "paper").item() == pytest.approx(math.sqrt(0.08), rel=1e-4)


def test_argd_edge_loss_by_hand():
    uniform, corner, one = _map([[0.5, 0.5], [0.5, 0.5]]), _map([[1.0, 0.0], [0.0, 0.0]]), _map([[1.0]])
    # teacher edge: uniform pooled to 1×1 = 0.5, |0.5 − 1| = 0.5; student edge: corner pooled = 0.25, |0.25 − 1| = 0.75
    # loss = (0.5 − 0.75)² = 0.0625
    assert edge_loss([uniform, one], [corner, one]).item() == pytest.approx(0.0625, rel=1e-5)
    # three nodes: pairs (1,2), (1,3), (2,3) with edges T (.5, .5, 0), S (.75, .75, 0) → (.0625 + .0625 + 0)/3
    assert edge_loss([uniform, one, one], [corner, one, one]).item() == pytest.approx(0.125 / 3, rel=1e-5)
    # batch of two: teacher (uniform, uniform), student (corner, uniform)
    t = [torch.cat([uniform, uniform]), torch.cat([one, one])]
    s = [torch.cat([corner, uniform]), torch.cat([one, one])]
    # paper: E_T = (.5, .5), E_S = (.75, .5) → mean(.0625, 0) = .03125
    assert edge_loss(t, s).item() == pytest.approx(0.03125, rel=1e-5)
    # release: squared (.25, .25) / max → (1, 1); (.5625, .25) / .5625 → (1, 4/9); mean(0, (5/9)²) = 25/162
    assert edge_loss(t, s, release=True).item() == pytest.approx(25 / 162, rel=1e-5)


def test_argd_embedding_loss_by_hand():
    t1, t2 = _map([[0.5, 0.5], [0.5, 0.5]]), _map([[1.0]])
    s1, s2 = _map([[1.0, 0.0], [0.0, 0.0]]), _map([[1.0]])
    # distances ‖Γ(T_C^i) − Γ(T_S^j)‖₂ (teacher i, student j), maps pooled to the smaller size:
    # (t1, s1) = ‖(−.5, .5, .5, .5)‖ = 1; (t2, s1) = |1 − .25| = .75; (t1, s2) = |.5 − 1| = .5; (t2, s2) = 0
    weights = torch.tensor([[[0.6, 0.4], [0.3, 0.7]]])  # student j's relation to teachers (t1, t2)
    # 0.6·1 + 0.4·0.75 + 0.3·0.5 + 0.7·0 = 1.05
    assert embedding_loss([t1, t2], [s1, s2], weights).item() == pytest.approx(1.05, abs=1e-5)


def test_relation_embedding_is_a_softmax_over_teacher_nodes():
    emb = RelationEmbedding(3, 2, dim=8, pool=2)
    t = [torch.rand(4, 8, 8), torch.rand(4, 4, 4), torch.rand(4, 2, 2)]
    s = [torch.rand(4, 8, 8), torch.rand(4, 2, 2)]
    w = emb(t, s)
    assert w.shape == (4, 2, 3)
    assert torch.allclose(w.sum(-1), torch.ones(4, 2))


def test_argd_loss_runs_under_bf16_autocast():
    """nn.Bilinear has no autocast rule: the relation embedding must not feed it bf16 beside fp32 weights
    (the default amp 'auto' is bf16 on CPUs that run it natively)."""
    student, teacher = _clf(seed=0), _clf(seed=1)
    obj = AttentionGraphDistillation(student, teacher, (1000.0, 1000.0, 1000.0))
    x, y = torch.rand(4, 3, 32, 32), torch.tensor([1, 2, 3, 4])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, terms = obj(student.net(x), x, y)
    loss.backward()
    assert torch.isfinite(loss) and {"edge", "embed"} <= set(terms)
    assert all(p.grad is not None for p in obj.trainable_parameters())
    obj.remove()


def _argd_objective(**kw):
    student, teacher = _clf(seed=0), _clf(kw.pop("teacher_arch", "wrn-16-1"), seed=1)
    teacher.net.eval()
    student.net.train()
    obj = AttentionGraphDistillation(student, teacher, kw.pop("node_beta", (1000.0, 1000.0, 1000.0)), **kw)
    x, y = torch.rand(4, 3, 32, 32), torch.tensor([1, 2, 3, 4])
    loss, terms = obj(student.net(x), x, y)
    return obj, student, loss, terms


def test_argd_total_is_the_weighted_sum_of_its_terms():
    obj, _, loss, terms = _argd_objective(node_beta=(100.0, 200.0, 300.0), edge_weight=2.0, embed_weight=0.5)
    assert set(terms) == {"ce", "at1", "at2", "at3", "edge", "embed"}
    expected = (terms["ce"] + 100 * terms["at1"] + 200 * terms["at2"] + 300 * terms["at3"]
                + 2 * terms["edge"] + 0.5 * terms["embed"])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert all(torch.isfinite(v) and v > 0 for v in terms.values())
    obj.remove()


def test_argd_embeddings_are_trained_unless_frozen():
    obj, student, loss, _ = _argd_objective()
    params = obj.trainable_parameters()
    assert params and len(params) == len(list(obj.embedding.parameters()))
    loss.backward()
    assert sum(p.grad.abs().sum().item() for p in params if p.grad is not None) > 0
    assert all(p.grad is not None for p in obj.embedding.bilinear.parameters())
    assert student.net.conv1.weight.grad.abs().sum() > 0
    obj.remove()

    obj, student, loss, _ = _argd_objective(learn_embeddings=False)
    assert obj.trainable_parameters() == []
    loss.backward()
    assert all(p.grad is None for p in obj.embedding.parameters())
    assert student.net.conv1.weight.grad.abs().sum() > 0
    obj.remove()


def test_argd_embedding_init_is_seeded_and_a_wider_teacher_works():
    a, _, loss_a, _ = _argd_objective(seed=3, teacher_arch="wrn-16-2")
    b, _, _, _ = _argd_objective(seed=3, teacher_arch="wrn-16-2")
    assert torch.isfinite(loss_a)
    for pa, pb in zip(a.embedding.parameters(), b.embedding.parameters()):
        assert torch.equal(pa, pb)
    a.remove()
    b.remove()


def test_argd_release_compat_settings():
    cfg = ARGDConfig(release_compat=True, node_beta=(1.0, 1.0, 1.0)).resolved()
    assert cfg.node_beta == (2000.0, 5000.0, 2000.0) and not cfg.learn_embeddings
    assert cfg.schedule == "multistep" and cfg.milestones == (3, 6)
    train = cfg.train_config(milestones=cfg.milestones)
    assert [round(train.make_schedule().factor(e, 10), 6) for e in (0, 2.9, 3, 5.9, 6, 9)] == \
        [1, 1, 0.1, 0.1, 0.01, 0.01]
    assert ARGDConfig().resolved().node_beta == (1000.0, 1000.0, 1000.0)
    with pytest.raises(UserError):
        ARGD(ARGDConfig(teacher="oracle"))


# ----------------------------------------------------------------------------------------------- SAGE


def _scripted(rule, losses):
    return [rule.step(v) for v in losses]


def test_dynamic_lr_c1_fires_when_the_loss_rarely_decreases():
    rule = DynamicLR(interval=4, ratio=0.75)
    # first interval: 3 transitions (no loss before epoch 1), one decrease (5 → 4) < 0.75·3
    assert _scripted(rule, [5, 4, 4.5, 4.6]) == [False, False, False, True]
    assert rule.reduced_at == [4] and rule.scale == 0.5


def test_dynamic_lr_c2_fires_when_the_max_loss_does_not_drop_and_neither_fires_otherwise():
    rule = DynamicLR(interval=4, ratio=0.75)
    got = _scripted(rule, [
        5, 4, 3, 2,          # 3 of 3 decreases ≥ 2.25: no C1; no previous interval: no C2
        1.9, 1.8, 1.7, 1.6,  # 4 of 4 decreases (2 → 1.9 counts) ≥ 3; max 1.9 < 5: neither fires
        1.5, 1.4, 2.0, 1.3,  # 3 of 4 decreases ≥ 3: no C1; lr unchanged and max 2.0 ≥ 1.9: C2 fires
        1.2, 1.1, 2.5, 1.0,  # 3 of 4 decreases; max 2.5 ≥ 2.0 but the lr was just changed: no C2
        1.1, 1.2, 1.3, 1.4,  # no decreases: C1 fires
    ])
    assert [e + 1 for e, fired in enumerate(got) if fired] == [12, 20]
    assert rule.reduced_at == [12, 20] and rule.scale == 0.25


def test_dynamic_lr_as_a_callback_scales_every_param_group():
    from backdoor_eraser.training import Loop

    w = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [w]}, {"params": [torch.nn.Parameter(torch.zeros(1))], "lr_scale": 2.0}],
                          lr=0.1)
    loop = Loop(None, opt, epochs=2, steps_per_epoch=1)
    rule = DynamicLR(interval=2, ratio=0.75)
    records = [{"epoch": 1, "loss": 9.0, "ce": 1.0}, {"epoch": 2, "loss": 1.0, "ce": 2.0}]
    for rec in records:
        rule.on_epoch_end(loop, rec)
    # the rule reads "ce" (1 → 2 does not decrease: C1), not "loss" (9 → 1 does)
    assert [g.get("lr_scale", 1.0) for g in opt.param_groups] == [0.5, 1.0]
    assert records[1]["lr_scale"] == 0.5
    again = DynamicLR(interval=2, ratio=0.75)
    again.load_state_dict(rule.state_dict())
    assert (again.losses, again.reduced_at, again.scale) == ([1.0, 2.0], [2], 0.5)
    rule = DynamicLR(interval=1)
    rule.on_epoch_end(loop, {"epoch": 1, "loss": 1.0})  # falls back to "loss"
    assert rule.losses == [1.0]


def test_sad_upsamples_the_deeper_map_and_normalises():
    shallow = torch.ones(1, 3, 4, 4)                        # attention 1 everywhere → 1/4 after normalising
    deep = torch.tensor([[[[0.0, 2.0], [0.0, 2.0]]]])       # attention [[0, 4], [0, 4]]
    a, b = sad_maps(shallow, deep)
    # bilinear ×2 (align_corners=False) of the row [0, 4] is [0, 1, 3, 4]; 4 such rows, norm √104
    assert torch.allclose(a, torch.full((1, 16), 0.25), atol=1e-6)
    assert torch.allclose(b, torch.tensor([[0.0, 1.0, 3.0, 4.0] * 4]) / math.sqrt(104), atol=1e-6)
    # ‖a − b‖² = 1 + 1 − 2·(0.25·32/√104), averaged over 16 pixels
    assert sad_loss(shallow, deep).item() == pytest.approx((2 - 16 / math.sqrt(104)) / 16, rel=1e-4)
    _, raw = sad_maps(shallow, deep, normalize=False)
    assert torch.allclose(raw, torch.tensor([[0.0, 1.0, 3.0, 4.0] * 4]))


def test_sad_is_zero_when_the_maps_agree_after_upsampling():
    m3 = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    m2 = F.interpolate(m3, size=(4, 4), mode="bilinear", align_corners=False)
    m1 = F.interpolate(m2, size=(8, 8), mode="bilinear", align_corners=False)
    acts = [m1.sqrt(), m2.sqrt(), m3.sqrt()]  # one channel each: mean |a|² gives back m1, m2, m3
    obj = SelfAttentionDistillation(_clf(), beta=(300.0,))
    assert obj.paths == [(0, 1), (1, 2)] and obj.beta == [300.0, 300.0]
    assert all(d.item() < 1e-12 for d in obj.distances(acts))
    assert obj.distances([m1.sqrt(), m2.flip(-1).sqrt(), m3.sqrt()])[0].item() > 1e-4
    obj.remove()


@pytest.mark.parametrize("detach", [False, True])
def test_sad_gradient_reaches_the_shallow_map_unless_detached(detach):
    shallow = torch.rand(2, 4, 8, 8, requires_grad=True)
    deep = torch.rand(2, 6, 4, 4, requires_grad=True)
    sad_loss(shallow, deep, detach_shallow=detach).backward()
    assert deep.grad.abs().sum() > 0
    assert (shallow.grad is None) == detach


def test_sage_paths_and_beta():
    assert parse_paths(None, 4) == [(0, 1), (1, 2), (2, 3)]
    assert parse_paths([(0, 2), "1-2"], 3) == [(0, 2), (1, 2)]
    with pytest.raises(UserError):
        parse_paths(["0-3"], 3)
    with pytest.raises(UserError, match="beta has 3 weights but there are 2 paths"):
        SelfAttentionDistillation(_clf(), beta=(1.0, 2.0, 3.0))
    with pytest.raises(UserError):
        SAGE(SAGEConfig(paths=("0-x",)))


# ----------------------------------------------------------------------------------- on the fixture


def test_nad_with_a_wider_teacher_trained_from_scratch(synthetic_backdoor):
    sb = synthetic_backdoor
    clean = sb.clean.subset(range(128))
    res = NAD(NADConfig(epochs=1, teacher_epochs=1, kd_epochs=0, teacher_arch="wrn-16-2")).purify(sb.model, clean,
                                                                                                quiet=True)
    assert res.info["teacher"] == "scratch" and res.info["teacher_arch"] == "wrn-16-2"
    assert res.artifacts["teacher"].arch == "wrn-16-2" and res.model.arch == "wrn-16-1"
    assert math.isfinite(res.history[0]["loss"]) and res.history[0]["at3"] > 0
    with pytest.raises(UserError):
        NAD(NADConfig(teacher="oracle"))


def test_argd_erases_the_synthetic_backdoor(synthetic_backdoor):
    sb = synthetic_backdoor
    # the distillation alone (the default's recovery stage is tested in test_recovery.py)
    res = ARGD(ARGDConfig(epochs=4, teacher_epochs=4, kd_epochs=0)).purify(sb.model, sb.clean, quiet=True)
    after = evaluate(res.model, sb.splits.test, sb.attack, sb.triggered)
    print(f"ARGD: ASR {sb.metrics['asr']:.3f} → {after['asr']:.3f}, ACC {sb.metrics['acc']:.3f} → {after['acc']:.3f}")
    assert after["asr"] < 0.20
    assert sb.metrics["acc"] - after["acc"] < 0.05
    assert res.info["embeddings"] == "learnt" and res.info["total_epochs"] == 8
    assert {"edge", "embed"} <= set(res.history[-1])


def test_sage_erases_the_synthetic_backdoor_and_selects_by_clean_loss(synthetic_backdoor, tmp_path):
    sb = synthetic_backdoor
    res = SAGE(SAGEConfig(epochs=8, lr_interval=2)).purify(sb.model, sb.clean, run_dir=tmp_path, quiet=True)
    after = evaluate(res.model, sb.splits.test, sb.attack, sb.triggered)
    print(f"SAGE: ASR {sb.metrics['asr']:.3f} → {after['asr']:.3f}, ACC {sb.metrics['acc']:.3f} → {after['acc']:.3f}, "
          f"lr reduced after epochs {res.info['lr_reduced_after_epochs']}, selected epoch {res.info['selected_epoch']}")
    assert after["asr"] < sb.metrics["asr"] - 0.50
    assert sb.metrics["acc"] - after["acc"] < 0.05
    # the returned weights are those of the epoch with the lowest clean-subset CE
    best = min(res.history, key=lambda r: r["clean_ce"])
    assert res.info["selected_epoch"] == best["epoch"]
    assert clean_loss(res.model, sb.clean) == pytest.approx(best["clean_ce"], rel=1e-4)
    # the selection survives a resume: it is part of the loop's checkpoint
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["callbacks"][0]
    assert saved["epoch"] == best["epoch"] and saved["loss"] == pytest.approx(best["clean_ce"])


def test_sage_resumes_exactly_with_the_dynamic_lr_mid_schedule(kill_and_resume):
    """Six epochs with the rule checked every 2 epochs; ρ = 2 makes C1 hold at every check, so the lr
    halves after epochs 2, 4 and 6. A kill after epoch 3 (the rule has acted once and holds half an
    interval of losses) and a resume give the uninterrupted run's lrs, reductions, selection and weights."""
    g = torch.Generator().manual_seed(0)
    data = ImageDataset(torch.randint(0, 256, (48, 3, 16, 16), generator=g).to(torch.uint8),
                        torch.arange(48) % 10, [str(i) for i in range(10)])
    cfg = SAGEConfig(epochs=6, lr_interval=2, lr_ratio=2.0, batch_size=16)
    whole, again = kill_and_resume(lambda: SAGE(cfg), _clf(), data, 3)
    assert whole.info["lr_reduced_after_epochs"] == [2, 4, 6]
    assert [r["lr"] for r in whole.history] == pytest.approx([0.05, 0.05, 0.025, 0.025, 0.0125, 0.0125])
    assert same_rows(again.history, whole.history)
    for key in ("lr_reduced_after_epochs", "selected_epoch", "selected_clean_ce"):
        assert again.info[key] == whole.info[key], key
    a, b = again.model.net.state_dict(), whole.model.net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
