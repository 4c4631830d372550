"""Fine-pruning (Liu, Dolan-Gavitt, Garg, RAID 2018), spec §5.2."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..classifier import Classifier
from ..data.dataset import ImageDataset
from ..data.subset import select_clean_subset
from ..errors import UserError
from ..metrics import accuracy
from ..models.taps import resolve_module
from ..training import Trainer, eval_columns
from .base import Defense, DefenseTrainConfig, PurifyResult, Stage


@dataclass
class FinePruningConfig(DefenseTrainConfig):
    """Prune the channels entering the classifier head (``layer=None``) in ascending order of mean
    clean activation until accuracy on a held-out ``val_fraction`` (10 %) of the clean subset falls by
    more than ``max_acc_drop`` (0.05, absolute), then fine-tune with the inherited FT recipe (spec §5.1:
    10 epochs, lr 0.1 ÷10 every 2 epochs, batch 64). ``layer`` may instead name a Conv2d, BatchNorm2d
    or Linear module whose output channels are pruned."""

    layer: str | None = None
    max_acc_drop: float = 0.05
    val_fraction: float = 0.1

    def check(self):
        super().check()
        if not 0 <= self.max_acc_drop <= 1:
            raise UserError(f"max_acc_drop must be in [0, 1], got {self.max_acc_drop}")
        if not 0 < self.val_fraction < 1:
            raise UserError(f"val_fraction must be in (0, 1), got {self.val_fraction}")


def head_linear(net: nn.Module) -> str:
    """Name of the last ``nn.Linear`` in module order: the classifier head of a CNN."""
    names = [name for name, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise UserError(f"{type(net).__name__} has no Linear classifier head; name a layer to prune")
    return names[-1]


class ChannelPruner:
    """The channels of one layer: their mean activation, and zeroing them in the weights.

    With ``layer=None`` the channels are the inputs of the head Linear. For a globally average-pooled
    CNN that input is the per-channel spatial mean of the last layer's activation, e.g. WRN-16-1's
    post-BN-ReLU group-3 output (spec §5.2), so averaging it over the data is the paper's mean
    activation; zeroing the matching weight columns removes each channel from the function exactly,
    on any such architecture. (Zeroing the final BN's γ and β too would change nothing: that channel
    feeds only the head. Not every model has such a BN, e.g. PreActResNet has none before its head.)
    A named Conv2d/BatchNorm2d/Linear instead has its output channels ranked and zeroed (weight and
    bias rows). Zeroing a conv filter that a BN follows does not silence the channel; name the BN.
    """

    def __init__(self, net: nn.Module, layer: str | None = None):
        self.on_input = layer is None
        self.layer = head_linear(net) if layer is None else layer
        module = resolve_module(net, self.layer)
        if self.on_input:
            self.channels = module.in_features
        elif isinstance(module, (nn.Conv2d, nn.BatchNorm2d, nn.Linear)):
            self.channels = module.weight.shape[0]
        else:
            raise UserError(f"fine-pruning layer {self.layer!r} is a {type(module).__name__}; name a Conv2d, "
                            "BatchNorm2d or Linear (or leave it unset for the classifier head's inputs)")

    def targets(self, net: nn.Module) -> list[tuple[torch.Tensor, int]]:
        """(parameter, channel dimension) pairs that carry the channels in ``net`` (a copy of the same model)."""
        module = resolve_module(net, self.layer)
        if self.on_input:
            return [(module.weight, 1)]
        return [(p, 0) for p in (module.weight, module.bias) if p is not None]

    @torch.no_grad()
    def mean_activation(self, model: Classifier, data: ImageDataset, batch_size: int = 256) -> torch.Tensor:
        module = resolve_module(model.net, self.layer)
        total = torch.zeros(self.channels, dtype=torch.float64)

        def record(mod, inputs, output):
            a = (inputs[0] if self.on_input else output).detach().double()
            total.add_(a.transpose(0, 1).reshape(self.channels, -1).mean(1).cpu() * len(a))

        handle = module.register_forward_hook(record)
        was_training = model.net.training
        model.net.eval()
        try:
            for i in range(0, len(data), batch_size):
                model(data.images[i:i + batch_size])
        finally:
            handle.remove()
            model.net.train(was_training)
        return (total / len(data)).float()

    @torch.no_grad()
    def zero(self, net: nn.Module, channels: list[int]) -> None:
        for p, dim in self.targets(net):
            p.index_fill_(dim, torch.as_tensor(channels, dtype=torch.long, device=p.device), 0.0)

    def freeze(self, net: nn.Module, channels: list[int]) -> list:
        """Gradient hooks that keep the pruned weights at zero while fine-tuning (SGD's weight decay and
        momentum then leave them at zero too). Returns the handles to remove."""
        idx = torch.as_tensor(channels, dtype=torch.long)
        return [p.register_hook(lambda g, dim=dim: g.index_fill(dim, idx.to(g.device), 0.0))
                for p, dim in self.targets(net)]


class FinePruning(Defense):
    """Fine-pruning: prune the least-active channels of the last convolutional layer on clean data,
    then fine-tune.

    Liu, Dolan-Gavitt, Garg, "Fine-Pruning: Defending Against Backdooring Attacks on Deep Neural
    Networks", RAID 2018; spec §5.2. Channels are pruned one at a time; the last one that pushes the
    held-out accuracy below the bound is not kept pruned, and at least one channel always remains.
    Channels are ranked on the clean subset minus the held-out split; fine-tuning uses the whole subset.
    Pruning is stored as zeroed weights, so the saved model is an ordinary checkpoint.
    """

    name = "fine-pruning"
    diagnostics = ("pruned",)
    stages = (Stage("fine-tune", "epochs"),)

    def __init__(self, config: FinePruningConfig):
        config.check()
        super().__init__(config)

    def prune(self, model: Classifier, clean: ImageDataset) -> tuple[Classifier, ChannelPruner, list[int], dict]:
        """A pruned copy of ``model``, the pruner, the pruned channels (in order) and bookkeeping."""
        cfg = self.config
        pruner = ChannelPruner(model.net, cfg.layer)
        val_idx = select_clean_subset(clean.labels, fraction=cfg.val_fraction, seed=cfg.seed,
                                      num_classes=clean.num_classes)
        rest = torch.ones(len(clean), dtype=torch.bool)
        rest[val_idx] = False
        val, rank_set = clean.subset(val_idx), clean.subset(torch.nonzero(rest).flatten())
        activation = pruner.mean_activation(model, rank_set)
        order = torch.argsort(activation, stable=True).tolist()

        work = model.copy()
        base = accuracy(work, val.images, val.labels)
        trace = [{"pruned": 0, "channel": None, "val_acc": base}]
        keep_pruned = 0
        for k, channel in enumerate(order[:-1], start=1):
            pruner.zero(work.net, [channel])
            acc = accuracy(work, val.images, val.labels)
            trace.append({"pruned": k, "channel": channel, "val_acc": acc})
            if base - acc > cfg.max_acc_drop + 1e-9:  # tolerance: 1.0 − 0.95 is 0.05000000000000004
                break
            keep_pruned = k
        pruned = model.copy()
        channels = order[:keep_pruned]
        pruner.zero(pruned.net, channels)
        info = {"layer": pruner.layer, "on_head_input": pruner.on_input, "channels": pruner.channels,
                "pruned": keep_pruned, "pruned_channels": channels, "activation": activation.tolist(),
                "val_size": len(val), "val_acc_before": base, "acc_trace": trace}
        return pruned, pruner, channels, info

    def purify(self, model, clean, *, run_dir=None, resume=False, eval_fn=None, quiet=False) -> PurifyResult:
        t0 = time.perf_counter()
        pruned, pruner, channels, info = self.prune(model, clean)
        run_dir = Path(run_dir) if run_dir else None
        # The probe runs on the pruned model: that is the one the fine-tuning restarts.
        cfg, info["lr_probe"] = self.fitted_config(pruned, clean, run_dir, quiet)
        handles = pruner.freeze(pruned.net, channels)
        try:
            res = Trainer(cfg.train_config(), desc="fine-pruning", quiet=quiet).fit(
                pruned, clean, callbacks=eval_columns(eval_fn), run_dir=run_dir, resume=resume)
        finally:
            for h in handles:
                h.remove()
        info.update(epochs=res.epochs, steps=res.steps, seconds=time.perf_counter() - t0)
        return PurifyResult(pruned, res.history, info)
