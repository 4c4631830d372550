"""ANP: Adversarial Neuron Pruning (Wu & Wang, NeurIPS 2021), spec §5.9."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.augment import CropFlip
from ..errors import UserError
from .base import Defense, PurifyResult
from .bn_masks import BNMasks, bn_channel_count, masks_to_lists, prune_bn_channels, threshold_sweep

LOG_EVERY = 100  # iterations per history record


@dataclass
class ANPConfig:
    """Paper/release defaults (spec §5.9): ε = 0.4, α = 0.2, mask SGD lr 0.2 with momentum 0.9,
    batch 128 drawn with replacement, 2,000 iterations, one signed noise step of size ε/``noise_steps``;
    prune channels with mask ≤ ``threshold`` (0.2), or the ``fraction`` of channels with the smallest
    masks when it is set. Crop + flip, as the release's clean loader."""

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

    def check(self):
        if self.eps < 0 or not 0 <= self.alpha <= 1 or self.iterations < 0 or self.noise_steps < 1:
            raise UserError("ANP needs eps ≥ 0, 0 ≤ alpha ≤ 1, iterations ≥ 0 and noise_steps ≥ 1")
        if self.fraction is not None and not 0 <= self.fraction <= 1:
            raise UserError(f"ANP pruning fraction must be in [0, 1], got {self.fraction}")
        if self.augment not in ("crop-flip", "none"):
            raise UserError(f"augment must be 'crop-flip' or 'none', got {self.augment!r}")


class ANP(Defense):
    """Adversarial Neuron Pruning: learn BN-channel masks that keep clean accuracy under adversarial
    neuron perturbation, then prune the channels with small masks.

    Wu & Wang, "Adversarial Neuron Pruning Purifies Backdoored Deep Models", NeurIPS 2021; spec §5.9.
    Per iteration: draw δ, ξ ~ U(−ε, ε), take ``noise_steps`` signed ascent steps on CE, then one mask
    step on α·CE(m) + (1−α)·CE(m+δ, 1+ξ) and clamp m to [0, 1]. The mask is learned on a scratch copy
    in train mode (its BN running statistics drift, as in the release) and the *input* model's γ is
    zeroed. Departure from the release: after the ascent step the noise is projected back onto
    [−ε, ε], the paper's constraint (the release lets a step from a random start reach 2ε).
    No checkpoints (``run_dir``/``resume`` are ignored): the whole run is a few thousand small steps.
    """

    name = "anp"

    def __init__(self, config: ANPConfig):
        config.check()
        super().__init__(config)

    def learn_masks(self, model, clean, quiet: bool = True) -> tuple[dict[str, torch.Tensor], list[dict]]:
        """The mask values per BN layer and a history record every ``LOG_EVERY`` iterations."""
        cfg = self.config
        scratch = model.copy()
        scratch.net.requires_grad_(False)
        scratch.net.train()
        bn = BNMasks(scratch.net, noise=True)
        mask_opt = torch.optim.SGD(bn.masks, lr=cfg.lr, momentum=cfg.momentum)
        noise_opt = torch.optim.SGD(bn.noise(), lr=cfg.eps / cfg.noise_steps)
        augment = CropFlip(4) if cfg.augment == "crop-flip" else None
        gen = torch.Generator().manual_seed(cfg.seed)
        torch.manual_seed(cfg.seed)  # the noise draws use the global generator (it may live on the GPU)
        images, labels = clean.images.to(scratch.device), clean.labels.to(scratch.device)
        history, sums, t0 = [], {"loss": 0.0, "acc": 0.0}, time.perf_counter()
        for it in range(cfg.iterations):
            idx = torch.randint(len(clean), (cfg.batch_size,), generator=gen).to(images.device)
            x, y = images[idx], labels[idx]
            x = scratch.prepare(augment(x, gen) if augment else x)
            if cfg.eps > 0:
                with torch.no_grad():
                    for p in bn.noise():
                        p.uniform_(-cfg.eps, cfg.eps)
                bn.perturbed = True
                for _ in range(cfg.noise_steps):
                    noise_opt.zero_grad(set_to_none=True)
                    (-F.cross_entropy(bn(x), y)).backward()
                    for p in bn.noise():
                        p.grad.sign_()
                    noise_opt.step()  # descent on −CE with signed gradients: an ε-sized ascent on CE
                    with torch.no_grad():
                        for p in bn.noise():
                            p.clamp_(-cfg.eps, cfg.eps)
                loss_rob = F.cross_entropy(bn(x), y)
            else:
                loss_rob = torch.zeros((), device=x.device)
            bn.perturbed = False
            logits = bn(x)
            loss = cfg.alpha * F.cross_entropy(logits, y) + (1 - cfg.alpha) * loss_rob
            mask_opt.zero_grad(set_to_none=True)
            loss.backward()
            mask_opt.step()
            bn.clamp_()
            sums["loss"] += loss.item()
            sums["acc"] += (logits.argmax(1) == y).float().mean().item()
            if (it + 1) % LOG_EVERY == 0 or it + 1 == cfg.iterations:
                n = (it % LOG_EVERY) + 1
                flat = torch.cat([m.detach().flatten() for m in bn.masks])
                history.append({"iteration": it + 1, "loss": sums["loss"] / n, "train_acc": sums["acc"] / n,
                                "mask_mean": flat.mean().item(), "below_threshold": int((flat <= cfg.threshold).sum()),
                                "seconds": time.perf_counter() - t0})
                sums = {"loss": 0.0, "acc": 0.0}
                if not quiet:
                    r = history[-1]
                    tqdm.write(f"anp iteration {it + 1}/{cfg.iterations}: loss={r['loss']:.4f} acc={r['train_acc']:.4f} "
                               f"masks≤{cfg.threshold}: {r['below_threshold']}", file=sys.stderr)
        return bn.values(), history

    def purify(self, model, clean, *, run_dir=None, resume=False, eval_fn=None, quiet=False) -> PurifyResult:
        cfg = self.config
        t0 = time.perf_counter()
        masks, history = self.learn_masks(model, clean, quiet)
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
