"""Neural Cleanse (Wang et al., IEEE S&P 2019) as a backdoor *detector*.

For every class c, reverse-engineer the smallest trigger that sends clean images to c: a mask m (H×W
in [0, 1]) and a pattern p (C×H×W in [0, 1]) minimising CE(f((1 − m)·x + m·p), c) + λ_c·|m|₁. A
backdoor target needs a far smaller mask than the other classes, so its mask L1 norm is an outlier
below the median, measured by the MAD anomaly index. The SAGE paper (Gong et al., S&P 2023, §VI,
Table VI; spec §6.3) uses it with threshold 2 to check purified models ("MAD index < 2.0").
"""
from __future__ import annotations

import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..classifier import Classifier
from ..data.dataset import ImageDataset
from ..errors import UserError
from ..registry import config_to_dict

# Makes the MAD of a normal distribution estimate its standard deviation (NC's `consistency_constant`).
MAD_CONSISTENCY = 1.4826


@dataclass
class NCConfig:
    """Defaults follow the released visualizer (bolunwang/backdoor): Adam lr 0.1, betas (0.5, 0.9),
    ``samples`` = 1,000 clean images in batches of 32 (⌈samples / batch⌉ steps per epoch), up to
    ``epochs`` = 1,000 epochs with early stopping; λ starts at ``init_cost`` = 1e-3 and, per class
    after each epoch, is multiplied by ``cost_multiplier`` (1.5) once the epoch's attack success has
    been ≥ ``attack_success`` (0.99) for ``patience`` (5) epochs in a row, and divided by
    ``cost_multiplier``^1.5 after ``patience`` epochs below it. Early stop: once λ has gone both up and
    down and the best mask's L1 has not improved for ``early_stop_patience`` (5 × patience) epochs.

    Detection: a class is flagged when its mask L1 is below the median and its anomaly index
    |L1 − median| / (1.4826·MAD) exceeds ``threshold`` (2). ``mad_epsilon`` floors the scaled MAD so a
    MAD of 0 (more than half the norms equal) gives a large finite index instead of a division by 0.
    ``targets``: the classes to analyse (default all)."""

    epochs: int = 1000
    batch_size: int = 32
    samples: int = 1000
    lr: float = 0.1
    betas: tuple[float, float] = (0.5, 0.9)
    init_cost: float = 1e-3
    cost_multiplier: float = 1.5
    patience: int = 5
    attack_success: float = 0.99
    early_stop: bool = True
    early_stop_patience: int = 25
    threshold: float = 2.0
    mad_epsilon: float = 1e-6
    targets: tuple[int, ...] | None = None
    seed: int = 0

    def check(self):
        if self.epochs < 1 or self.batch_size < 1 or self.samples < 1 or self.patience < 1:
            raise UserError("Neural Cleanse needs epochs, batch size, samples and patience ≥ 1")
        if self.lr <= 0 or self.init_cost < 0 or self.cost_multiplier <= 1:
            raise UserError("Neural Cleanse needs lr > 0, init_cost ≥ 0 and cost_multiplier > 1")
        if not 0 < self.attack_success <= 1:
            raise UserError(f"attack_success must be in (0, 1], got {self.attack_success}")
        if self.mad_epsilon <= 0:
            raise UserError("mad_epsilon must be > 0")


# -- outlier detection ---------------------------------------------------------------------------
def anomaly_indices(norms, eps: float = 1e-6) -> tuple[list[float], float, float]:
    """Per-class anomaly index |L1_c − median| / max(1.4826·MAD, eps), with the median and the scaled MAD.

    The median of an even count is the mean of the two middle values (``np.median``, as NC's code).
    A MAD of 0 means more than half the classes have the same norm; any other class is then an
    extreme outlier, which the eps floor reports as a large finite index (JSON has no ∞).
    """
    norms = [float(n) for n in norms]
    if not norms:
        raise UserError("no mask norms to analyse")
    median = statistics.median(norms)
    mad = MAD_CONSISTENCY * statistics.median(abs(n - median) for n in norms)
    scale = max(mad, eps)
    return [abs(n - median) / scale for n in norms], median, mad


def flag_classes(norms, indices, median: float, threshold: float = 2.0) -> list[int]:
    """Positions whose norm is below the median with an anomaly index above ``threshold``: only
    unusually *small* triggers indicate a backdoor (NC's ``mad_outlier_detection``)."""
    return [i for i, (n, a) in enumerate(zip(norms, indices)) if n <= median and a > threshold]


@dataclass
class NCReport:
    """Per analysed class (``targets``): mask L1 norm, anomaly index, attack success of the kept mask,
    whether a mask reached the success threshold (``found``), final λ and epochs run.

    ``mad_index`` is NC's model-level number: the index of the smallest-norm class, i.e. the largest
    index among classes at or below the median; ``max_index`` is the largest over all classes (a
    class far *above* the median is not suspicious). ``flagged`` holds class labels."""

    targets: list[int]
    l1_norms: list[float]
    anomaly_index: list[float]
    flagged: list[int]
    median: float
    mad: float
    mad_index: float
    max_index: float
    threshold: float
    attack_success: list[float] = field(default_factory=list)
    found: list[bool] = field(default_factory=list)
    cost: list[float] = field(default_factory=list)
    epochs: list[int] = field(default_factory=list)
    seconds: float = 0.0
    config: dict = field(default_factory=dict)
    masks: torch.Tensor | None = None       # K×H×W
    patterns: torch.Tensor | None = None    # K×C×H×W

    @property
    def backdoored(self) -> bool:
        return bool(self.flagged)

    def to_dict(self) -> dict:
        keys = ("targets", "l1_norms", "anomaly_index", "flagged", "median", "mad", "mad_index", "max_index",
                "threshold", "attack_success", "found", "cost", "epochs", "seconds", "config")
        return {"method": "neural-cleanse", "backdoored": self.backdoored, **{k: getattr(self, k) for k in keys}}


def report_from_norms(norms, targets=None, *, threshold: float = 2.0, eps: float = 1e-6, **extra) -> NCReport:
    """The detection half of NC on given mask norms (also handy for norms computed elsewhere)."""
    norms = [float(n) for n in norms]
    targets = list(range(len(norms))) if targets is None else [int(t) for t in targets]
    idx, median, mad = anomaly_indices(norms, eps)
    flagged = [targets[i] for i in flag_classes(norms, idx, median, threshold)]
    low = [a for n, a in zip(norms, idx) if n <= median]
    return NCReport(targets, norms, idx, flagged, median, mad, max(low), max(idx), threshold, **extra)


# -- trigger reverse-engineering -----------------------------------------------------------------
def _to_free(values: torch.Tensor) -> torch.Tensor:
    """Inverse of tanh(v)/2 + 0.5, kept off ±1 so atanh stays finite."""
    return torch.atanh((values - 0.5) * (2 - 1e-4))


def _squash(v: torch.Tensor) -> torch.Tensor:
    return torch.tanh(v) / 2 + 0.5


class NeuralCleanse:
    """Reverse-engineer one minimal trigger per class and flag classes whose mask is anomalously small.

    Wang, Yao, Shan, Li, Viswanath, Zheng, Zhao, "Neural Cleanse: Identifying and Mitigating Backdoor
    Attacks in Neural Networks", IEEE S&P 2019; used as a detector by SAGE (spec §6.3). Departures from
    the released code, all to keep it short and fast:

    * all classes are optimised in one batch (each class has its own mask, pattern, λ and counters;
      Adam is element-wise and the class losses are summed, so the updates equal separate runs),
      and a class stops costing compute once it early-stops;
    * λ starts at ``init_cost`` instead of the release's 0-then-``init_cost`` warm-up;
    * the kept ("best") mask is the end-of-epoch mask of the epoch with the smallest L1 among epochs
      whose running attack success reached the threshold (the release compares the epoch-mean L1);
      if none did, the last mask is kept and ``found`` is False;
    * masks are optimised in input space [0, 1] before the model's normalisation, at full resolution
      (the release's ``upsample_size`` = 1).
    """

    name = "neural-cleanse"

    def __init__(self, config: NCConfig | None = None):
        self.config = config or NCConfig()
        self.config.check()

    def describe(self) -> dict:
        return {"name": self.name, "config": config_to_dict(self.config)}

    def detect(self, model: Classifier, clean: ImageDataset, *, device=None, quiet: bool = False) -> NCReport:
        cfg = self.config
        t0 = time.perf_counter()
        out = self.reverse_engineer(model, clean, device=device, quiet=quiet)
        norms = out["masks"].flatten(1).sum(1).tolist()
        return report_from_norms(norms, out["targets"], threshold=cfg.threshold, eps=cfg.mad_epsilon,
                                 attack_success=out["attack_success"], found=out["found"], cost=out["cost"],
                                 epochs=out["epochs"], seconds=time.perf_counter() - t0,
                                 config=config_to_dict(cfg), masks=out["masks"], patterns=out["patterns"])

    def reverse_engineer(self, model: Classifier, clean: ImageDataset, *, device=None, quiet: bool = True) -> dict:
        """Per target: the kept mask (H×W) and pattern (C×H×W), its attack success, λ and epochs."""
        cfg = self.config
        device = torch.device(device) if device is not None else model.device
        if device != model.device:
            model = model.copy().to(device)  # never move the caller's model
        targets = list(range(model.num_classes)) if cfg.targets is None else [int(t) for t in cfg.targets]
        if not targets or any(not 0 <= t < model.num_classes for t in targets):
            raise UserError(f"targets must be classes in 0..{model.num_classes - 1}, got {targets}")
        if len(clean) == 0:
            raise UserError("Neural Cleanse needs clean images")

        g = torch.Generator().manual_seed(cfg.seed)
        pick = torch.randperm(len(clean), generator=g)[:cfg.samples]
        images = clean.images[pick].to(device).float().div_(255)
        n, (c, h, w) = len(images), images.shape[1:]
        batch = min(cfg.batch_size, n)
        steps_per_epoch = math.ceil(n / batch)
        k_all = len(targets)
        # Random initial masks and patterns, as the release (uniform in [0, 1]).
        mask_vars = [torch.nn.Parameter(_to_free(torch.rand(h, w, generator=g)).to(device)) for _ in targets]
        pattern_vars = [torch.nn.Parameter(_to_free(torch.rand(c, h, w, generator=g)).to(device)) for _ in targets]
        opt = torch.optim.Adam(mask_vars + pattern_vars, lr=cfg.lr, betas=tuple(cfg.betas))
        target_t = torch.tensor(targets, device=device)

        cost = [cfg.init_cost] * k_all
        up, down = [0] * k_all, [0] * k_all
        went_up, went_down = [False] * k_all, [False] * k_all
        best_l1, best_acc = [math.inf] * k_all, [0.0] * k_all
        best_mask: list[torch.Tensor | None] = [None] * k_all
        best_pattern: list[torch.Tensor | None] = [None] * k_all
        stale, stale_best = [0] * k_all, [math.inf] * k_all
        active, epochs_run, last_acc = [True] * k_all, [0] * k_all, [0.0] * k_all

        was_training = model.net.training
        model.net.eval()
        show_bar = not quiet and sys.stderr.isatty()
        bar = tqdm(total=cfg.epochs, desc="neural cleanse", leave=False, disable=not show_bar, dynamic_ncols=True)
        try:
            for epoch in range(cfg.epochs):
                act = [k for k in range(k_all) if active[k]]
                if not act:
                    break
                order = torch.randperm(n, generator=g).to(device)
                hits = torch.zeros(len(act), device=device)
                seen = 0
                for step in range(steps_per_epoch):
                    x = images[order[step * batch:(step + 1) * batch]]
                    m = torch.stack([_squash(mask_vars[k]) for k in act])[:, None, None]     # A×1×1×H×W
                    p = torch.stack([_squash(pattern_vars[k]) for k in act])[:, None]        # A×1×C×H×W
                    stamped = ((1 - m) * x[None] + m * p).flatten(0, 1)                      # (A·b)×C×H×W
                    y = target_t[act].repeat_interleave(len(x))
                    logits = model(stamped)
                    ce = F.cross_entropy(logits, y, reduction="none").view(len(act), -1).mean(1)
                    l1 = m.flatten(1).sum(1)
                    lam = torch.tensor([cost[k] for k in act], device=device)
                    opt.zero_grad(set_to_none=True)  # inactive classes keep grad None, so Adam skips them
                    (ce + lam * l1).sum().backward(inputs=[mask_vars[k] for k in act] + [pattern_vars[k] for k in act])
                    opt.step()
                    hits += (logits.detach().argmax(1) == y).view(len(act), -1).sum(1)
                    seen += len(x)
                acc = (hits / seen).tolist()
                with torch.no_grad():
                    for j, k in enumerate(act):
                        epochs_run[k] = epoch + 1
                        last_acc[k] = acc[j]
                        mask_now = _squash(mask_vars[k])
                        reached = acc[j] >= cfg.attack_success
                        if reached and mask_now.sum().item() < best_l1[k]:
                            best_l1[k], best_acc[k] = mask_now.sum().item(), acc[j]
                            best_mask[k], best_pattern[k] = mask_now.clone(), _squash(pattern_vars[k]).clone()
                        if cfg.early_stop:
                            if best_l1[k] < math.inf:
                                stale[k] = stale[k] + 1 if best_l1[k] >= stale_best[k] else 0
                            stale_best[k] = min(stale_best[k], best_l1[k])
                            if went_up[k] and went_down[k] and stale[k] >= cfg.early_stop_patience:
                                active[k] = False
                        # λ schedule: more sparsity pressure while the attack works, less when it fails
                        up[k], down[k] = (up[k] + 1, 0) if reached else (0, down[k] + 1)
                        if up[k] >= cfg.patience:
                            up[k], went_up[k] = 0, True
                            cost[k] *= cfg.cost_multiplier
                        elif down[k] >= cfg.patience:
                            down[k], went_down[k] = 0, True
                            cost[k] /= cfg.cost_multiplier ** 1.5
                bar.update(1)
                if show_bar:
                    bar.set_postfix(active=sum(active), min_l1=f"{min(best_l1):.1f}")
                elif not quiet and ((epoch + 1) % 10 == 0 or epoch + 1 == cfg.epochs):
                    # No bar in a log file, but a run takes minutes per model on a CPU: say where it is.
                    print(f"neural cleanse epoch {epoch + 1}/{cfg.epochs}: {sum(active)} classes active, "
                          f"smallest mask L1 so far {min(best_l1):.1f}", file=sys.stderr, flush=True)
        finally:
            bar.close()
            model.net.train(was_training)

        found = [b is not None for b in best_mask]
        with torch.no_grad():
            masks = torch.stack([best_mask[k] if found[k] else _squash(mask_vars[k]) for k in range(k_all)])
            patterns = torch.stack([best_pattern[k] if found[k] else _squash(pattern_vars[k]) for k in range(k_all)])
        return {"targets": targets, "masks": masks.cpu(), "patterns": patterns.cpu(),
                "attack_success": [best_acc[k] if found[k] else last_acc[k] for k in range(k_all)],
                "found": found, "cost": cost, "epochs": epochs_run}


def save_masks_png(report: NCReport, path: str | Path) -> Path:
    """A PNG with one column per class: the mask (row 1) and the masked pattern m·p (row 2), titled with
    the mask L1 and anomaly index; flagged classes are titled in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if report.masks is None or report.patterns is None:
        raise UserError("this report carries no masks (it was built from norms only)")
    k = len(report.targets)
    fig, axes = plt.subplots(2, k, figsize=(1.4 * k, 3.2), squeeze=False)
    for j, t in enumerate(report.targets):
        m, p = report.masks[j], report.patterns[j]
        axes[0][j].imshow(m.numpy(), cmap="gray", vmin=0, vmax=1)
        trig = (m[None] * p).permute(1, 2, 0).numpy()
        axes[1][j].imshow(trig.squeeze(), cmap="gray" if trig.shape[-1] == 1 else None, vmin=0, vmax=1)
        axes[0][j].set_title(f"{t}: L1 {report.l1_norms[j]:.0f}\nidx {report.anomaly_index[j]:.2f}", fontsize=8,
                             color="red" if t in report.flagged else "black")
        for r in range(2):
            axes[r][j].set_xticks([])
            axes[r][j].set_yticks([])
    axes[0][0].set_ylabel("mask", fontsize=9)
    axes[1][0].set_ylabel("mask·pattern", fontsize=9)
    fig.suptitle(f"Neural Cleanse: MAD index {report.mad_index:.2f}, flagged {report.flagged or 'none'}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
