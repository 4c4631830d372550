"""MCR: mode connectivity repair (Zhao et al., ICLR 2020), spec §5.3."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call

from ..classifier import Classifier
from ..data.dataset import ImageDataset
from ..errors import UserError
from ..training import Schedule, Task, Trainer
from .base import Defense, DefenseTrainConfig, PurifyResult, Stage

T_SWEEP = tuple(round(0.1 * i, 1) for i in range(11))


@dataclass
class MCRConfig(DefenseTrainConfig):
    """The inherited optimiser fields are the FT recipe (spec §5.1) that makes the endpoint w1 from the
    backdoored model w0; ``epochs`` (10) is that fine-tuning's length. The ``curve_*`` fields are the
    IBM defaults for training the bend θ (spec §5.3): SGD lr 0.01, momentum 0.9, weight decay 1e-4,
    batch 128, 100 epochs, lr constant for 50 %, linear to 1 % at 90 %, then flat. The repaired model
    is the curve point at ``t`` (0.3, ARGD's table) with BN statistics recomputed on the clean subset."""

    curve_epochs: int = 100
    curve_lr: float = 0.01
    curve_momentum: float = 0.9
    curve_weight_decay: float = 1e-4
    curve_batch_size: int = 128
    t: float = 0.3

    def check(self):
        super().check()
        if not 0 <= self.t <= 1:
            raise UserError(f"MCR curve point t must be in [0, 1], got {self.t}")
        if self.curve_epochs < 0 or self.curve_batch_size < 1 or self.curve_lr < 0:
            raise UserError("MCR needs curve_epochs ≥ 0, curve_batch_size ≥ 1 and curve_lr ≥ 0")


def ibm_lr_factor(epoch: int, total: int) -> float:
    """The IBM/Garipov curve schedule: 1 up to 50 % of training, linear to 0.01 at 90 %, then 0.01."""
    return Schedule("curve").factor(epoch, total)


class CurveTask(Task):
    """One step of curve training: t ~ U[0, 1] per batch (drawn before augmentation, from the loop's
    generator), the curve point φ_θ(t) evaluated functionally on the frozen scratch network; θ trains."""

    def __init__(self, curve: "BezierCurve"):
        super().__init__()
        self.curve, self.t = curve, 0.0

    def parameters(self, classifier):
        return list(self.curve.theta)

    def before_augment(self, x, y, generator):
        self.t = float(torch.rand((), generator=generator))
        return x, y

    def forward(self, classifier, inputs):
        return functional_call(classifier.net, self.curve.point(self.t), (inputs,))


class BezierCurve:
    """Quadratic Bézier φ_θ(t) = (1−t)²·w0 + 2t(1−t)·θ + t²·w1 through every parameter of two networks
    of the same architecture; the endpoints are frozen copies, the bend θ starts at their midpoint."""

    def __init__(self, start: nn.Module, end: nn.Module):
        p0, p1 = dict(start.named_parameters()), dict(end.named_parameters())
        if p0.keys() != p1.keys() or any(p0[k].shape != p1[k].shape for k in p0):
            raise UserError("MCR endpoints must have the same architecture")
        self.names = list(p0)
        self.w0 = [p0[k].detach().clone() for k in self.names]
        self.w1 = [p1[k].detach().clone() for k in self.names]
        self.theta = [nn.Parameter((a + b) / 2) for a, b in zip(self.w0, self.w1)]

    def point(self, t: float) -> dict[str, torch.Tensor]:
        """Parameters at ``t``, differentiable with respect to θ."""
        a, b, c = (1 - t) ** 2, 2 * t * (1 - t), t ** 2
        return {k: a * w0 + b * th + c * w1 for k, w0, th, w1 in zip(self.names, self.w0, self.theta, self.w1)}


@torch.no_grad()
def recompute_bn_stats(model: Classifier, data: ImageDataset, batch_size: int = 128) -> None:
    """Reset every BatchNorm's running statistics and re-estimate them on ``data`` (no augmentation).

    Each batch enters with momentum b/(seen+b), so the running mean is the exact average over all
    images even when the last batch is short; with equal batches this is PyTorch's momentum=None
    cumulative average. Running variances are the batch-size-weighted average of batch variances.
    """
    net = model.net
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
    was_training = net.training
    net.train()
    seen = 0
    try:
        for i in range(0, len(data), batch_size):
            x = model.prepare(data.images[i:i + batch_size])
            for m in bns:
                m.momentum = len(x) / (seen + len(x))
            net(x)
            seen += len(x)
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        net.train(was_training)


class MCR(Defense):
    """Mode connectivity repair: train a quadratic Bézier curve between the backdoored model and its
    fine-tuned copy on the clean subset, and take the model at ``t``.

    Zhao, Chen, Das, Ramamurthy, Lin, "Bridging Mode Connectivity in Loss Landscapes and Adversarial
    Robustness", ICLR 2020; spec §5.3. One t ~ U[0, 1] per batch; the curve is evaluated functionally
    (``torch.func.functional_call`` with interpolated parameters) on a scratch network in train mode.
    Weight decay is SGD's on θ, as spec §5.3 words it (the IBM code builds on Garipov et al.'s curve
    code, whose L2 term, as we recall it unverified, is on the curve point φ_θ(t) instead). The curve
    lr steps once per epoch, as in that code. Pass ``endpoint=`` to reuse an existing fine-tuned model.
    With ``eval_fn`` the metrics along t = 0, 0.1, …, 1 are logged in ``info['t_sweep']``.
    """

    name = "mcr"
    stages = (Stage("endpoint", "epochs", "endpoint"), Stage("curve", "curve_epochs", "curve"))

    def __init__(self, config: MCRConfig):
        config.check()
        super().__init__(config)

    def model_at(self, curve: BezierCurve, template: Classifier, t: float, clean: ImageDataset) -> Classifier:
        """A stand-alone copy of ``template`` holding φ(t), with BN statistics from ``clean``."""
        out = template.copy()
        point = curve.point(t)
        with torch.no_grad():
            for name, p in out.net.named_parameters():
                p.copy_(point[name])
        recompute_bn_stats(out, clean, self.config.curve_batch_size)
        out.net.eval()
        return out

    def curve_train_config(self):
        cfg = self.config
        return cfg.train_config(epochs=cfg.curve_epochs, batch_size=cfg.curve_batch_size, lr=cfg.curve_lr,
                                momentum=cfg.curve_momentum, nesterov=False, weight_decay=cfg.curve_weight_decay,
                                schedule="curve", milestones=(), drop_last=False, shuffle=True)

    def train_curve(self, curve: BezierCurve, template: Classifier, clean: ImageDataset, *,
                    run_dir: Path | None = None, resume: bool = False, quiet: bool = True) -> list[dict]:
        scratch = template.copy()
        scratch.net.requires_grad_(False)
        res = Trainer(self.curve_train_config(), desc="mcr curve", quiet=quiet).fit(
            scratch, clean, task=CurveTask(curve), run_dir=run_dir, resume=resume)
        return res.history

    def purify(self, model, clean, *, run_dir=None, resume=False, eval_fn=None, quiet=False, endpoint=None
               ) -> PurifyResult:
        cfg = self.config
        run_dir = Path(run_dir) if run_dir else None
        t_start = time.perf_counter()
        info: dict = {"t": cfg.t, "curve_epochs": cfg.curve_epochs}
        if endpoint is None:
            endpoint = model.copy()
            res = Trainer(cfg.train_config(), desc="mcr endpoint", quiet=quiet).fit(
                endpoint, clean, run_dir=run_dir / "endpoint" if run_dir else None, resume=resume)
            info.update(ft_epochs=res.epochs, ft_steps=res.steps)
        curve = BezierCurve(model.net, endpoint.net)
        history = self.train_curve(curve, model, clean, run_dir=run_dir / "curve" if run_dir else None,
                                   resume=resume, quiet=quiet)
        purified = self.model_at(curve, model, cfg.t, clean)
        steps = len(history) * -(-len(clean) // cfg.curve_batch_size)
        info.update(epochs=cfg.curve_epochs, steps=steps, total_epochs=cfg.curve_epochs + info.get("ft_epochs", 0),
                    total_steps=steps + info.get("ft_steps", 0))
        if eval_fn is not None:
            info["t_sweep"] = [{"t": t, **eval_fn(self.model_at(curve, model, t, clean))} for t in T_SWEEP]
        info["seconds"] = time.perf_counter() - t_start
        return PurifyResult(purified, history, info, {"endpoint": endpoint})
