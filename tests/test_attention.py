"""Attention maps and NAD distances on hand-computed tensors."""
import math

import pytest
import torch

from backdoor_eraser.classifier import Classifier
from backdoor_eraser.defenses.attention import attention_distance, attention_map, attention_vector
from backdoor_eraser.defenses.nad import AttentionDistillation
from backdoor_eraser.errors import UserError
from backdoor_eraser.models import create_model


def test_attention_map_by_hand():
    # two channels on a 1×2 map: a = [[1, -2]], [[3, 0]]
    a = torch.tensor([[[[1.0, -2.0]], [[3.0, 0.0]]]])
    assert torch.allclose(attention_map(a, 2, "mean_p"), torch.tensor([[[5.0, 2.0]]]))   # (1+9)/2, (4+0)/2
    assert torch.allclose(attention_map(a, 2, "sum_p"), torch.tensor([[[10.0, 4.0]]]))
    assert torch.allclose(attention_map(a, 1, "sum"), torch.tensor([[[4.0, 2.0]]]))
    assert torch.allclose(attention_map(a, 2, "max_p"), torch.tensor([[[9.0, 4.0]]]))
    v = attention_vector(a)
    assert torch.allclose(v, torch.tensor([[5.0, 2.0]]) / (math.sqrt(29) + 1e-6))


def test_attention_vectors_have_unit_norm_and_sum_equals_mean_after_normalising():
    a = torch.randn(4, 8, 5, 5)
    v = attention_vector(a)
    assert torch.allclose(v.norm(dim=1), torch.ones(4), atol=1e-5)
    assert torch.allclose(v, attention_vector(a, function="sum_p"), atol=1e-6)


def test_code_and_paper_distance_relation():
    s = torch.tensor([[0.6, 0.8, 0.0, 0.0]])
    t = torch.tensor([[0.0, 0.6, 0.8, 0.0]])
    # diff = (0.6, 0.2, -0.8, 0): squared norm 1.04
    assert attention_distance(s, t, "code").item() == pytest.approx(1.04 / 4)
    assert attention_distance(s, t, "paper").item() == pytest.approx(math.sqrt(1.04))
    # code = paper² / D for one sample (spec §9)
    assert attention_distance(s, t, "code").item() == pytest.approx(attention_distance(s, t, "paper").item() ** 2 / 4)
    with pytest.raises(UserError):
        attention_distance(s, t, "cosine")


def _wrn(seed):
    torch.manual_seed(seed)
    net = create_model("wrn-16-1")
    return Classifier(net, "wrn-16-1", [str(i) for i in range(10)], sites=["block1", "block2", "block3"])


def test_nad_loss_equals_ce_plus_weighted_distances():
    student, teacher = _wrn(0), _wrn(1)
    teacher.net.eval()
    beta = (500.0, 1000.0, 2000.0)
    obj = AttentionDistillation(student, teacher, beta)
    x = torch.rand(3, 3, 32, 32)
    y = torch.tensor([1, 2, 3])
    student.net.train()
    logits = student.net(x)
    loss, terms = obj(logits, x, y)

    # recompute by hand from separate forward passes
    feats = {}
    hooks = [student.net.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: feats.__setitem__(("s", n), o))
             for n in obj.sites]
    hooks += [teacher.net.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: feats.__setitem__(("t", n), o))
              for n in obj.sites]
    torch.manual_seed(0)
    with torch.no_grad():
        teacher.net(x)
    for h in hooks:
        h.remove()
    expected = torch.nn.functional.cross_entropy(logits, y)
    for b, n in zip(beta, obj.sites):
        sv = attention_vector(obj.student_taps[n])
        tv = attention_vector(feats[("t", n)])
        expected = expected + b * ((sv - tv) ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert set(terms) == {"ce", "at1", "at2", "at3"}
    # gradients reach the student, never the teacher
    loss.backward()
    assert student.net.conv1.weight.grad is not None and student.net.conv1.weight.grad.abs().sum() > 0
    assert teacher.net.conv1.weight.grad is None
    obj.remove()


def test_nad_identical_teacher_gives_zero_attention_loss():
    student = _wrn(0)
    teacher = student.copy()
    student.net.eval()
    teacher.net.eval()
    obj = AttentionDistillation(student, teacher, (500, 1000, 1000))
    x = torch.rand(2, 3, 32, 32)
    _, terms = obj(student.net(x), x, torch.tensor([0, 1]))
    assert all(terms[f"at{k}"].item() < 1e-12 for k in (1, 2, 3))


def test_nad_beta_length_must_match_sites():
    with pytest.raises(UserError, match="beta has 2 weights but there are 3"):
        AttentionDistillation(_wrn(0), _wrn(1), (500, 1000))
