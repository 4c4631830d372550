"""The optional recovery stage: distillation of the input model's clean predictions after erasing."""
import math
from types import SimpleNamespace

import pytest
import torch

from backdoor_eraser import defenses
from backdoor_eraser.classifier import Normalization
from backdoor_eraser.data.dataset import ImageDataset
from backdoor_eraser.defenses.attention import attention_vector
from backdoor_eraser.defenses.recovery import DistilBack, attention_anchor
from backdoor_eraser.errors import UserError
from backdoor_eraser.runs import new_model
from conftest import same_rows


def fixed_teacher(logits):
    return SimpleNamespace(net=lambda inputs: logits.expand(len(inputs), -1))


def test_distil_back_loss_by_hand():
    teacher = fixed_teacher(torch.tensor([[0.0, math.log(3.0)]]))   # softmax [0.25, 0.75]
    student, labels = torch.zeros(1, 2), torch.tensor([1])          # softmax [0.5, 0.5]; CE ln 2
    kl = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)                 # KL([.25, .75] ‖ [.5, .5]) = 0.130812
    loss, terms = DistilBack(teacher, temperature=1.0, alpha=0.5).loss(student, torch.zeros(1, 3, 2, 2), labels)
    assert loss.item() == pytest.approx(0.5 * kl + 0.5 * math.log(2), rel=1e-5)
    assert terms["kd"].item() == pytest.approx(kl, rel=1e-5) and terms["ce"].item() == pytest.approx(math.log(2))
    # T = 2: the teacher's softmax of [0, ln 3 / 2] is [1, √3] / (1 + √3); the KL term is scaled by T² = 4
    p = 1 / (1 + math.sqrt(3))
    kl2 = p * math.log(2 * p) + (1 - p) * math.log(2 * (1 - p))
    loss, terms = DistilBack(teacher, temperature=2.0, alpha=0.9).loss(student, torch.zeros(1, 3, 2, 2), labels)
    assert terms["kd"].item() == pytest.approx(4 * kl2, rel=1e-5)
    assert loss.item() == pytest.approx(0.9 * 4 * kl2 + 0.1 * math.log(2), rel=1e-5)


def test_mixup_mixes_each_image_with_another_of_its_batch_and_weighs_both_labels():
    x = torch.tensor([0, 100, 255], dtype=torch.uint8)[:, None, None, None].expand(3, 1, 2, 2).contiguous()
    y = torch.tensor([0, 1, 1])
    task = DistilBack(fixed_teacher(torch.zeros(1, 2)), temperature=1.0, alpha=0.0, mixup=True)
    g = torch.Generator().manual_seed(5)
    lam, perm = torch.rand(3, generator=g), torch.randperm(3, generator=torch.Generator().set_state(g.get_state()))
    mixed, labels = task.before_augment(x, y, torch.Generator().manual_seed(5))
    values = torch.tensor([0.0, 100.0, 255.0])
    expect = (lam * values + (1 - lam) * values[perm]).round()
    assert mixed.dtype == torch.uint8 and torch.equal(labels, y)
    assert torch.equal(mixed[:, 0, 0, 0], expect.to(torch.uint8)) and torch.equal(mixed, mixed[:, :, :1, :1].expand_as(mixed))
    # α = 0: the loss is the CE of both labels weighted by their shares λ and 1 − λ
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    ce = lambda target: torch.nn.functional.cross_entropy(logits, target, reduction="none")
    loss, terms = task.loss(logits, torch.zeros(3, 1, 2, 2), y)
    assert loss.item() == pytest.approx((lam * ce(y) + (1 - lam) * ce(y[perm])).mean().item(), rel=1e-6)
    # without mixup nothing is rewritten
    plain = DistilBack(fixed_teacher(torch.zeros(1, 2)), temperature=1.0, alpha=0.0)
    assert plain.before_augment(x, y, g)[0] is x


def tiny(n=40):
    g = torch.Generator().manual_seed(0)
    return ImageDataset(torch.randint(0, 256, (n, 3, 8, 8), generator=g).to(torch.uint8), torch.arange(n) % 4,
                        ["a", "b", "c", "d"])


def weights(model):
    return {k: v.clone() for k, v in model.net.state_dict().items()}


@pytest.mark.parametrize("name, params", [("finetune", dict(epochs=1)), ("nad", dict(epochs=1, teacher_epochs=1)),
                                          ("argd", dict(epochs=1, teacher_epochs=1)), ("sage", dict(epochs=1))])
def test_recovery_stage_runs_after_the_defense_and_leaves_the_input_alone(tmp_path, name, params):
    data = tiny()
    model = new_model("wrn-10-1", data.classes, (3, 8, 8), Normalization(), "cpu", 0)
    before = weights(model)
    plain = defenses.create(name, batch_size=16, kd_epochs=0, **params).purify(model, data, quiet=True)
    res = defenses.create(name, batch_size=16, kd_epochs=2, **params).purify(model, data, run_dir=tmp_path,
                                                                             quiet=True)
    assert all(torch.equal(v, before[k]) for k, v in model.net.state_dict().items())
    kd_rows = [r for r in res.history if r.get("phase") == "kd"]
    assert len(kd_rows) == 2 and same_rows(res.history[:-2], plain.history)   # the defense itself is unchanged
    assert {"ce", "kd"} <= set(kd_rows[0]) and 0 < kd_rows[1]["lr"] < kd_rows[0]["lr"] <= 0.05  # cosine from kd_lr
    assert res.info["kd_epochs"] == 2 and res.info["kd_steps"] == 2 * math.ceil(40 / 16)
    assert res.info["total_steps"] == plain.info.get("total_steps", plain.info["steps"]) + res.info["kd_steps"]
    assert (tmp_path / "kd" / "checkpoint.pt").is_file()
    # the stage trained the purified model further
    assert any(not torch.equal(v, plain.model.net.state_dict()[k]) for k, v in res.model.net.state_dict().items())


@pytest.mark.parametrize("anchor", [0.0, 10.0])
def test_recovery_resumes_exactly(kill_and_resume, anchor):
    data = tiny()
    model = new_model("wrn-10-1", data.classes, (3, 8, 8), Normalization(), "cpu", 0)
    # checkpoints 1-2: fine-tuning; 3: the first of three recovery epochs
    whole, again = kill_and_resume(lambda: defenses.create("finetune", epochs=2, batch_size=16, kd_epochs=3,
                                                           kd_anchor=anchor), model, data, 3)
    a, b = again.model.net.state_dict(), whole.model.net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert same_rows(again.history, whole.history) and len(whole.history) == 5


def test_recovery_with_mixup_resumes_exactly_and_differs_from_plain(kill_and_resume):
    data = tiny()
    model = new_model("wrn-10-1", data.classes, (3, 8, 8), Normalization(), "cpu", 0)
    make = lambda **kw: defenses.create("finetune", epochs=1, batch_size=16, kd_epochs=2, **kw)
    whole, again = kill_and_resume(lambda: make(kd_mixup=True), model, data, 2)
    a, b = again.model.net.state_dict(), whole.model.net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a) and same_rows(again.history, whole.history)
    plain = make().purify(model, data, quiet=True)
    assert same_rows(plain.history[:1], whole.history[:1])   # the fine-tuning epoch is the same
    assert plain.history[-1]["kd"] != whole.history[-1]["kd"]


def test_the_attention_anchor_adds_the_distance_to_the_erased_models_maps():
    model = new_model("wrn-10-1", ["a", "b", "c", "d"], (3, 8, 8), Normalization(), "cpu", 0)
    other = new_model("wrn-10-1", ["a", "b", "c", "d"], (3, 8, 8), Normalization(), "cpu", 1)
    x, labels = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    other.net.eval()   # the anchor is frozen in eval mode; the student trains
    by_hand = []
    for m in (model, other):   # the maps by hand, through a forward pass with hooks of our own
        taps = {}
        hooks = [m.net.get_submodule(s).register_forward_hook(lambda mod, i, o, s=s: taps.__setitem__(s, o))
                 for s in model.sites]
        with torch.no_grad():
            m.net(x)
        by_hand.append([attention_vector(taps[s]) for s in model.sites])
        for h in hooks:
            h.remove()
    expect = sum(((a - b) ** 2).mean() for a, b in zip(*by_hand)).item()
    anchor = attention_anchor(model, other)
    try:
        task = DistilBack(fixed_teacher(torch.zeros(1, 4)), temperature=1.0, alpha=0.0, anchor=anchor,
                          anchor_weight=10.0)
        logits = model.net(x)
        loss, terms = task.loss(logits, x, labels)
        ce = torch.nn.functional.cross_entropy(logits, labels).item()
        assert expect > 0 and terms["anchor"].item() == pytest.approx(expect, rel=1e-5)
        assert loss.item() == pytest.approx(ce + 10.0 * expect, rel=1e-5)
        loss.backward()   # the gradient reaches the student, not the anchor
        assert model.net.conv1.weight.grad is not None and other.net.conv1.weight.grad is None
    finally:
        anchor.remove()
    assert not model.net.get_submodule(model.sites[0])._forward_hooks


def test_an_anchored_recovery_stays_nearer_the_erased_models_attention():
    data = tiny()
    model = new_model("wrn-10-1", data.classes, (3, 8, 8), Normalization(), "cpu", 0)
    make = lambda **kw: defenses.create("finetune", epochs=4, batch_size=10, kd_epochs=3, kd_lr=0.05, **kw)
    plain, held = make().purify(model, data, quiet=True), make(kd_anchor=10.0).purify(model, data, quiet=True)
    assert same_rows(plain.history[:4], held.history[:4])   # the fine-tuning is the same
    assert all("anchor" in r for r in held.history if r.get("phase") == "kd")
    erased = defenses.create("finetune", epochs=4, batch_size=10, kd_epochs=0).purify(model, data, quiet=True).model
    x, dist = data.images.float() / 255, {}
    for name, res in (("plain", plain), ("held", held)):   # the final maps' distance to the erased model's
        anchor = attention_anchor(res.model, erased)
        res.model.net.eval()
        with torch.no_grad():
            res.model.net(x)
            dist[name] = sum(anchor.distances(x)).item()
        anchor.remove()
    assert dist["held"] < 0.7 * dist["plain"]


@pytest.mark.parametrize("bad", [dict(kd_anchor=-1.0), dict(kd_epochs=-1), dict(kd_temperature=0.0), dict(kd_alpha=1.5),
                                 dict(kd_schedule="sometimes"), dict(kd_epochs=2, kd_augment="crop+blur")])
def test_bad_recovery_settings_are_refused(bad):
    with pytest.raises(UserError):
        defenses.create("nad", **bad)


def test_an_epoch_budget_leaves_the_recovery_stage_off():
    # on by default for fine-tuning, off by default for SAGE: a budget is all the training there is
    assert defenses.epoch_budget_params("finetune", 4, 500) == {"epochs": 4, "kd_epochs": 0}
    assert defenses.epoch_budget_params("sage", 4, 500) == {"epochs": 4, "kd_epochs": 0}
    assert defenses.epoch_budget_params("nad", 3, 500) == {"teacher_epochs": 3, "epochs": 3, "kd_epochs": 0}


def test_an_unused_recovery_stage_is_no_part_of_a_grid_cells_identity():
    from backdoor_eraser.registry import config_to_dict, identity_dict

    off = defenses.create("nad", kd_epochs=0).config
    ident = identity_dict(off)
    assert not [k for k in ident if k.startswith("kd_")]
    optional = ("kd_", "auto_lr", "lr_factors", "lr_tolerance", "lr_held_out")   # both off by default
    assert ident == {k: v for k, v in config_to_dict(off).items() if not k.startswith(optional)}
    # settings of a stage that does not run change nothing, so they identify nothing either
    assert identity_dict(defenses.create("nad", kd_epochs=0, kd_lr=0.01).config) == ident
    on = identity_dict(defenses.create("nad", kd_epochs=5).config)
    assert on["kd_epochs"] == 5 and on["kd_lr"] == 0.05 and on["kd_temperature"] == 4.0
    assert identity_dict(defenses.create("nad", kd_epochs=5, kd_lr=0.01).config) != on
    # the recovery's own augmentation; "" (the defense's, what the stage did before the field existed)
    # identifies nothing
    assert on["kd_augment"] == "crop+flip"
    assert "kd_augment" not in identity_dict(defenses.create("nad", kd_epochs=5, kd_augment="").config)
    assert "kd_mixup" not in on and identity_dict(defenses.create("nad", kd_epochs=5, kd_mixup=True).config)["kd_mixup"]


def test_the_recovery_leaves_cutout_out_unless_told_to_take_the_defenses_augmentation():
    cfg = defenses.create("nad", kd_epochs=5).config
    assert cfg.augment == "crop+flip+cutout" and cfg.kd_train_config().augment == "crop+flip"
    same = defenses.create("nad", kd_epochs=5, kd_augment="").config
    assert same.kd_train_config().augment == "crop+flip+cutout"
    assert cfg.kd_train_config().epochs == 5 and cfg.kd_train_config().lr == 0.05
