"""A model together with what it needs to be used: input normalisation, classes, attention sites."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import UserError

NAMED_NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]] | None] = {
    # NAD, ARGD and ABL feed raw [0, 1] inputs (spec §1.1).
    "none": None,
    # RNP and ANP (spec §1.1).
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "mnist": ((0.1307,), (0.3081,)),
}


@dataclass(frozen=True)
class Normalization:
    """Per-channel ``(x - mean) / std`` applied to inputs scaled to [0, 1]; ``mean=None`` means none."""

    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    @classmethod
    def parse(cls, spec: str | None) -> "Normalization":
        """``none``, a named one (``cifar10``, ``imagenet``, ``mnist``) or ``m1,m2,m3:s1,s2,s3``."""
        if spec is None or spec.lower() == "none":
            return cls()
        key = spec.lower()
        if key in NAMED_NORMALIZATIONS:
            pair = NAMED_NORMALIZATIONS[key]
            return cls(*pair) if pair else cls()
        try:
            mean_s, std_s = spec.split(":")
            mean = tuple(float(v) for v in mean_s.split(","))
            std = tuple(float(v) for v in std_s.split(","))
        except ValueError:
            raise UserError(f"bad normalisation {spec!r}: use none, {', '.join(n for n in NAMED_NORMALIZATIONS if n != 'none')}"
                            " or MEAN1,MEAN2,MEAN3:STD1,STD2,STD3") from None
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise UserError(f"bad normalisation {spec!r}: mean and std need the same length and std > 0")
        return cls(mean, std)

    def to_dict(self) -> dict:
        return {"mean": list(self.mean) if self.mean else None, "std": list(self.std) if self.std else None}

    @classmethod
    def from_dict(cls, d: dict | None) -> "Normalization":
        if not d or d.get("mean") is None:
            return cls()
        return cls(tuple(d["mean"]), tuple(d["std"]))


def nonfinite_summary(tensors: dict[str, torch.Tensor]) -> str:
    """'' when every floating tensor is finite, else e.g. '1 NaN/inf value in fc.weight'."""
    bad = [(name, int((~torch.isfinite(t)).sum())) for name, t in tensors.items()
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if not bad:
        return ""
    name, n = bad[0]
    more = f" and {len(bad) - 1} more tensor(s)" if len(bad) > 1 else ""
    return f"{n} NaN/inf value{'s' if n > 1 else ''} in {name}{more}"


# Inference runs 256 images at a time in channels-last layout: oneDNN's CPU convolutions take NHWC
# natively, so a WRN-16-1 forward on a 2-core AVX-512 CPU ran 2.5x as fast as the 512 contiguous images
# used before, with logits within 6e-6 and the same argmax on 4,096 CIFAR-10 test images
# (benchmarks/eval_throughput.py, benchmarks/results/eval_throughput.md). Evaluation was most of a short
# defense run's time.
EVAL_BATCH = 256


@dataclass
class Classifier:
    """``net`` maps normalised float inputs to logits; :meth:`prepare` turns uint8 images into them."""

    net: nn.Module
    arch: str
    classes: list[str]
    normalization: Normalization = field(default_factory=Normalization)
    sites: list[str] = field(default_factory=list)
    input_shape: tuple[int, int, int] = (3, 32, 32)

    def __post_init__(self):
        self._stats: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def to(self, device) -> "Classifier":
        self.net.to(device)
        self._stats = None
        return self

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 N×C×H×W (any device) → float inputs on the model's device, normalised."""
        x = x.to(self.device, non_blocking=True)
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
        norm = self.normalization
        if norm.mean is None:
            return x
        if self._stats is None or self._stats[0].device != x.device:
            c = x.shape[1]
            mean = torch.tensor(norm.mean, device=x.device).view(1, -1, 1, 1)
            std = torch.tensor(norm.std, device=x.device).view(1, -1, 1, 1)
            if mean.shape[1] not in (1, c):
                raise UserError(f"normalisation has {mean.shape[1]} channels but the images have {c}")
            self._stats = (mean, std)
        mean, std = self._stats
        return (x - mean) / std

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.prepare(x))

    @torch.no_grad()
    def batched_logits(self, images: torch.Tensor, batch_size: int = EVAL_BATCH) -> list[torch.Tensor]:
        """Logits of ``images`` (uint8, any device), one tensor per batch, in eval mode without gradients,
        the inputs in channels-last layout (EVAL_BATCH says why); the net's train/eval mode is restored."""
        was_training = self.net.training
        self.net.eval()
        out = []
        try:
            for i in range(0, len(images), batch_size):
                x = self.prepare(images[i:i + batch_size])
                out.append(self.net(x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x))
        finally:
            self.net.train(was_training)
        return out

    def predict(self, images: torch.Tensor, batch_size: int = EVAL_BATCH) -> torch.Tensor:
        """Predicted labels (CPU int64) for uint8 images, in eval mode."""
        preds = [logits.argmax(1).cpu() for logits in self.batched_logits(images, batch_size)]
        return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.int64)

    def copy(self) -> "Classifier":
        """An independent deep copy (weights and all)."""
        clone = copy.copy(self)
        clone.net = copy.deepcopy(self.net)
        clone.sites = list(self.sites)
        clone.classes = list(self.classes)
        clone._stats = None
        return clone

    def describe(self) -> dict:
        return {"arch": self.arch, "num_classes": self.num_classes, "classes": self.classes,
                "normalization": self.normalization.to_dict(), "sites": self.sites,
                "input_shape": list(self.input_shape)}
