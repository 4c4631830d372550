"""ANP: Adversarial Neuron Pruning (Wu & Wang, NeurIPS 2021), spec §5.9."""
from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data.augment import parse_augment
from ..errors import UserError
from ..training import Callback, Task, Trainer, TrainConfig
from .base import Defense, PurifyResult, Stage
from .bn_masks import BNMasks, bn_channel_count, masks_to_lists, prune_bn_channels, threshold_sweep
from .rnp import MaskColumns


@dataclass
class ANPConfig:
    """Paper/release defaults (spec §5.9): ε = 0.4, α = 0.2, mask SGD lr 0.2 with momentum 0.9,
    batch 128 drawn with replacement, 2,000 iterations, one signed noise step of size ε/``noise_steps``;
    prune channels with mask ≤ ``threshold`` (0.2), or the ``fraction`` of channels with the smallest
    masks when it is set. Crop + flip, as the release's clean loader; ``amp``: the trainer's precision."""

    eps: float = 0.4
    alpha: float = 0.2
    lr: float = 0.2
    momentum: float = 0.9
    batch_size: int = 128
    iterations: int = 2000
    noise_steps: int = 1
    threshold: float = 0.2
    fraction: float | None = None
    augment: str = "crop-flip"
    seed: int = 0
    amp: str = "auto"

    def check(self):
        if self.eps < 0 or not 0 <= self.alpha <= 1 or self.iterations < 0 or self.noise_steps < 1:
            raise UserError("ANP needs eps ≥ 0, 0 ≤ alpha ≤ 1, iterations ≥ 0 and noise_steps ≥ 1")
        if self.fraction is not None and not 0 <= self.fraction <= 1:
            raise UserError(f"ANP pruning fraction must be in [0, 1], got {self.fraction}")
        try:
            parse_augment(self.augment)
        except ValueError as exc:
            raise UserError(f"augment: {exc}") from None


def robust_loss(bn: BNMasks, noise_opt: torch.optim.Optimizer, cfg: ANPConfig, logits, inputs, labels):
    """ANP's mask objective (see :class:`ANP`); ``logits`` are the clean forward's."""
    clean = F.cross_entropy(logits, labels)
    if cfg.eps == 0:
        return cfg.alpha * clean, {}
    with torch.no_grad():
        for p in bn.noise():
            p.uniform_(-cfg.eps, cfg.eps)
    bn.perturbed = True
    for _ in range(cfg.noise_steps):
        noise_opt.zero_grad(set_to_none=True)
        (-F.cross_entropy(bn(inputs), labels)).backward()  # the masks' share is cleared by the loop
        for p in bn.noise():
            p.grad.sign_()
        noise_opt.step()  # descent on −CE with signed gradients: an ε-sized ascent on CE
        with torch.no_grad():
            for p in bn.noise():
                p.clamp_(-cfg.eps, cfg.eps)
    robust = F.cross_entropy(bn(inputs), labels)
    bn.perturbed = False
    return cfg.alpha * clean + (1 - cfg.alpha) * robust, {"robust_ce": robust.detach()}


class IterationBudget(Callback):
    """Stops the loop after ``iterations`` steps and records the steps so far with each epoch."""

    wants_steps = True

    def __init__(self, iterations: int):
        self.iterations = iterations

    def on_step(self, loop, info):
        if info["step"] >= self.iterations:
            loop.request_stop(f"{self.iterations} iterations")

    def on_epoch_end(self, loop, record):
        record["iteration"] = loop.step


class ANP(Defense):
    """Adversarial Neuron Pruning: learn BN-channel masks that keep clean accuracy under adversarial
    neuron perturbation, then prune the channels with small masks.

    Wu & Wang, "Adversarial Neuron Pruning Purifies Backdoored Deep Models", NeurIPS 2021; spec §5.9.
    Per iteration: draw δ, ξ ~ U(−ε, ε), take ``noise_steps`` signed ascent steps on CE, then one mask
    step on α·CE(m) + (1−α)·CE(m+δ, 1+ξ) (:func:`robust_loss`) and clamp m to [0, 1]. The mask is
    learned on a scratch copy in train mode (its BN running statistics drift, as in the release) and
    the *input* model's γ is zeroed. Departure from the release: after the ascent step the noise
    is projected back onto [−ε, ε], the paper's constraint (the release lets a step from a random
    start reach 2ε). The trainer runs the iterations in epochs of ⌈clean / batch⌉, each checkpointed
    under ``run_dir``/masks.
    """

    name = "anp"
    diagnostics = ("pruned",)
    stages = (Stage("masks", "iterations", "masks", unit="steps"),)

    def __init__(self, config: ANPConfig):
        config.check()
        super().__init__(config)

    def learn_masks(self, model, clean, quiet: bool = True, run_dir: Path | None = None, resume: bool = False
                    ) -> tuple[dict[str, torch.Tensor], list[dict]]:
        """The mask values per BN layer and the per-epoch records."""
        cfg = self.config
        scratch = model.copy()
        scratch.net.requires_grad_(False)
        bn = BNMasks(scratch.net, noise=True)
        images, labels = clean.images.to(scratch.device), clean.labels.to(scratch.device)

        def draw(x, y, generator):  # with replacement, from the loop's generator before augmentation
            idx = torch.randint(len(images), (cfg.batch_size,), generator=generator).to(images.device)
            return images[idx], labels[idx]

        noise_opt = torch.optim.SGD(bn.noise(), lr=cfg.eps / cfg.noise_steps)
        task = Task(partial(robust_loss, bn, noise_opt, cfg), before_augment=draw, forward=lambda clf, x: bn(x),
                    after_step=bn.clamp_, parameters=bn.masks)
        # The task draws every batch, so the loop shuffles nothing; its epochs only set the record and
        # checkpoint cadence, and the budget callback ends the last one.
        epochs = -(-cfg.iterations // max(1, -(-len(clean) // cfg.batch_size)))
        train = TrainConfig(epochs=epochs, batch_size=cfg.batch_size, lr=cfg.lr, momentum=cfg.momentum,
                            nesterov=False, weight_decay=0.0, augment=cfg.augment, shuffle=False, seed=cfg.seed,
                            amp=cfg.amp)
        res = Trainer(train, desc="anp masks", quiet=quiet).fit(
            scratch, clean, task=task, callbacks=[IterationBudget(cfg.iterations), MaskColumns(bn, cfg.threshold)],
            run_dir=run_dir, resume=resume)
        return bn.values(), res.history

    def purify(self, model, clean, *, run_dir=None, resume=False, eval_fn=None, quiet=False) -> PurifyResult:
        cfg = self.config
        t0 = time.perf_counter()
        masks, history = self.learn_masks(model, clean, quiet, Path(run_dir) / "masks" if run_dir else None, resume)
        purified = model.copy()
        total = bn_channel_count(purified.net)
        if cfg.fraction is not None:
            pruned = prune_bn_channels(purified.net, masks, count=round(cfg.fraction * total))
        else:
            pruned = prune_bn_channels(purified.net, masks, cfg.threshold)
        info = {"iterations": cfg.iterations, "steps": cfg.iterations, "channels": total, "pruned": pruned,
                "threshold": cfg.threshold, "fraction": cfg.fraction, "sweep": threshold_sweep(model, masks, eval_fn),
                "masks": masks_to_lists(masks), "seconds": time.perf_counter() - t0}
        return PurifyResult(purified, history, info)
