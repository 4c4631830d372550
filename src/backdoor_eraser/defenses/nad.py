"""NAD: Neural Attention Distillation (Li et al., ICLR 2021), spec §5.4."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from ..classifier import Classifier
from ..errors import UserError
from ..runs import new_model
from ..training import Task, Trainer, TrainConfig, eval_columns
from .attention import ATTENTION_FUNCTIONS, DISTANCES, AttentionDistillation
from .base import ERASE_RECOVER_SCHEDULE, NAD_PAPER_SCHEDULE, NAD_RELEASE_SCHEDULE, Defense, PurifyResult, Stage
from .recovery import KD_STAGE, EraseRecoverConfig, recover


@dataclass
class DistillationConfig(EraseRecoverConfig):
    """What the teacher-student distillations (NAD, ARGD) share: attention = mean over channels of |a|^p,
    taken at ``sites`` (default the model's residual groups) and the teacher's ``teacher_sites``; the
    teacher is the backdoored model fine-tuned for ``teacher_epochs`` on the clean subset with the same
    optimiser, or with ``teacher="scratch"`` a fresh ``teacher_arch`` model (default the student's)
    trained there. A ``teacher_arch`` other than the student's implies ``scratch``, since a backdoored
    model cannot be fine-tuned into another architecture; its attention maps are pooled to the
    student's size where they differ."""

    p: float = 2.0
    attention: str = "mean_p"
    teacher_epochs: int = 10
    sites: tuple[str, ...] | None = None
    teacher_sites: tuple[str, ...] | None = None
    teacher: str = "finetune"
    teacher_arch: str | None = None

    def check(self):
        super().check()
        check_teacher(self.teacher)
        if self.attention not in ATTENTION_FUNCTIONS:
            raise UserError(f"attention must be one of {', '.join(ATTENTION_FUNCTIONS)}, got {self.attention!r}")
        if self.p <= 0:
            raise UserError(f"attention power p must be > 0, got {self.p}")


@dataclass
class NADConfig(DistillationConfig):
    """Defaults: the release's β = (500, 1000, 1000) with its mean-squared distance (``distance='code'``);
    ``distance='paper'`` uses the paper's per-sample L2 norm; p = 2, maps flattened and L2-normalised.
    Teacher studies of the NAD paper: Fig. 4 (fine-tuned backdoored vs. clean-from-scratch teacher,
    ``teacher="scratch"``) and Table 2 (other architectures, ``teacher_arch``)."""

    beta: tuple[float, ...] = (500.0, 1000.0, 1000.0)
    distance: str = "code"

    def check(self):
        super().check()
        if self.distance not in DISTANCES:
            raise UserError(f"NAD distance must be one of {', '.join(DISTANCES)}, got {self.distance!r}")


TEACHERS = ("finetune", "scratch")


def check_teacher(kind: str):
    if kind not in TEACHERS:
        raise UserError(f"teacher must be one of {', '.join(TEACHERS)}, got {kind!r}")


def freeze(teacher: Classifier) -> Classifier:
    teacher.net.eval()
    for p in teacher.net.parameters():
        p.requires_grad_(False)
    return teacher


def make_teacher(model: Classifier, clean, train: TrainConfig, *, kind: str = "finetune", arch: str | None = None,
                 run_dir: Path | None = None, resume: bool = False, quiet: bool = False, desc: str = "teacher"
                 ) -> tuple[Classifier, dict]:
    """A frozen distillation teacher trained on the clean subset, and its bookkeeping.

    ``finetune``: the backdoored model fine-tuned (NAD's B-F teacher, spec §5.4); ``scratch``: a fresh
    ``arch`` model (default the student's; initialisation seeded by ``train.seed``), NAD Fig. 4's C
    teacher. Another architecture than the student's is always trained from scratch.
    """
    check_teacher(kind)
    arch = arch or model.arch
    if arch != model.arch:
        kind = "scratch"
    if kind == "finetune":
        teacher = model.copy()
    else:
        teacher = new_model(arch, model.classes, model.input_shape, model.normalization, device=model.device,
                            seed=train.seed)
    res = Trainer(train, desc=desc, quiet=quiet).fit(teacher, clean, run_dir=run_dir, resume=resume)
    info = {"teacher": kind, "teacher_arch": arch, "teacher_epochs": res.epochs, "teacher_steps": res.steps,
            "teacher_seconds": res.seconds}
    return freeze(teacher), info


def distil(name: str, model: Classifier, clean, cfg: DistillationConfig, train: TrainConfig, objective_for, *,
           teacher: Classifier | None, info: dict, run_dir: Path | None, resume: bool, quiet: bool, eval_fn
           ) -> PurifyResult:
    """The teacher-student stages NAD and ARGD share: the teacher (``train`` for ``cfg.teacher_epochs``,
    under ``run_dir``/teacher) unless one is given, the student trained on ``objective_for(student,
    teacher)`` with ``train``, then the optional recovery stage. ``info`` gains every stage's bookkeeping."""
    if teacher is None:
        teacher, t_info = make_teacher(model, clean, dataclasses.replace(train, epochs=cfg.teacher_epochs),
                                       kind=cfg.teacher, arch=cfg.teacher_arch, resume=resume, quiet=quiet,
                                       run_dir=run_dir / "teacher" if run_dir else None, desc=f"{name} teacher")
        info.update(t_info)
    else:
        info.update(teacher="given", teacher_arch=teacher.arch)
    freeze(teacher)
    student = model.copy()
    objective = objective_for(student, teacher)
    try:
        res = Trainer(train, desc=f"{name} student", quiet=quiet).fit(
            student, clean, task=Task(objective, parameters=objective.trainable_parameters()),
            callbacks=eval_columns(eval_fn), run_dir=run_dir, resume=resume)
    finally:
        objective.remove()
    info.update(epochs=res.epochs, steps=res.steps, seconds=res.seconds, sites=objective.sites,
                total_epochs=res.epochs + info.get("teacher_epochs", 0),
                total_steps=res.steps + info.get("teacher_steps", 0))
    return recover(model, PurifyResult(student, res.history, info, {"teacher": teacher}), clean, cfg,
                   run_dir=run_dir, resume=resume, quiet=quiet)


def check_distillation(model: Classifier, beta, *, sites=None, teacher_sites=None, teacher_arch=None) -> None:
    """What :class:`AttentionDistillation` would refuse for ``model``, found before the teacher is trained:
    the sites exist in student and teacher and there is one β per site. The model stands in for a teacher
    of its own architecture; hooks are removed again."""
    teacher = model
    if teacher_arch and teacher_arch != model.arch:
        with torch.random.fork_rng(devices=[]):  # new_model seeds the global generator
            teacher = new_model(teacher_arch, model.classes, model.input_shape, model.normalization)
    AttentionDistillation(model, teacher, beta, sites=sites, teacher_sites=teacher_sites).remove()


# The release's β on its mean-squared distance and a 10-epoch teacher: every NAD preset but the paper's.
RELEASE_DISTILLATION = dict(beta=(500.0, 1000.0, 1000.0), distance="code", teacher_epochs=10)
# The paper's schedule with the release's distillation: the default until erase-recover replaced it.
SHORT = dict(NAD_PAPER_SCHEDULE, **RELEASE_DISTILLATION)


class NAD(Defense):
    """Neural Attention Distillation: a fine-tuned teacher guides the backdoored student's attention.

    Li, Lyu, Koren, Lyu, Li, Ma, "Neural Attention Distillation: Erasing Backdoor Triggers from Deep
    Neural Networks", ICLR 2021; spec §5.4. Defaults: the release's β and Cutout, a seeded clean subset
    (the release's is unseeded), and the ``erase-recover`` structure for teacher and student alike: a
    constant lr 0.1 for 10 epochs each, then the 40-epoch recovery stage (our evidence, not the paper's:
    benchmarks/results/erase-harder-findings.md). Presets: ``paper`` (lr ÷10 every 2 epochs, β = 5000 on
    every group, spec §5.4 decision), ``release`` (main.py at HEAD: 20 student epochs, 0.1 → 0.01 at epoch
    2, Cutout(1, 3)), ``short`` (the paper's schedule with the release's β: the default until the evidence
    replaced it), ``fast`` (``short`` with 4 teacher and 5 student epochs: its low-lr tail cut) and
    ``erase-recover`` (the default written out). The release's pre-2022 bug that detached the distillation
    terms is, of course, not reproduced.
    """

    name = "nad"
    stages = (Stage("teacher", "teacher_epochs", "teacher"), Stage("student", "epochs"), KD_STAGE)
    presets = {
        "paper": dict(NAD_PAPER_SCHEDULE, beta=(5000.0, 5000.0, 5000.0), distance="code", teacher_epochs=10),
        "release": dict(NAD_RELEASE_SCHEDULE, **RELEASE_DISTILLATION),
        "short": dict(SHORT),
        # short in 0.41x the time at the same ACC and ASR (4 seeds, benchmarks/results/faster-nad-findings.md):
        # lr ÷10 every 2 epochs leaves epochs 6-10 of each stage at lr ≤ 1e-3, where the weights barely move;
        # the student keeps 5 epochs, the teacher (cheaper per epoch, no distillation) 4.
        "fast": dict(SHORT, epochs=5, teacher_epochs=4),
        # The default: fine-tuning's erase-recover structure (base.ERASE_RECOVER_SCHEDULE) for teacher and student.
        "erase-recover": dict(ERASE_RECOVER_SCHEDULE, **RELEASE_DISTILLATION),
    }

    def __init__(self, config: NADConfig):
        config.check()
        super().__init__(config)

    def check_model(self, model):
        cfg = self.config
        check_distillation(model, cfg.beta, sites=cfg.sites, teacher_sites=cfg.teacher_sites,
                           teacher_arch=cfg.teacher_arch)

    def purify(self, model, clean, *, run_dir=None, resume=False, eval_fn=None, quiet=False, teacher=None
               ) -> PurifyResult:
        run_dir = Path(run_dir) if run_dir else None
        cfg, probe = self.fitted_config(model, clean, run_dir, quiet)
        info: dict = {"distance": cfg.distance, "beta": list(cfg.beta), "attention": cfg.attention, "p": cfg.p,
                      "lr_probe": probe}

        def objective(student, teacher):
            return AttentionDistillation(student, teacher, cfg.beta, p=cfg.p, function=cfg.attention,
                                         distance=cfg.distance, sites=cfg.sites, teacher_sites=cfg.teacher_sites)

        return distil("nad", model, clean, cfg, cfg.train_config(), objective, teacher=teacher, info=info,
                      run_dir=run_dir, resume=resume, quiet=quiet, eval_fn=eval_fn)
