"""SAGE: self-attention distillation with a dynamic learning rate (Gong et al., IEEE S&P 2023), spec §5.6."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..classifier import Classifier
from ..data.dataset import ImageDataset
from ..errors import UserError
from ..models.taps import FeatureTaps
from ..training import Callback, Task, Trainer, eval_columns
from .attention import ATTENTION_FUNCTIONS, DISTANCES, attention_distance, attention_map, normalize_map
from .base import Defense, PurifyResult, Stage
from .recovery import KD_STAGE, RecoverableConfig, recover

SELECTIONS = ("clean_loss", "last")


@dataclass
class SAGEConfig(RecoverableConfig):
    """Paths ⟨i, j⟩ are pairs of 0-based positions in ``sites`` (``(0, 1)`` or ``"0-1"``); default: adjacent
    sites, (0,1), (1,2) for WRN's three groups. ``beta``: one weight for every path or one per path (300,
    on the MSE scale, as in the only public code). Attention ``mean_p`` with p = 2; the deeper map is
    bilinearly upsampled to the shallower one's size, both L2-normalised (``normalize``), distance MSE
    (``distance='code'``; ``'paper'`` = per-sample L2). ``detach_shallow=False`` as in that code (gradients
    reach the shallow side too); True follows the paper's "deep learns from shallow".
    Optimiser: lr 0.05 (CIFAR-10 value of the public code), constant, halved by the dynamic rule (P = 25,
    ρ = 0.75) on the epoch's clean training CE; 100 epochs, batch 64, SGD momentum 0.9, Nesterov, wd 1e-4,
    crop + flip + Cutout(1, 3) (the family's augmentation). ``select='clean_loss'`` returns the epoch with the lowest clean-subset CE (eval mode).
    """

    epochs: int = 100
    lr: float = 0.05
    schedule: str = "constant"
    paths: tuple[str, ...] | None = None
    beta: tuple[float, ...] = (300.0,)
    p: float = 2.0
    attention: str = "mean_p"
    normalize: bool = True
    distance: str = "code"
    detach_shallow: bool = False
    dynamic_lr: bool = True
    lr_interval: int = 25
    lr_ratio: float = 0.75
    lr_factor: float = 0.5
    select: str = "clean_loss"
    sites: tuple[str, ...] | None = None

    def check(self):
        super().check()
        if self.attention not in ATTENTION_FUNCTIONS:
            raise UserError(f"SAGE attention must be one of {', '.join(ATTENTION_FUNCTIONS)}, got {self.attention!r}")
        if self.distance not in DISTANCES:
            raise UserError(f"SAGE distance must be one of {', '.join(DISTANCES)}, got {self.distance!r}")
        if self.select not in SELECTIONS:
            raise UserError(f"SAGE select must be one of {', '.join(SELECTIONS)}, got {self.select!r}")
        if self.p <= 0 or self.lr_interval < 1 or not 0 < self.lr_factor <= 1:
            raise UserError("SAGE needs p > 0, lr_interval ≥ 1 and 0 < lr_factor ≤ 1")
        if self.paths is not None:
            parse_paths(self.paths, None)


def parse_paths(paths, n_sites: int | None) -> list[tuple[int, int]]:
    """``[(0, 1), "1-2"]`` → [(0, 1), (1, 2)]; None → adjacent pairs of ``n_sites`` sites."""
    if paths is None:
        return [(i, i + 1) for i in range((n_sites or 0) - 1)]
    out = []
    for path in paths:
        try:
            i, j = (int(v) for v in (path.split("-") if isinstance(path, str) else path))
        except (TypeError, ValueError):
            raise UserError(f"bad SAGE path {path!r}: use a pair of site positions such as (0, 1) or '0-1'") from None
        if i == j or min(i, j) < 0 or (n_sites is not None and max(i, j) >= n_sites):
            raise UserError(f"SAGE path {path!r} must join two different sites among positions 0..{(n_sites or 0) - 1}")
        out.append((i, j))
    return out


def sad_maps(shallow: torch.Tensor, deep: torch.Tensor, *, p: float = 2.0, function: str = "mean_p",
             normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """ψ = N(U(G(·))) of SAGE eq. 4 for both activations: attention maps, the smaller one bilinearly
    upsampled to the larger one's size (the deeper to the shallower's), flattened and L2-normalised."""
    a, b = attention_map(shallow, p, function), attention_map(deep, p, function)
    size = tuple(max(x, y) for x, y in zip(a.shape[-2:], b.shape[-2:]))

    def up(m):
        if tuple(m.shape[-2:]) == size:
            return m
        return F.interpolate(m.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)

    a, b = up(a).flatten(1), up(b).flatten(1)
    return (normalize_map(a), normalize_map(b)) if normalize else (a, b)


def sad_loss(shallow: torch.Tensor, deep: torch.Tensor, *, p: float = 2.0, function: str = "mean_p",
             normalize: bool = True, distance: str = "code", detach_shallow: bool = False) -> torch.Tensor:
    """L_SAD(F^i, F^j) = d(ψ(F^i), ψ(F^j)); ``detach_shallow`` makes the shallow map a fixed target."""
    if detach_shallow:
        shallow = shallow.detach()
    a, b = sad_maps(shallow, deep, p=p, function=function, normalize=normalize)
    return attention_distance(b, a, distance)


class SelfAttentionDistillation:
    """CE + Σ_k β_k·L_SAD(site i_k, site j_k) within one model (SAGE eq. 5)."""

    def __init__(self, model: Classifier, *, paths=None, beta=(300.0,), p=2.0, function="mean_p", normalize=True,
                 distance="code", detach_shallow=False, sites=None):
        self.sites = list(sites or model.sites)
        self.paths = parse_paths(paths, len(self.sites))
        if not self.paths:
            raise UserError(f"SAGE needs at least two attention sites, got {self.sites}")
        beta = [float(b) for b in beta]
        if len(beta) == 1:
            beta = beta * len(self.paths)
        if len(beta) != len(self.paths):
            raise UserError(f"beta has {len(beta)} weights but there are {len(self.paths)} paths {self.paths}")
        self.beta = beta
        self.kwargs = dict(p=p, function=function, normalize=normalize, distance=distance,
                           detach_shallow=detach_shallow)
        self.taps = FeatureTaps(model.net, self.sites)

    def distances(self, acts: list[torch.Tensor]) -> list[torch.Tensor]:
        """L_SAD of each path, from the activations of the sites."""
        return [sad_loss(acts[i], acts[j], **self.kwargs) for i, j in self.paths]

    def __call__(self, logits, inputs, labels):
        ce = F.cross_entropy(logits, labels)
        loss, terms = ce, {"ce": ce.detach()}
        for (i, j), beta, d in zip(self.paths, self.beta, self.distances(self.taps.outputs())):
            terms[f"sad{i + 1}{j + 1}"] = d.detach()
            loss = loss + beta * d
        return loss, terms

    def remove(self):
        self.taps.remove()


class DynamicLR(Callback):
    """SAGE's learning-rate rule (eq. 6): after every ``interval`` (P) epochs, multiply the lr by ``factor``
    if either holds:

    * C1: the clean loss decreased (L^{k+1} < L^k) in fewer than ρ·P of the interval's epochs;
    * C2: the lr was not changed at the previous check and the interval's maximum loss is ≥ the previous
      interval's maximum.

    :meth:`step` takes one epoch's clean loss and says whether the lr was just reduced. In the first interval
    there is no loss before epoch 1, so C1 counts the P − 1 available transitions against ρ·(P − 1); C2
    needs a previous interval. As a callback it reads the epoch record's ``key`` ("ce", else "loss") and
    scales every param group's ``lr_scale``; its losses and reductions are saved with the checkpoint.
    """

    def __init__(self, interval: int = 25, ratio: float = 0.75, factor: float = 0.5, key: str = "ce"):
        if interval < 1:
            raise UserError(f"dynamic lr interval must be ≥ 1, got {interval}")
        self.interval, self.ratio, self.factor, self.key = interval, ratio, factor, key
        self.losses: list[float] = []
        self.reduced_at: list[int] = []   # 1-based epochs after which the lr was reduced
        self.scale = 1.0

    def step(self, loss: float) -> bool:
        self.losses.append(float(loss))
        n, P = len(self.losses), self.interval
        if n % P:
            return False
        window = self.losses[max(n - P - 1, 0):]
        decreases = sum(b < a for a, b in zip(window, window[1:]))
        c1 = decreases < self.ratio * (len(window) - 1)
        c2 = (n >= 2 * P and (n - P) not in self.reduced_at
              and max(self.losses[n - P:]) >= max(self.losses[n - 2 * P:n - P]))
        if c1 or c2:
            self.scale *= self.factor
            self.reduced_at.append(n)
        return c1 or c2

    def on_epoch_end(self, loop, record: dict) -> None:
        if self.step(record.get(self.key, record["loss"])):
            for group in loop.optimizer.param_groups:
                group["lr_scale"] = group.get("lr_scale", 1.0) * self.factor
        record["lr_scale"] = self.scale   # the multiplier of the next epoch

    def state_dict(self) -> dict:
        return {"losses": list(self.losses), "reduced_at": list(self.reduced_at), "scale": self.scale}

    def load_state_dict(self, state: dict) -> None:
        self.losses, self.reduced_at = list(state["losses"]), list(state["reduced_at"])
        self.scale = float(state["scale"])


@torch.no_grad()
def clean_loss(model: Classifier, data: ImageDataset, batch_size: int = 500) -> float:
    """Mean cross-entropy on ``data`` in eval mode, without augmentation."""
    was_training = model.net.training
    model.net.eval()
    total = 0.0
    for i in range(0, len(data), batch_size):
        y = data.labels[i:i + batch_size].to(model.device)
        total += F.cross_entropy(model(data.images[i:i + batch_size]), y, reduction="sum").item()
    model.net.train(was_training)
    return total / len(data)


class BestCleanLoss(Callback):
    """Records ``clean_ce`` (eval-mode CE on the clean subset) each epoch and keeps the weights of the epoch
    with the lowest one; they are saved with the loop's checkpoint (atomically), so a resumed run still
    knows them."""

    def __init__(self, model: Classifier, data: ImageDataset):
        self.model, self.data = model, data
        self.best, self.epoch, self.state = float("inf"), 0, None

    def on_epoch_end(self, loop, record: dict) -> None:
        record["clean_ce"] = loss = clean_loss(self.model, self.data)
        if loss < self.best:
            self.best, self.epoch = loss, int(record["epoch"])
            self.state = {k: v.detach().clone() for k, v in self.model.net.state_dict().items()}

    def state_dict(self) -> dict:
        return {"loss": self.best, "epoch": self.epoch, "model": self.state}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.epoch, self.state = float(state["loss"]), int(state["epoch"]), state["model"]


class SAGE(Defense):
    """SAGE: the backdoored model distils its own shallow-layer attention into its deeper layers, with a
    dynamic learning rate; no teacher.

    Gong, Chen, Dong, Kang, Fu, Wang, "Redeem Myself: Purifying Backdoors in Deep Learning Models using
    Self Attention Distillation", IEEE S&P 2023; spec §5.6. There is no official code; the public AIcert
    version differs as follows: it never calls its dynamic-lr rule (here it runs); it keeps the checkpoint
    with the lowest *test ASR* (test-set leakage; here: lowest clean-subset CE, never the test set); it
    resizes trilinearly over (C, H, W), which for one-channel maps equals our bilinear upsampling.
    The initial (backdoored) model is not a selection candidate.
    """

    name = "sage"
    stages = (Stage("sage", "epochs"), KD_STAGE)
    # ``paper``: the dynamic lr rule (P = 25, ρ = 0.75, halving) with the public code's lr and epochs.
    # ``release`` (the only public code, AIcert): the rule exists there but is never called, and its
    # best-by-test-ASR checkpoint is test leakage, so the last epoch stands in for it (spec §5.6).
    presets = {
        "paper": dict(epochs=100, batch_size=64, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4,
                      schedule="constant", dynamic_lr=True, lr_interval=25, lr_ratio=0.75, lr_factor=0.5,
                      beta=(300.0,), select="clean_loss"),
        "release": dict(epochs=100, batch_size=64, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4,
                        schedule="constant", dynamic_lr=False, beta=(300.0,), detach_shallow=False, select="last"),
    }

    def __init__(self, config: SAGEConfig):
        config.check()
        super().__init__(config)

    def check_model(self, model):
        cfg = self.config
        SelfAttentionDistillation(model, paths=cfg.paths, beta=cfg.beta, sites=cfg.sites).remove()

    def purify(self, model, clean, *, run_dir=None, resume=False, eval_fn=None, quiet=False) -> PurifyResult:
        run_dir = Path(run_dir) if run_dir else None
        cfg, probe = self.fitted_config(model, clean, run_dir, quiet)
        student = model.copy()
        objective = SelfAttentionDistillation(student, paths=cfg.paths, beta=cfg.beta, p=cfg.p,
                                              function=cfg.attention, normalize=cfg.normalize, distance=cfg.distance,
                                              detach_shallow=cfg.detach_shallow, sites=cfg.sites)
        selector = BestCleanLoss(student, clean)
        rule = DynamicLR(cfg.lr_interval, cfg.lr_ratio, cfg.lr_factor) if cfg.dynamic_lr else None
        callbacks = [selector] + ([rule] if rule else []) + eval_columns(eval_fn)
        try:
            res = Trainer(cfg.train_config(), desc="sage", quiet=quiet).fit(
                student, clean, task=Task(objective), callbacks=callbacks, run_dir=run_dir, resume=resume)
        finally:
            objective.remove()
        info = {"paths": [list(p) for p in objective.paths], "beta": objective.beta, "attention": cfg.attention,
                "p": cfg.p, "normalize": cfg.normalize, "distance": cfg.distance,
                "detach_shallow": cfg.detach_shallow, "sites": objective.sites, "select": cfg.select,
                "lr_reduced_after_epochs": rule.reduced_at if rule else [], "epochs": res.epochs,
                "steps": res.steps, "seconds": res.seconds, "total_epochs": res.epochs, "total_steps": res.steps,
                "lr_probe": probe}
        if cfg.select == "clean_loss" and selector.state is not None:
            student.net.load_state_dict(selector.state)
            info.update(selected_epoch=selector.epoch, selected_clean_ce=selector.best)
        else:
            info.update(selected_epoch=res.epochs)
        return recover(model, PurifyResult(student, res.history, info), clean, cfg, run_dir=run_dir, resume=resume,
                       quiet=quiet)
