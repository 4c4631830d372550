"""ABL: Anti-Backdoor Learning (Li et al., NeurIPS 2021), spec §5.8.

A *training-time* defense: it trains a model from scratch on the poisoned training set, isolates the
samples it learns suspiciously fast, and unlearns them. No clean subset is involved.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..classifier import Classifier, Normalization
from ..data.augment import parse_augment
from ..data.dataset import ImageDataset
from ..errors import UserError
from ..runs import new_model
from ..training import Task, Trainer, TrainConfig, eval_columns
from .base import Defense, PurifyResult, Stage

OBJECTIVES = ("lga", "lga-batch", "flooding")



@dataclass
class ABLConfig:
    """Defaults: γ = 0.5, T_te = 20 isolation epochs and p = 1 % (spec §5.8, [R]), the release's
    optimiser, isolation objective and later stages (spec §5.8, [C]).

    Why ``flooding`` and not the paper's per-sample LGA by default: on the CIFAR-10 BadNets and Blend
    models of benchmarks/results/defenses-findings.md, per-sample LGA isolated 0 poisoned images among
    its 500 (precision 0.00; the final models kept ASR 100 %), while the release's flooding isolated
    500 of 500 on BadNets (precision 1.00; ASR 0.34 %). Per-sample LGA pushes every sample whose loss falls
    below γ back up, the fast-learned poisoned ones included, so they no longer stand out by loss.

    Isolation: SGD lr 0.1, momentum 0.9, Nesterov, wd 1e-4, batch 128, ``isolation_augment`` none
    (ToTensor only, as the release). ``objective``: ``lga`` = mean_i sign(ℓ_i − γ)·ℓ_i (the paper,
    per sample), ``lga-batch`` = sign(L − γ)·L on the batch-mean loss L (the release's LGA),
    ``flooding`` = |L − γ| + γ (the release's default). Release-compatible isolation:
    ``objective='flooding', isolation_epochs=10``.

    Isolated set: the ⌊``isolation_ratio``·N⌋ lowest per-sample losses (eval mode).
    Retraining: the isolation model continues on the rest for ``finetune_epochs`` (60) at
    ``finetune_lr`` (0.1) × ``finetune_lr_gamma`` (0.1) at each of ``finetune_milestones`` (40,),
    batch ``batch_size``, crop + flip. Unlearning: gradient ascent on the isolated set for
    ``unlearning_epochs`` (5) at ``unlearning_lr`` 5e-4, batch 64, no augmentation, same momentum
    and weight decay."""

    objective: str = "flooding"
    gamma: float = 0.5
    isolation_epochs: int = 20
    isolation_ratio: float = 0.01
    isolation_augment: str = "none"
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    finetune_epochs: int = 60
    finetune_lr: float = 0.1
    finetune_milestones: tuple[int, ...] = (40,)
    finetune_lr_gamma: float = 0.1
    finetune_augment: str = "crop-flip"
    unlearning_epochs: int = 5
    unlearning_lr: float = 5e-4
    unlearning_batch_size: int = 64
    unlearning_augment: str = "none"
    seed: int = 0
    # Speed only (see TrainConfig): autocast ("auto": bf16 where native) and channels-last for every stage.
    amp: str = "auto"
    channels_last: bool = False

    def check(self):
        if self.objective not in OBJECTIVES:
            raise UserError(f"ABL objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if not 0 < self.isolation_ratio < 1:
            raise UserError(f"isolation_ratio must be in (0, 1), got {self.isolation_ratio}")
        if min(self.isolation_epochs, self.finetune_epochs, self.unlearning_epochs) < 0:
            raise UserError("ABL stage epochs must be ≥ 0")
        for name in ("isolation_augment", "finetune_augment", "unlearning_augment"):
            try:
                parse_augment(getattr(self, name))
            except ValueError as exc:
                raise UserError(f"{name}: {exc}") from None
        self._train(epochs=1).check()

    def _train(self, **kw) -> TrainConfig:
        base = dict(batch_size=self.batch_size, lr=self.lr, momentum=self.momentum, nesterov=self.nesterov,
                    weight_decay=self.weight_decay, schedule="constant", seed=self.seed, amp=self.amp,
                    channels_last=self.channels_last)
        base.update(kw)
        return TrainConfig(**base)

    def isolation_train(self) -> TrainConfig:
        return self._train(epochs=self.isolation_epochs, augment=self.isolation_augment)

    def finetune_train(self) -> TrainConfig:
        return self._train(epochs=self.finetune_epochs, lr=self.finetune_lr, schedule="multistep",
                           milestones=tuple(self.finetune_milestones), gamma=self.finetune_lr_gamma,
                           augment=self.finetune_augment)

    def unlearning_train(self) -> TrainConfig:
        return self._train(epochs=self.unlearning_epochs, lr=self.unlearning_lr,
                           batch_size=self.unlearning_batch_size, augment=self.unlearning_augment)


# -- losses --------------------------------------------------------------------------------------
def lga_loss(losses: torch.Tensor, gamma: float) -> torch.Tensor:
    """Local gradient ascent, per sample: mean_i sign(ℓ_i − γ)·ℓ_i. Samples already below γ are pushed
    back up, so no sample is learned much past γ — except the backdoor samples, learned so fast that
    they end up with the lowest losses anyway."""
    return (torch.sign(losses - gamma) * losses).mean()


def flooding_loss(mean_loss: torch.Tensor, gamma: float) -> torch.Tensor:
    """Flooding (Ishida et al. 2020), the release's default: |L − γ| + γ on the batch-mean loss."""
    return (mean_loss - gamma).abs() + gamma


class IsolationObjective:
    """The stage-1 objective for the Trainer; ``ce`` records the plain mean cross-entropy."""

    def __init__(self, kind: str = "lga", gamma: float = 0.5):
        if kind not in OBJECTIVES:
            raise UserError(f"ABL objective must be one of {', '.join(OBJECTIVES)}, got {kind!r}")
        self.kind, self.gamma = kind, gamma

    def __call__(self, logits, inputs, labels):
        per_sample = F.cross_entropy(logits, labels, reduction="none")
        mean = per_sample.mean()
        if self.kind == "lga":
            loss = lga_loss(per_sample, self.gamma)
        elif self.kind == "lga-batch":
            loss = torch.sign(mean - self.gamma) * mean
        else:
            loss = flooding_loss(mean, self.gamma)
        return loss, {"ce": mean.detach()}


def ascent_objective(logits, inputs, labels):
    """Unlearning: minimise −CE on the isolated samples."""
    ce = F.cross_entropy(logits, labels)
    return -ce, {"ce": ce.detach()}


# -- isolation -----------------------------------------------------------------------------------
@torch.no_grad()
def per_sample_losses(model: Classifier, data: ImageDataset, batch_size: int = 512) -> torch.Tensor:
    """Cross-entropy of every sample in eval mode (CPU float). Batched: in eval mode the release's
    batch-1 loop gives the same numbers."""
    was_training = model.net.training
    model.net.eval()
    try:
        out = [F.cross_entropy(model(data.images[i:i + batch_size]), data.labels[i:i + batch_size].to(model.device),
                               reduction="none").cpu() for i in range(0, len(data), batch_size)]
    finally:
        model.net.train(was_training)
    return torch.cat(out)


def isolation_count(n: int, ratio: float) -> int:
    """⌊ratio·n⌋; the tiny slack keeps e.g. 0.29·100 = 28.999… at 29."""
    return int(math.floor(ratio * n + 1e-9))


def isolate(losses: torch.Tensor, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the ⌊ratio·N⌋ lowest losses (lowest first; ties by position) and of the rest (sorted)."""
    n = len(losses)
    count = isolation_count(n, ratio)
    if count < 1:
        raise UserError(f"isolation ratio {ratio} of {n} samples isolates nothing; raise isolation_ratio")
    order = torch.sort(losses, stable=True).indices
    return order[:count], torch.sort(order[count:]).values


def _stage(history: list[dict], stage: str) -> list[dict]:
    return [{"stage": stage, **rec} for rec in history]


class ABL(Defense):
    """Anti-Backdoor Learning: isolate the fastest-learned samples with local gradient ascent, keep
    training on the rest, then unlearn the isolated ones by gradient ascent.

    Li, Lyu, Koren, Lyu, Li, Ma, "Anti-Backdoor Learning: Training Clean Models on Poisoned Data",
    NeurIPS 2021; spec §5.8 (headline numbers §6.4, release quirks §7). It needs the *poisoned training
    set*, not a clean subset: use :meth:`train`. :meth:`purify` keeps the Defense interface by treating
    ``model`` as an architecture template only (its weights are ignored; a fresh model is trained) and
    ``data`` as the poisoned training set — never pass a clean subset to it.
    ``needs_poisoned_training_set`` tells workflows to route it accordingly.

    Departures from the release: the paper's per-sample LGA is the default (the release defaults to
    Flooding and applies LGA to batch means; both are available); T_te = 20 isolation epochs (release:
    10); the per-sample losses are computed in batches; no Cutout during retraining; unlearning runs
    ``unlearning_epochs`` real ascent epochs (the release's epoch 0 only evaluates, so 5 means 4).
    """

    name = "abl"
    stages = (Stage("isolation", "isolation_epochs", "isolation"), Stage("retrain", "finetune_epochs", "retrain"),
              Stage("unlearn", "unlearning_epochs", "unlearn"))
    needs_poisoned_training_set = True
    diagnostics = ("isolation_precision", "isolation_recall")

    def __init__(self, config: ABLConfig | None = None):
        config = config or ABLConfig()
        config.check()
        super().__init__(config)

    def purify(self, model, clean, *, run_dir=None, resume=False, eval_fn=None, quiet=False) -> PurifyResult:
        """``model``: architecture template (weights ignored); ``clean``: here, the *poisoned* training set."""
        res = self.train(clean, model.arch, model.classes, model.input_shape, model.normalization,
                         device=model.device, run_dir=run_dir, resume=resume, eval_fn=eval_fn, quiet=quiet)
        res.info["template_weights"] = "ignored: ABL trains from scratch"
        return res

    def train(self, poisoned: ImageDataset, arch: str, classes, input_shape, normalization: Normalization | None = None,
              *, device="cpu", run_dir=None, resume: bool = False, eval_fn=None, quiet: bool = False) -> PurifyResult:
        cfg = self.config
        run_dir = Path(run_dir) if run_dir else None
        sub = (lambda name: run_dir / name) if run_dir else (lambda name: None)
        t_start = time.perf_counter()
        model = new_model(arch, list(classes), tuple(input_shape), normalization or Normalization(), device, cfg.seed)

        iso = Trainer(cfg.isolation_train(), desc=f"abl isolation ({cfg.objective})", quiet=quiet).fit(
            model, poisoned, task=Task(IsolationObjective(cfg.objective, cfg.gamma)), callbacks=eval_columns(eval_fn),
            run_dir=sub("isolation"), resume=resume)
        isolation_model = model.copy()

        t0 = time.perf_counter()
        losses = per_sample_losses(model, poisoned)
        low, rest = isolate(losses, cfg.isolation_ratio)
        isolated, others = poisoned.subset(low), poisoned.subset(rest)
        select_seconds = time.perf_counter() - t0

        ret = Trainer(cfg.finetune_train(), desc="abl retrain", quiet=quiet).fit(
            model, others, callbacks=eval_columns(eval_fn), run_dir=sub("retrain"), resume=resume)
        retrained = model.copy()

        unl = Trainer(cfg.unlearning_train(), desc="abl unlearning", quiet=quiet).fit(
            model, isolated, task=Task(ascent_objective), callbacks=eval_columns(eval_fn), run_dir=sub("unlearn"),
            resume=resume)

        info = {"objective": cfg.objective, "gamma": cfg.gamma, "isolation_ratio": cfg.isolation_ratio,
                "isolated_count": len(low), "isolated_indices": poisoned.index[low].tolist(),
                "isolated_loss_max": float(losses[low].max()), "loss_median": float(losses.median()),
                **isolation_quality(poisoned, low),
                "isolation_epochs": iso.epochs, "finetune_epochs": ret.epochs, "unlearning_epochs": unl.epochs,
                "isolation_steps": iso.steps, "finetune_steps": ret.steps, "unlearning_steps": unl.steps,
                "isolation_seconds": iso.seconds, "select_seconds": select_seconds,
                "finetune_seconds": ret.seconds, "unlearning_seconds": unl.seconds,
                "epochs": iso.epochs + ret.epochs + unl.epochs, "steps": iso.steps + ret.steps + unl.steps,
                "seconds": time.perf_counter() - t_start}
        history = _stage(iso.history, "isolation") + _stage(ret.history, "retrain") + _stage(unl.history, "unlearn")
        return PurifyResult(model, history, info, {"isolation": isolation_model, "retrain": retrained})


def isolation_quality(poisoned: ImageDataset, isolated_positions: torch.Tensor) -> dict:
    """How many isolated samples are truly poisoned, when the data set knows (a PoisonedDataset)."""
    flags = getattr(poisoned, "poison_flag", None)
    if flags is None:
        return {"isolated_poisoned": None, "isolation_precision": None, "isolation_recall": None}
    hit = int(flags[isolated_positions].sum())
    total = int(flags.sum())
    return {"isolated_poisoned": hit, "poisoned_total": total,
            "isolation_precision": hit / len(isolated_positions),
            "isolation_recall": hit / total if total else None}
