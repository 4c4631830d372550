"""One trainer for attack training, fine-tuning and every distillation.

A short loop in the spirit of airbench: uint8 batches are sliced from in-memory
tensors, augmented on the model's device, normalised, and fed forward; what a step
computes comes from a *task* (cross-entropy by default; NAD/ARGD/SAGE add terms,
MCR trains a curve, RNP masks), and *callbacks* watch it (training/tasks.py).
Per-epoch checkpoints make long runs resumable, callbacks' state included.
"""
from __future__ import annotations

import csv
import math
import os
import sys
import time
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from tqdm.auto import tqdm

from ..classifier import Classifier
from ..data.augment import make_augment, parse_augment
from ..data.dataset import ImageDataset
from ..errors import UserError
from .precision import AMP_MODES, resolve_amp
from .schedules import Schedule
from .tasks import Callback, Loop, Task

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
    # Steps joined with '+': crop, flip, cutout (always applied in that order); "crop-flip" and "none"
    # are aliases. Cutout is the releases' Cutout(holes, length) on the uint8 image (spec §1.3).
    augment: str = "crop-flip"
    crop_padding: int = 4
    cutout_holes: int = 1
    cutout_length: int = 3
    shuffle: bool = True
    drop_last: bool = False
    seed: int = 0
    channels_last: bool = False
    # "bf16": forward pass and loss under bfloat16 autocast (weights and optimizer stay fp32); "auto":
    # bf16 only where the device runs it natively (training/precision.py), else fp32. bf16 asked for
    # where it is not native falls back to fp32 with a warning, or fails with ``amp_strict``.
    amp: str = "auto"
    amp_strict: bool = False

    def make_schedule(self) -> Schedule:
        return Schedule(self.schedule, self.step_size, self.gamma, tuple(self.milestones))

    def check(self):
        if self.epochs < 0 or self.batch_size < 1 or self.lr < 0:
            raise UserError("epochs must be ≥ 0, batch size ≥ 1 and lr ≥ 0")
        try:
            parse_augment(self.augment)
        except ValueError as exc:
            raise UserError(f"augment: {exc}") from None
        if self.crop_padding < 0 or self.cutout_holes < 0 or self.cutout_length < 0:
            raise UserError("crop_padding, cutout_holes and cutout_length must be ≥ 0")
        if self.amp not in AMP_MODES:
            raise UserError(f"amp must be one of {', '.join(AMP_MODES)}, got {self.amp!r}")
        self.make_schedule()

    def train_config(self, **overrides) -> "TrainConfig":
        """A plain TrainConfig of this config's training fields (a defense config holds them among its
        own), with ``overrides``: the recipe of one training stage."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(TrainConfig)}
        values.update(overrides)
        return TrainConfig(**values)


# How attack models are trained unless told otherwise (the CLI's `attack` and the grid's attack cells):
# ABL's README schedule, 60 epochs with lr 0.1 -> 0.01 at epoch 40, batch 128, crop + flip, with the
# releases' weight decay 1e-4. With wd 5e-4 that schedule gave a clean model whose conv weights were as
# small as those of the 20-epoch cosine zoo, and lr-0.1 fine-tuning cost it 15 ACC points; wd 1e-4 gave
# 4.3x larger weights and 6 points (30 epochs; benchmarks/results/zoo-v2-findings.md).
ATTACK_TRAINING = dict(epochs=60, batch_size=128, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4,
                       schedule="multistep", milestones=(40,), gamma=0.1, augment="crop+flip")


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)
    epochs: int = 0
    steps: int = 0
    seconds: float = 0.0
    resumed_from: int | None = None
    precision: str = "none"   # what ``amp`` resolved to on the device: "bf16" or "none" (fp32)
    stopped: str | None = None  # why a callback ended training early, if one did

    def images_per_s(self) -> float | None:
        """Training images per second over every epoch run, those taken over from a checkpoint included."""
        seconds = sum(r["seconds"] for r in self.history)
        return sum(r["images_per_s"] * r["seconds"] for r in self.history) / seconds if seconds else None


class Trainer:
    """Trains ``classifier`` in place on an :class:`ImageDataset` with a :class:`Task` (cross-entropy
    by default) and :class:`Callback` s; with ``run_dir`` it writes a checkpoint after every epoch
    (model, optimisers, generator, the task's and callbacks' state) from which ``resume`` continues
    exactly."""

    def __init__(self, config: TrainConfig, *, desc: str = "train", quiet: bool = False):
        config.check()
        self.config = config
        self.desc = desc
        self.quiet = quiet

    def fit(self, classifier: Classifier, data: ImageDataset, *, task: Task | None = None,
            callbacks: Iterable[Callback] = (), run_dir: str | Path | None = None,
            resume: bool = False) -> TrainResult:
        cfg = self.config
        net = classifier.net
        device = classifier.device
        task = task or Task(label_smoothing=cfg.label_smoothing)
        callbacks = list(callbacks)
        want_steps = any(cb.wants_steps for cb in callbacks)
        if cfg.channels_last:
            net.to(memory_format=torch.channels_last)
        params = task.parameters(classifier)
        net_ids = {id(p) for p in net.parameters()}
        extra = [p for p in params if id(p) not in net_ids]   # saved by value: not in the net's state dict
        # One group, empty where the task's own optimisers train everything (NC's and TrojanNN's Adam).
        optimizer = torch.optim.SGD([{"params": params}], lr=cfg.lr, momentum=cfg.momentum,
                                    nesterov=cfg.nesterov and cfg.momentum > 0, weight_decay=cfg.weight_decay)
        own_optimizers = list(task.optimizers())
        schedule = cfg.make_schedule()
        augment = make_augment(cfg)
        bf16 = resolve_amp(cfg.amp, device, strict=cfg.amp_strict, say=self._say) == "bf16"
        gen = torch.Generator().manual_seed(cfg.seed)
        torch.manual_seed(cfg.seed)

        n = len(data)
        if n == 0:
            raise UserError("cannot train on an empty data set")
        steps_per_epoch = n // cfg.batch_size if cfg.drop_last else math.ceil(n / cfg.batch_size)
        if steps_per_epoch == 0:
            raise UserError(f"{n} samples are fewer than one batch of {cfg.batch_size} with drop_last")
        images, labels = data.images.to(device), data.labels.to(device)

        result = TrainResult(precision="bf16" if bf16 else "none")
        loop = Loop(classifier, optimizer, cfg.epochs, steps_per_epoch)
        start_epoch = 0
        ckpt_path = Path(run_dir) / CHECKPOINT if run_dir else None
        if resume and ckpt_path and ckpt_path.exists():
            start_epoch = self._load_checkpoint(ckpt_path, net, optimizer, gen, result, extra, own_optimizers,
                                                task, callbacks, device)
            loop.step, loop.stop_reason = result.steps, result.stopped
            self._say(f"{self.desc}: resumed after epoch {start_epoch} from {ckpt_path}"
                      + (f" (training had stopped: {result.stopped})" if result.stopped else ""))

        show_bar = not self.quiet and sys.stderr.isatty()
        t_start = time.perf_counter()
        for epoch in range(start_epoch, cfg.epochs):
            if loop.stop_reason:
                break
            loop.epoch = epoch + 1
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
                x, y = task.before_augment(images[idx], labels[idx], gen)
                if augment is not None:
                    x = augment(x, gen)
                inputs = classifier.prepare(x)
                if cfg.channels_last:
                    inputs = inputs.contiguous(memory_format=torch.channels_last)
                lr = cfg.lr * schedule.factor(epoch + step / steps_per_epoch, cfg.epochs)
                for group in optimizer.param_groups:
                    group["lr"] = lr * group.get("lr_scale", 1.0)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    logits = task.forward(classifier, inputs)
                    loss, terms = task.loss(logits, inputs, y)
                optimizer.zero_grad(set_to_none=True)
                for opt in own_optimizers:
                    opt.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                for opt in own_optimizers:
                    opt.step()
                task.after_step()
                bs = len(y)
                seen += bs
                loss_sum += loss.detach() * bs
                batch_correct = (logits.detach().argmax(1) == y).sum()
                correct += batch_correct
                for k, v in terms.items():
                    term_sums[k] = term_sums.get(k, 0) + v.detach() * bs
                result.steps += 1
                loop.step = result.steps
                if want_steps:
                    info = {"epoch": epoch + 1, "step": result.steps, "loss": loss.item(),
                            "correct": int(batch_correct), "batch_size": bs}
                    for cb in callbacks:
                        cb.on_step(loop, info)
                if show_bar and (step % 10 == 0 or step == steps_per_epoch - 1):
                    elapsed = time.perf_counter() - t0
                    bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", img_s=f"{seen / max(elapsed, 1e-9):.0f}")
                if show_bar:
                    bar.update(1)
                if step % 50 == 49 and not torch.isfinite(loss_sum):
                    self._diverged(epoch, step, ckpt_path, bar)
                if loop.stop_reason:
                    break
            bar.close()
            if not torch.isfinite(loss_sum):
                self._diverged(epoch, steps_per_epoch - 1, ckpt_path, bar)
            seconds = time.perf_counter() - t0
            record = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], "loss": loss_sum.item() / seen,
                      "train_acc": correct.item() / seen, "images_per_s": seen / seconds, "seconds": seconds}
            record.update({k: float(v) / seen for k, v in term_sums.items()})
            if loop.stop_reason and seen < n:
                record["stopped_after_step"] = loop.step
            for cb in callbacks:
                cb.on_epoch_end(loop, record)
            result.history.append(record)
            result.stopped = loop.stop_reason
            self._say(self._epoch_line(record))
            if ckpt_path:
                self._save_checkpoint(ckpt_path, net, optimizer, gen, epoch, result, extra, own_optimizers,
                                      task, callbacks)
        if result.stopped:
            self._say(f"{self.desc}: stopped after epoch {len(result.history)}: {result.stopped}")
        result.epochs = len(result.history) if result.stopped else cfg.epochs
        # Training time of the whole run: a resumed run adds the epochs it took over from its checkpoint.
        result.seconds = time.perf_counter() - t_start + sum(r["seconds"] for r in result.history[:start_epoch])
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
    def _save_checkpoint(path: Path, net, optimizer, gen, epoch, result: TrainResult, extra, own_optimizers,
                         task: Task, callbacks: list[Callback]):
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {"model": net.state_dict(), "optimizer": optimizer.state_dict(), "generator": gen.get_state(),
                 "torch_rng": torch.get_rng_state(), "epoch": epoch, "steps": result.steps,
                 "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                 "history": result.history, "stopped": result.stopped, "extra": [p.detach() for p in extra],
                 "own_optimizers": [opt.state_dict() for opt in own_optimizers],
                 "own_optimizer_params": [[p.detach() for p in _optimizer_params(opt)] for opt in own_optimizers],
                 "task": task.state_dict(), "callbacks": [cb.state_dict() for cb in callbacks]}
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)  # atomic: a crash never leaves a half-written checkpoint

    def _load_checkpoint(self, path: Path, net, optimizer, gen, result: TrainResult, extra, own_optimizers,
                         task: Task, callbacks: list[Callback], device) -> int:
        """Restores everything ``_save_checkpoint`` wrote; returns the epoch to continue from."""
        try:
            state = torch.load(path, map_location=device, weights_only=True)
            net.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        except Exception as exc:  # a truncated or foreign file: say which and what to do
            raise UserError(f"cannot resume from {path}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}; "
                            "delete it to start the stage again") from None
        saved_callbacks = state.get("callbacks", [])
        # Stateless callbacks (progress columns) may come and go; stateful ones must line up.
        if len(saved_callbacks) != len(callbacks) and any(cb.state_dict() for cb in callbacks):
            raise UserError(f"cannot resume from {path}: it holds the state of {len(saved_callbacks)} callbacks, "
                            f"this run has {len(callbacks)}; delete it to start the stage again")
        # Random states are CPU byte tensors, whatever map_location put the rest on.
        gen.set_state(state["generator"].cpu())
        torch.set_rng_state(state["torch_rng"].cpu())
        if state.get("cuda_rng") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])
        result.history = list(state["history"])
        result.steps = int(state["steps"])
        result.stopped = state.get("stopped")
        result.resumed_from = int(state["epoch"]) + 1
        with torch.no_grad():
            for p, v in zip(extra, state.get("extra", [])):
                p.copy_(v)
            for opt, values in zip(own_optimizers, state.get("own_optimizer_params", [])):
                for p, v in zip(_optimizer_params(opt), values):
                    p.copy_(v)
        for opt, opt_state in zip(own_optimizers, state.get("own_optimizers", [])):
            opt.load_state_dict(opt_state)
        task.load_state_dict(state.get("task", {}))
        for cb, cb_state in zip(callbacks, saved_callbacks):
            if cb_state:
                cb.load_state_dict(cb_state)
        return result.resumed_from

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
