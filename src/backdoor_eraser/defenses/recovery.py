"""Recovering clean accuracy after erasing: distil the given model's clean predictions back.

Fine-tuning and attention distillation at the papers' lr 0.1 erase a backdoor, but on a model whose
weights are small (20 epochs, cosine to 0, weight decay 5e-4) the same steps cost 12-18 ACC points,
and at lrs small enough to keep the accuracy a blended trigger survives (auto-lr-findings.md). The
backdoored model itself still classifies clean images well: its predictions on the clean subset carry
what the large steps destroyed, and, on images without the trigger, nothing of the backdoor. So after
the defense's own stages, a ``kd`` stage trains the purified model on the clean subset with

    loss = α · T² · KL(softmax(teacher / T) ‖ softmax(student / T)) + (1 − α) · CE(student, y),

the teacher being the untouched input model (frozen, eval mode), seen through the same augmented batch
(Hinton et al.'s distillation loss). ``kd_epochs = 0`` (the default) leaves the defense as it was.
Findings: benchmarks/results/kd-recovery-findings.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..classifier import Classifier
from ..errors import UserError
from ..training import Task, Trainer
from .attention import AttentionDistillation
from .base import DefenseTrainConfig, PurifyResult, Stage

KD_STAGE = Stage("kd", "kd_epochs", "kd", optional=True)


@dataclass
class RecoverableConfig(DefenseTrainConfig):
    """DefenseTrainConfig plus the optional recovery stage: ``kd_epochs`` (0 = off) of distillation from
    the input model at ``kd_lr`` with the ``kd_schedule`` (cosine to 0), temperature ``kd_temperature``,
    weight ``kd_alpha`` on the distillation term, and augmentation ``kd_augment`` (empty: the defense's);
    the other optimiser settings are the defense's. ``kd_augment`` leaves Cutout out: its black squares,
    landing near a corner, look like part of a patch trigger, the teacher answers them with the target
    class, and on the fragile BadNets model the recovery with Cutout brought 4.5 % ASR back where without
    it 2.3 % stayed (val columns, 3 seeds; on Blend the two agree; kd-recovery-findings.md)."""

    # Off at 0, and then, with its settings, no part of a grid cell's identity (registry.identity_dict).
    kd_epochs: int = field(default=0, metadata={"neutral": 0})
    kd_lr: float = field(default=0.05, metadata={"with": "kd_epochs"})
    kd_schedule: str = field(default="cosine", metadata={"with": "kd_epochs"})
    kd_temperature: float = field(default=4.0, metadata={"with": "kd_epochs"})
    kd_alpha: float = field(default=0.9, metadata={"with": "kd_epochs"})
    # "" (the defense's augmentation) is what the stage did before this field existed.
    kd_augment: str = field(default="crop+flip", metadata={"neutral": "", "with": "kd_epochs"})
    # Mix pairs of clean images (per-image weight λ ~ U(0, 1)) before augmenting them: the teacher is
    # matched on images between the clean subset's, which a 2,500-image subset otherwise lacks (Beyer et
    # al., "Knowledge distillation: a good teacher is patient and consistent", CVPR 2022: consistent
    # inputs, mixup and long schedules). Off (False) is what the stage did before the field existed.
    kd_mixup: bool = field(default=False, metadata={"neutral": False, "with": "kd_epochs"})
    # Keep the student's attention maps (at the model's attention sites, NAD's mean |a|² with the release's
    # mean-squared distance) near those of the model the stage starts from, which the defense's own stages
    # erased: weight of Σ_sites d(A(student), A(erased)). The distillation pulls the student back towards
    # the backdoored model as a whole; the anchor holds it to the erased model's features while the
    # outputs are learned back. 0 (off) is what the stage did before the field existed.
    kd_anchor: float = field(default=0.0, metadata={"neutral": 0.0, "with": "kd_epochs"})

    def check(self):
        super().check()
        if (self.kd_epochs < 0 or self.kd_lr < 0 or self.kd_temperature <= 0 or not 0 <= self.kd_alpha <= 1
                or self.kd_anchor < 0):
            raise UserError("kd_epochs must be ≥ 0, kd_lr ≥ 0, kd_temperature > 0, kd_alpha in [0, 1] "
                            "and kd_anchor ≥ 0")
        self.kd_train_config().check()

    def kd_train_config(self):
        return self.train_config(epochs=self.kd_epochs, lr=self.kd_lr, schedule=self.kd_schedule,
                                 augment=self.kd_augment or self.augment)


@dataclass
class EraseRecoverConfig(RecoverableConfig):
    """The defaults of fine-tuning, NAD and ARGD (base.ERASE_RECOVER_SCHEDULE): 10 epochs at a constant
    lr 0.1, then 40 epochs of recovery. Evidence, not a paper's recipe: the papers' schedule (lr ÷10 after
    2 epochs, preset ``short``) left 16-82 % ASR on a fixed-key Blend model trained the papers' way and cost
    11-16 ACC points on models trained with a cosine schedule to lr 0; this one kept ACC within 1.4 points
    and ASR under 3.5 % on every seed of the former and within 3.5 points / under 3 % on the latter
    (benchmarks/results/erase-harder-findings.md; defaults-findings.md says how the default was chosen)."""

    schedule: str = "constant"
    kd_epochs: int = field(default=40, metadata={"neutral": 0})


class DistilBack(Task):
    """α·T²·KL(teacher ‖ student at temperature T) + (1 − α)·CE, the teacher's logits computed on the
    step's own (augmented, normalised) inputs. With ``mixup`` each uint8 image is first mixed with
    another of its batch, λ·x_i + (1 − λ)·x_π(i), λ ~ U(0, 1) per image, and the CE term weighs both
    labels by their share; the generator is the loop's, so a resumed run mixes the same way. With an
    ``anchor`` (an :class:`AttentionDistillation` to a frozen model), ``anchor_weight`` times the sum of its
    per-site distances is added."""

    def __init__(self, teacher: Classifier, temperature: float, alpha: float, mixup: bool = False,
                 anchor: AttentionDistillation | None = None, anchor_weight: float = 0.0):
        super().__init__()
        self.teacher, self.t, self.alpha, self.mixup = teacher, float(temperature), float(alpha), mixup
        self.anchor, self.anchor_weight = anchor, float(anchor_weight)
        self._mix: tuple[torch.Tensor, torch.Tensor] | None = None

    def before_augment(self, x, y, generator):
        if not self.mixup:
            return x, y
        n = len(x)
        lam = torch.rand(n, generator=generator, device="cpu").to(x.device)
        perm = torch.randperm(n, generator=generator, device="cpu").to(x.device)
        mixed = lam[:, None, None, None] * x.float() + (1 - lam[:, None, None, None]) * x[perm].float()
        self._mix = (lam, y[perm])
        return mixed.round_().clamp_(0, 255).to(x.dtype), y

    def loss(self, logits, inputs, labels):
        with torch.no_grad():
            target = F.log_softmax(self.teacher.net(inputs).float() / self.t, 1)
        if self._mix is None:
            ce = F.cross_entropy(logits, labels)
        else:
            lam, other = self._mix
            ce = (lam * F.cross_entropy(logits, labels, reduction="none")
                  + (1 - lam) * F.cross_entropy(logits, other, reduction="none")).mean()
        kd = F.kl_div(F.log_softmax(logits.float() / self.t, 1), target, reduction="batchmean",
                      log_target=True) * self.t ** 2
        loss, terms = self.alpha * kd + (1 - self.alpha) * ce, {"ce": ce.detach(), "kd": kd.detach()}
        if self.anchor is not None:
            at = sum(self.anchor.distances(inputs))
            loss, terms["anchor"] = loss + self.anchor_weight * at, at.detach()
        return loss, terms


def attention_anchor(student: Classifier, anchor: Classifier) -> AttentionDistillation:
    """The distances between ``student``'s attention maps and a frozen ``anchor``'s at the student's attention
    sites (NAD's mean |a|², the release's mean-squared distance); ``remove()`` takes the hooks off."""
    if not student.sites:
        raise UserError(f"kd_anchor needs attention sites, and model {student.arch!r} names none")
    return AttentionDistillation(student, anchor, (1.0,) * len(student.sites))


def recover(original: Classifier, result: PurifyResult, clean, cfg: RecoverableConfig, *,
            run_dir: Path | None = None, resume: bool = False, quiet: bool = False) -> PurifyResult:
    """``result`` after ``cfg.kd_epochs`` of distillation from ``original`` (unchanged; a frozen copy
    teaches), its history extended with ``phase = "kd"`` rows and its totals with the stage's."""
    if not cfg.kd_epochs:
        return result
    teacher = original.copy()
    teacher.net.eval().requires_grad_(False)
    anchor = None
    if cfg.kd_anchor:
        erased = result.model.copy()
        erased.net.eval().requires_grad_(False)
        anchor = attention_anchor(result.model, erased)
    try:
        res = Trainer(cfg.kd_train_config(), desc="kd recovery", quiet=quiet).fit(
            result.model, clean,
            task=DistilBack(teacher, cfg.kd_temperature, cfg.kd_alpha, cfg.kd_mixup, anchor, cfg.kd_anchor),
            run_dir=run_dir / KD_STAGE.folder if run_dir else None, resume=resume)
    finally:
        if anchor is not None:
            anchor.remove()
    info = result.info
    epochs, steps = info.get("total_epochs", info.get("epochs", 0)), info.get("total_steps", info.get("steps", 0))
    info.update(kd_epochs=res.epochs, kd_steps=res.steps, kd_seconds=res.seconds,
                total_epochs=epochs + res.epochs, total_steps=steps + res.steps)
    result.history = list(result.history) + [{"phase": "kd", **r} for r in res.history]
    return result
