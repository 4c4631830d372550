"""Attention maps, the distances between them and the teacher-student attention distillation, shared by
NAD, ARGD, SAGE and the recovery stage (spec §5.4–5.6)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..models.taps import FeatureTaps

if TYPE_CHECKING:
    from ..classifier import Classifier

ATTENTION_FUNCTIONS = ("mean_p", "sum_p", "sum", "max_p")
DISTANCES = ("code", "paper")
EPS = 1e-6  # as in the NAD release's at.py


def attention_map(a: torch.Tensor, p: float = 2.0, function: str = "mean_p") -> torch.Tensor:
    """Channel-reduced attention B×H×W of activations B×C×H×W (not normalised).

    ``mean_p`` = (1/C)·Σ|a|^p (NAD's A^p_mean, the default), ``sum_p`` = Σ|a|^p,
    ``sum`` = Σ|a|, ``max_p`` = max_c |a|^p (SAGE's G^p_max).
    """
    if a.ndim != 4:
        raise UserError(f"attention needs B×C×H×W activations, got shape {tuple(a.shape)}")
    if function == "mean_p":
        return a.abs().pow(p).mean(1)
    if function == "sum_p":
        return a.abs().pow(p).sum(1)
    if function == "sum":
        return a.abs().sum(1)
    if function == "max_p":
        return a.abs().pow(p).amax(1)
    raise UserError(f"unknown attention function {function!r}; known: {', '.join(ATTENTION_FUNCTIONS)}")


def normalize_map(am: torch.Tensor) -> torch.Tensor:
    """Flatten B×H×W to B×(H·W) and divide by its L2 norm + 1e-6 (the release's convention)."""
    flat = am.flatten(1)
    return flat / (flat.norm(dim=1, keepdim=True) + EPS)


def attention_vector(a: torch.Tensor, p: float = 2.0, function: str = "mean_p") -> torch.Tensor:
    """Flattened, L2-normalised attention map B×(H·W)."""
    return normalize_map(attention_map(a, p, function))


def attention_distance(s: torch.Tensor, t: torch.Tensor, mode: str = "code") -> torch.Tensor:
    """Distance between normalised attention vectors B×D.

    ``code``: mean of squared differences over B·D (the released NAD code's ``F.mse_loss``, spec §5.4);
    ``paper``: per-sample L2 norm ‖s − t‖₂, averaged over the batch (the NAD paper's equation).
    For one sample, code = paper² / D.
    """
    if s.shape != t.shape:
        raise UserError(f"attention maps differ in shape: {tuple(s.shape)} vs {tuple(t.shape)}")
    if mode == "code":
        return F.mse_loss(s, t)
    if mode == "paper":
        return (s - t).norm(dim=1).mean()
    raise UserError(f"unknown distance {mode!r}; known: {', '.join(DISTANCES)}")


class AttentionDistillation:
    """CE + Σ_k β_k · d(A(student site k), A(teacher site k)); the teacher side is detached.

    If a teacher map is larger than the student's (a different architecture), it is average-pooled
    to the student's size, as the NAD author suggests for mismatched teachers (NAD issue #13).
    """

    def __init__(self, student: Classifier, teacher: Classifier, beta, *, p=2.0, function="mean_p",
                 distance="code", sites=None, teacher_sites=None):
        self.sites = list(sites or student.sites)
        if not teacher_sites:
            # explicit student sites name modules of the teacher too when both share an architecture
            same_arch = teacher.arch == student.arch
            teacher_sites = self.sites if (sites and same_arch) or not teacher.sites else teacher.sites
        self.teacher_sites = list(teacher_sites)
        if len(self.teacher_sites) != len(self.sites):
            raise UserError(f"student has {len(self.sites)} attention sites but the teacher {len(self.teacher_sites)}")
        if len(beta) != len(self.sites):
            raise UserError(f"beta has {len(beta)} weights but there are {len(self.sites)} attention sites "
                            f"({', '.join(self.sites)})")
        self.beta = [float(b) for b in beta]
        self.p, self.function, self.distance = p, function, distance
        self.teacher = teacher
        self.student_taps = FeatureTaps(student.net, self.sites)
        self.teacher_taps = FeatureTaps(teacher.net, self.teacher_sites)

    def maps(self, s_act: torch.Tensor, t_act: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = attention_map(s_act, self.p, self.function)
        t = attention_map(t_act, self.p, self.function)
        if s.shape[-2:] != t.shape[-2:]:
            size = tuple(min(a, b) for a, b in zip(s.shape[-2:], t.shape[-2:]))
            s = F.adaptive_avg_pool2d(s.unsqueeze(1), size).squeeze(1)
            t = F.adaptive_avg_pool2d(t.unsqueeze(1), size).squeeze(1)
        return normalize_map(s), normalize_map(t)

    def distances(self, inputs) -> list[torch.Tensor]:
        """d(A(student site k), A(teacher site k)) for each k: the teacher's forward pass on ``inputs``
        against the student's latest one."""
        with torch.no_grad():
            self.teacher.net(inputs)
        return [attention_distance(*self.maps(self.student_taps[site], self.teacher_taps[tsite].detach()),
                                   self.distance) for site, tsite in zip(self.sites, self.teacher_sites)]

    def __call__(self, logits, inputs, labels):
        loss = F.cross_entropy(logits, labels)
        terms = {"ce": loss.detach()}
        for k, (d, beta) in enumerate(zip(self.distances(inputs), self.beta)):
            terms[f"at{k + 1}"] = d.detach()
            if beta:
                loss = loss + beta * d
        return loss, terms

    def trainable_parameters(self) -> list:
        return []   # all of them are the student's

    def remove(self):
        self.student_taps.remove()
        self.teacher_taps.remove()
