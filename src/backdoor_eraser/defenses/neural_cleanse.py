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
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..classifier import Classifier
from ..data.dataset import ImageDataset
from ..errors import UserError
from ..registry import config_to_dict
from ..training import Callback, Task, Trainer, TrainConfig

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
    ``targets``: the classes to analyse (default all). ``amp``: the trainer's precision."""

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
    amp: str = "auto"

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


class ClassSearch(Callback):
    """One class's trigger search, run by the trainer: a :class:`Task` of :meth:`batch`, :meth:`stamp`
    and :meth:`loss` steps CE(f((1 − m)·x + m·p), c) + λ·|m|₁ with the trigger's own Adam (``trigger``
    holds the free mask and pattern) on batches in the order of ``generator``'s permutations, one per
    epoch and the same for every class; after each epoch NCConfig's λ schedule, kept mask and early
    stop apply."""

    STATE = ("cost", "up", "down", "went_up", "went_down", "best_l1", "best_acc", "best_mask", "best_pattern",
             "stale", "stale_best", "epochs", "last_acc")

    def __init__(self, trigger: nn.ParameterDict, model: Classifier, images: torch.Tensor,
                 generator: torch.Generator, cfg: NCConfig):
        self.trigger, self.model, self.images, self.generator, self.cfg = trigger, model, images, generator, cfg
        self.adam = torch.optim.Adam(trigger.parameters(), lr=cfg.lr, betas=tuple(cfg.betas))
        self.cost, self.up, self.down, self.went_up, self.went_down = cfg.init_cost, 0, 0, False, False
        self.best_l1, self.best_acc, self.best_mask, self.best_pattern = math.inf, 0.0, None, None
        self.stale, self.stale_best, self.epochs, self.last_acc = 0, math.inf, 0, 0.0
        self.queue = torch.zeros(0, dtype=torch.int64)  # empty at each epoch end, where checkpoints fall

    def batch(self, x, y, generator):
        if not len(self.queue):
            self.queue = torch.randperm(len(self.images), generator=self.generator)
        x, self.queue = self.images[self.queue[:len(x)]], self.queue[len(x):]
        return x, y

    def stamp(self, classifier, inputs):
        self.mask = _squash(self.trigger["mask"])
        return self.model((1 - self.mask) * inputs + self.mask * _squash(self.trigger["pattern"]))

    def loss(self, logits, inputs, labels):
        ce = F.cross_entropy(logits, labels, reduction="none").mean()
        return ce + torch.tensor(self.cost, device=ce.device) * self.mask.sum(), {"ce": ce.detach()}

    def on_epoch_end(self, loop, record):
        cfg, acc = self.cfg, record["train_acc"]
        self.epochs, self.last_acc = loop.epoch, acc
        with torch.no_grad():
            mask, pattern = _squash(self.trigger["mask"]), _squash(self.trigger["pattern"])
        l1, reached = mask.sum().item(), acc >= cfg.attack_success
        if reached and l1 < self.best_l1:
            self.best_l1, self.best_acc, self.best_mask, self.best_pattern = l1, acc, mask, pattern
        record.update(cost=self.cost, mask_l1=l1)
        if cfg.early_stop:
            if self.best_l1 < math.inf:
                self.stale = self.stale + 1 if self.best_l1 >= self.stale_best else 0
            self.stale_best = min(self.stale_best, self.best_l1)
            if self.went_up and self.went_down and self.stale >= cfg.early_stop_patience:
                loop.request_stop(f"the kept mask (L1 {self.best_l1:.1f}) has not shrunk for {self.stale} epochs")
        # λ schedule: more sparsity pressure while the attack works, less when it fails
        self.up, self.down = (self.up + 1, 0) if reached else (0, self.down + 1)
        if self.up >= cfg.patience:
            self.up, self.went_up = 0, True
            self.cost *= cfg.cost_multiplier
        elif self.down >= cfg.patience:
            self.down, self.went_down = 0, True
            self.cost /= cfg.cost_multiplier ** 1.5

    def state_dict(self):
        return {"generator": self.generator.get_state(), **{k: getattr(self, k) for k in self.STATE}}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"].cpu())  # the checkpoint loads onto the model's device
        vars(self).update({k: state[k] for k in self.STATE})


class NeuralCleanse:
    """Reverse-engineer one minimal trigger per class and flag classes whose mask is anomalously small.

    Wang, Yao, Shan, Li, Viswanath, Zheng, Zhao, "Neural Cleanse: Identifying and Mitigating Backdoor
    Attacks in Neural Networks", IEEE S&P 2019; used as a detector by SAGE (spec §6.3). Each class's
    search is a trainer run (:class:`ClassSearch`) with its own mask, pattern, Adam and λ, checkpointed
    under ``run_dir``/class-<c> for ``resume``; all start from one seeded draw and see the images in the
    same order. Departures from the released code, all to keep it short and fast:

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

    def detect(self, model: Classifier, clean: ImageDataset, *, device=None, quiet: bool = False,
               run_dir: str | Path | None = None, resume: bool = False) -> NCReport:
        cfg = self.config
        t0 = time.perf_counter()
        out = self.reverse_engineer(model, clean, device=device, quiet=quiet, run_dir=run_dir, resume=resume)
        norms = out["masks"].flatten(1).sum(1).tolist()
        return report_from_norms(norms, out["targets"], threshold=cfg.threshold, eps=cfg.mad_epsilon,
                                 attack_success=out["attack_success"], found=out["found"], cost=out["cost"],
                                 epochs=out["epochs"], seconds=time.perf_counter() - t0,
                                 config=config_to_dict(cfg), masks=out["masks"], patterns=out["patterns"])

    def reverse_engineer(self, model: Classifier, clean: ImageDataset, *, device=None, quiet: bool = True,
                         run_dir: str | Path | None = None, resume: bool = False) -> dict:
        """Per target: the kept mask (H×W) and pattern (C×H×W), its attack success, λ and epochs."""
        cfg = self.config
        targets = list(range(model.num_classes)) if cfg.targets is None else [int(t) for t in cfg.targets]
        if not targets or any(not 0 <= t < model.num_classes for t in targets):
            raise UserError(f"targets must be classes in 0..{model.num_classes - 1}, got {targets}")
        if len(clean) == 0:
            raise UserError("Neural Cleanse needs clean images")
        device = torch.device(device) if device is not None else model.device
        model = model.copy().to(device)  # frozen and in eval mode; the caller's model is never touched
        model.net.eval().requires_grad_(False)
        g = torch.Generator().manual_seed(cfg.seed)
        images = clean.images[torch.randperm(len(clean), generator=g)[:cfg.samples]]
        n, (c, h, w) = len(images), images.shape[1:]
        # Random initial masks and patterns, as the release (uniform in [0, 1]).
        inits = [torch.rand(h, w, generator=g) for _ in targets], [torch.rand(c, h, w, generator=g) for _ in targets]
        orders = g.get_state()
        train = TrainConfig(epochs=cfg.epochs, batch_size=min(cfg.batch_size, n), lr=cfg.lr, momentum=0.0, nesterov=False,
                            weight_decay=0.0, augment="none", shuffle=False, seed=cfg.seed, amp=cfg.amp)
        searches = []
        for target, mask, pattern in zip(targets, *inits):
            trigger = nn.ParameterDict({"mask": nn.Parameter(_to_free(mask).to(device)),
                                        "pattern": nn.Parameter(_to_free(pattern).to(device))})
            s = ClassSearch(trigger, model, images, torch.Generator().set_state(orders), cfg)
            Trainer(train, desc=f"neural cleanse class {target}", quiet=quiet).fit(
                Classifier(trigger, "nc-trigger", model.classes, input_shape=model.input_shape),
                ImageDataset(images, torch.full((n,), target), model.classes), callbacks=[s],
                task=Task(s.loss, before_augment=s.batch, forward=s.stamp, optimizers=[s.adam]),
                run_dir=Path(run_dir) / f"class-{target}" if run_dir else None, resume=resume)
            searches.append(s)
        with torch.no_grad():  # the smallest successful mask, else the last one
            masks, patterns, success = zip(*((s.best_mask, s.best_pattern, s.best_acc) if s.best_mask is not None else
                                             (_squash(s.trigger["mask"]), _squash(s.trigger["pattern"]), s.last_acc)
                                             for s in searches))
        return {"targets": targets, "masks": torch.stack(masks).cpu(), "patterns": torch.stack(patterns).cpu(),
                "attack_success": list(success), "found": [s.best_mask is not None for s in searches],
                "cost": [s.cost for s in searches], "epochs": [s.epochs for s in searches]}


def save_masks_png(report: NCReport, path: str | Path) -> Path:
    """A PNG with one column per class: the mask (row 1) and the masked pattern m·p (row 2), titled with
    the mask L1 and anomaly index; flagged classes are titled in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..viz import save_figure

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
    return save_figure(fig, path, f"Neural Cleanse: MAD index {report.mad_index:.2f}, flagged {report.flagged or 'none'}")
