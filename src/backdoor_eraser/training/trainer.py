"""One trainer for attack training, fine-tuning and every distillation.

A short loop in the spirit of airbench: uint8 batches are sliced from in-memory
tensors, augmented on the model's device, normalised, and fed forward; the loss
comes from an *objective* (cross-entropy by default, NAD/ARGD/SAGE add terms).
Per-epoch checkpoints make long runs resumable.
"""
from __future__ import annotations

import csv
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Protocol

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..classifier import Classifier
from ..data.augment import CropFlip
from ..data.dataset import ImageDataset
from ..errors import UserError
from .schedules import Schedule

CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainConfig:
    """SGD training recipe. Defaults are the NAD defense optimiser (spec §5.4): lr 0.1,
    momentum 0.9, Nesterov, weight decay 1e-4, batch 64, crop (pad 4) + flip."""

    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    schedule: str = "constant"
    step_size: int = 2
    gamma: float = 0.1
    milestones: tuple[int, ...] = ()
    label_smoothing: float = 0.0
    augment: str = "crop-flip"   # or "none"
    crop_padding: int = 4
    shuffle: bool = True
    drop_last: bool = False
    seed: int = 0
    channels_last: bool = False
    # "bf16": forward pass and loss under bfloat16 autocast (weights and optimizer stay fp32).
    # About 1.6x faster on CPUs with AMX; benchmarks/results/precision_cifar10.md compares accuracy.
    amp: str = "none"

    def make_schedule(self) -> Schedule:
        return Schedule(self.schedule, self.step_size, self.gamma, tuple(self.milestones))

    def check(self):
        if self.epochs < 0 or self.batch_size < 1 or self.lr < 0:
            raise UserError("epochs must be ≥ 0, batch size ≥ 1 and lr ≥ 0")
        if self.augment not in ("crop-flip", "none"):
            raise UserError(f"augment must be 'crop-flip' or 'none', got {self.augment!r}")
        if self.amp not in ("none", "bf16"):
            raise UserError(f"amp must be 'none' or 'bf16', got {self.amp!r}")
        self.make_schedule()


class Objective(Protocol):
    """Computes the training loss from a forward pass; extra trainable parameters optional."""

    def __call__(self, logits: torch.Tensor, inputs: torch.Tensor, labels: torch.Tensor
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


class CrossEntropy:
    """Plain (optionally label-smoothed) cross-entropy."""

    def __init__(self, label_smoothing: float = 0.0):
        self.label_smoothing = label_smoothing

    def __call__(self, logits, inputs, labels):
        loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        return loss, {}


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


BatchHook = Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]
EpochHook = Callable[[dict, torch.optim.Optimizer], None]
# Called after every optimizer step with {"epoch", "step", "loss", "correct", "batch_size"} (Python
# numbers). Costs one device sync per step, so it is only computed when a hook is given. A hook may
# raise to end training mid-epoch (RNP's unlearning stop); the model then holds that step's weights.
StepHook = Callable[[dict], None]


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)
    epochs: int = 0
    steps: int = 0
    seconds: float = 0.0
    resumed_from: int | None = None


class Trainer:
    """Trains ``classifier.net`` in place on an :class:`ImageDataset`.

    Hooks: ``batch_hook(x_uint8, y, generator)`` rewrites a batch before augmentation
    (on-the-fly poisoning such as WaNet); ``epoch_hooks`` run after each epoch with the
    epoch's record and the optimizer (dynamic lr rules, extra evaluation columns).
    """

    def __init__(self, config: TrainConfig, *, desc: str = "train", quiet: bool = False):
        config.check()
        self.config = config
        self.desc = desc
        self.quiet = quiet

    def fit(self, classifier: Classifier, data: ImageDataset, *, objective: Objective | None = None,
            extra_params: Iterable[torch.nn.Parameter] = (),
            extra_optimizers: Iterable[torch.optim.Optimizer] = (), batch_hook: BatchHook | None = None,
            epoch_hooks: Iterable[EpochHook] = (), step_hooks: Iterable[StepHook] = (), eval_fn: Callable[[Classifier], dict] | None = None,
            run_dir: str | Path | None = None, resume: bool = False) -> TrainResult:
        cfg = self.config
        net = classifier.net
        device = classifier.device
        objective = objective or CrossEntropy(cfg.label_smoothing)
        step_hooks = list(step_hooks)
        # Optimizers of their own (e.g. input-aware's Adam on its trigger generator), stepped with the
        # model's; their parameters must not also be in extra_params.
        extra_optimizers = list(extra_optimizers)
        if cfg.channels_last:
            net.to(memory_format=torch.channels_last)
        params = [p for p in net.parameters() if p.requires_grad] + list(extra_params)
        optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                                    weight_decay=cfg.weight_decay)
        schedule = cfg.make_schedule()
        augment = CropFlip(cfg.crop_padding) if cfg.augment == "crop-flip" else None
        gen = torch.Generator().manual_seed(cfg.seed)
        torch.manual_seed(cfg.seed)

        n = len(data)
        if n == 0:
            raise UserError("cannot train on an empty data set")
        steps_per_epoch = n // cfg.batch_size if cfg.drop_last else math.ceil(n / cfg.batch_size)
        if steps_per_epoch == 0:
            raise UserError(f"{n} samples are fewer than one batch of {cfg.batch_size} with drop_last")
        images, labels = data.images.to(device), data.labels.to(device)

        result = TrainResult()
        start_epoch = 0
        ckpt_path = Path(run_dir) / CHECKPOINT if run_dir else None
        if resume and ckpt_path and ckpt_path.exists():
            state = torch.load(ckpt_path, map_location=device, weights_only=True)
            net.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            gen.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
            result.history = list(state["history"])
            result.steps = int(state["steps"])
            start_epoch = int(state["epoch"]) + 1
            result.resumed_from = start_epoch
            if extra_params and "extra" in state:
                for p, v in zip(extra_params, state["extra"]):
                    p.data.copy_(v)
            for opt, opt_state, values in zip(extra_optimizers, state.get("extra_optimizers", []),
                                              state.get("extra_optimizer_params", [])):
                for p, v in zip(_optimizer_params(opt), values):
                    p.data.copy_(v)
                opt.load_state_dict(opt_state)
            self._say(f"{self.desc}: resumed after epoch {start_epoch} from {ckpt_path}")

        show_bar = not self.quiet and sys.stderr.isatty()
        t_start = time.perf_counter()
        for epoch in range(start_epoch, cfg.epochs):
            net.train()
            t0 = time.perf_counter()
            order = torch.randperm(n, generator=gen) if cfg.shuffle else torch.arange(n)
            order = order.to(device)
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device, dtype=torch.int64)
            term_sums: dict[str, torch.Tensor] = {}
            seen = 0
            bar = tqdm(total=steps_per_epoch, desc=f"{self.desc} {epoch + 1}/{cfg.epochs}", leave=False,
                       disable=not show_bar, dynamic_ncols=True)
            for step in range(steps_per_epoch):
                idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
                x, y = images[idx], labels[idx]
                if batch_hook is not None:
                    x, y = batch_hook(x, y, gen)
                if augment is not None:
                    x = augment(x, gen)
                inputs = classifier.prepare(x)
                if cfg.channels_last:
                    inputs = inputs.contiguous(memory_format=torch.channels_last)
                lr = cfg.lr * schedule.factor(epoch + step / steps_per_epoch, cfg.epochs)
                for group in optimizer.param_groups:
                    group["lr"] = lr * group.get("lr_scale", 1.0)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp == "bf16"):
                    logits = net(inputs)
                    loss, terms = objective(logits, inputs, y)
                optimizer.zero_grad(set_to_none=True)
                for opt in extra_optimizers:
                    opt.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                for opt in extra_optimizers:
                    opt.step()
                bs = len(y)
                seen += bs
                loss_sum += loss.detach() * bs
                batch_correct = (logits.detach().argmax(1) == y).sum()
                correct += batch_correct
                for k, v in terms.items():
                    term_sums[k] = term_sums.get(k, 0) + v.detach() * bs
                result.steps += 1
                if step_hooks:
                    info = {"epoch": epoch + 1, "step": result.steps, "loss": loss.item(),
                            "correct": int(batch_correct), "batch_size": bs}
                    for hook in step_hooks:
                        hook(info)
                if show_bar and (step % 10 == 0 or step == steps_per_epoch - 1):
                    elapsed = time.perf_counter() - t0
                    bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", img_s=f"{seen / max(elapsed, 1e-9):.0f}")
                if show_bar:
                    bar.update(1)
                if step % 50 == 49 and not torch.isfinite(loss_sum):
                    self._diverged(epoch, step, ckpt_path, bar)
            bar.close()
            if not torch.isfinite(loss_sum):
                self._diverged(epoch, steps_per_epoch - 1, ckpt_path, bar)
            seconds = time.perf_counter() - t0
            record = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], "loss": loss_sum.item() / seen,
                      "train_acc": correct.item() / seen, "images_per_s": seen / seconds, "seconds": seconds}
            record.update({k: float(v) / seen for k, v in term_sums.items()})
            if eval_fn is not None:
                record.update(eval_fn(classifier))
                net.train()
            for hook in epoch_hooks:
                hook(record, optimizer)
            result.history.append(record)
            self._say(self._epoch_line(record))
            if ckpt_path:
                self._save_checkpoint(ckpt_path, net, optimizer, gen, epoch, result, list(extra_params),
                                      extra_optimizers)
        result.epochs = cfg.epochs
        result.seconds = time.perf_counter() - t_start
        if cfg.channels_last:
            net.to(memory_format=torch.contiguous_format)
        net.eval()
        return result

    def _epoch_line(self, r: dict) -> str:
        extra = "".join(f" {k}={v:.4g}" for k, v in r.items()
                        if k not in ("epoch", "lr", "loss", "train_acc", "images_per_s", "seconds") and isinstance(v, float))
        return (f"{self.desc} epoch {r['epoch']}/{self.config.epochs}: loss={r['loss']:.4f} "
                f"train_acc={r['train_acc']:.4f} lr={r['lr']:.4g} {r['images_per_s']:.0f} img/s{extra}")

    def _say(self, msg: str):
        if not self.quiet:
            tqdm.write(msg, file=sys.stderr)

    @staticmethod
    def _save_checkpoint(path: Path, net, optimizer, gen, epoch, result: TrainResult, extra, extra_optimizers=()):
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {"model": net.state_dict(), "optimizer": optimizer.state_dict(), "generator": gen.get_state(),
                 "torch_rng": torch.get_rng_state(), "epoch": epoch, "steps": result.steps,
                 "history": result.history, "extra": [p.detach() for p in extra],
                 "extra_optimizers": [opt.state_dict() for opt in extra_optimizers],
                 "extra_optimizer_params": [[p.detach() for p in _optimizer_params(opt)] for opt in extra_optimizers]}
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)  # atomic: a crash never leaves a half-written checkpoint

    @staticmethod
    def _diverged(epoch, step, ckpt_path, bar):
        bar.close()
        where = f"epoch {epoch + 1}, step {step + 1}"
        if ckpt_path and ckpt_path.exists():
            raise TrainingDiverged(f"loss became NaN/inf at {where}; stopped. The last good checkpoint "
                                   f"(end of epoch {epoch}) is kept at {ckpt_path}; lower the lr and --resume")
        raise TrainingDiverged(f"loss became NaN/inf at {where}; stopped before any checkpoint was written; lower the lr")


def write_history(path: str | Path, history: list[dict]) -> None:
    """history.csv with one row per epoch (columns: union of keys, in first-seen order)."""
    cols: list[str] = []
    for rec in history:
        cols += [k for k in rec if k not in cols]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        for rec in history:
            w.writerow(rec)


def _optimizer_params(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in opt.param_groups for p in group["params"]]
