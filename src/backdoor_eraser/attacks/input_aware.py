"""Input-aware dynamic backdoor (Nguyen & Tran, NeurIPS 2020): a generator makes a different
trigger for every image, trained jointly with the classifier (spec §4.9)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..classifier import Classifier
from ..data.dataset import ImageDataset
from ..errors import UserError
from ..training import Callback, Task, Trainer, TrainConfig
from .base import Attack, PoisonConfig, PoisonedDataset
from .clean_label import to_unit

EPSILON = 1e-7   # as in the VinAI release, keeps the diversity ratio finite


@dataclass
class InputAwareConfig(PoisonConfig):
    """Per batch, ``rate`` (p_attack) of the samples get their own generated trigger and the target
    label, and the next ``cross_rate`` (p_cross) get another image's trigger with their true label.
    Loss weights ``lambda_div`` and ``lambda_norm``; the mask net is pre-trained for ``mask_epochs``
    (Adam ``mask_lr``, betas (0.5, 0.9), batch ``mask_batch_size``, lr ×0.1 at ``mask_milestones``)
    towards mask density ``mask_density``, in the trainer's precision ``amp``. Networks: ``width``
    channels after the first block, ``depth`` down/up-sampling steps (VinAI: 32/3 for CIFAR, 16/2 for
    MNIST)."""

    target: int = 0
    rate: float = 0.1
    cross_rate: float = 0.1
    lambda_div: float = 1.0
    lambda_norm: float = 100.0
    mask_density: float = 0.032
    mask_epochs: int = 25
    mask_lr: float = 0.01
    generator_lr: float = 0.01
    mask_batch_size: int = 128
    mask_milestones: tuple[int, ...] = (10, 20)
    width: int = 32
    depth: int = 3
    amp: str = "auto"


# -- networks ----------------------------------------------------------------------------------------
def conv_block(cin: int, cout: int, relu: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout, momentum=0.05)]
    return nn.Sequential(*layers, nn.ReLU()) if relu else nn.Sequential(*layers)


class EncoderDecoder(nn.Module):
    """The VinAI generator layout: ``depth`` × (2 conv blocks, max-pool) with doubling widths, a
    middle block, ``depth`` × (bilinear ×2, 2 conv blocks) back down, then tanh/2 + 0.5 ∈ (0, 1)."""

    def __init__(self, in_channels: int, out_channels: int, width: int = 32, depth: int = 3):
        super().__init__()
        layers, c = [], in_channels
        for step in range(depth):
            nxt = width * 2 ** step
            layers += [conv_block(c, nxt), conv_block(nxt, nxt), nn.MaxPool2d(2)]
            c = nxt
        layers.append(conv_block(c, c))
        for step in range(depth):
            nxt = out_channels if step == depth - 1 else c // 2
            layers += [nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                       conv_block(c, c), conv_block(c, nxt, relu=step < depth - 1)]
            c = nxt
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.body(x)) / 2 + 0.5


def squash_mask(z: torch.Tensor) -> torch.Tensor:
    """m = tanh(20·z − 10)/2 + 0.5: near-binary for z ∈ (0, 1) away from 0.5."""
    return torch.tanh(20 * z - 10) / 2 + 0.5


def rms_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample root-mean-square distance over C×H×W."""
    return (a - b).pow(2).flatten(1).mean(1).sqrt()


def diversity_loss(x1: torch.Tensor, x2: torch.Tensor, out1: torch.Tensor, out2: torch.Tensor) -> torch.Tensor:
    """mean(‖x1 − x2‖ / (‖out1 − out2‖ + ε)) with RMS distances: small when different inputs get
    different patterns (or masks)."""
    return (rms_distance(x1, x2) / (rms_distance(out1, out2) + EPSILON)).mean()


class MaskPretraining(Task, Callback):
    """Stage 1 (see :class:`InputAware`) with M's own Adam, and its lr schedule after each epoch: x1 is
    the loop's batch, x2 the same positions of a permutation drawn right after the loop's own (the
    release's two shuffled loaders). train_acc compares mask pixels with labels: it means nothing here."""

    def __init__(self, attack: "InputAware", images: torch.Tensor, adam: torch.optim.Optimizer):
        super().__init__(optimizers=[adam])
        self.attack, self.cfg, self.images, self.adam = attack, attack.config, images, adam
        self.queue = torch.zeros(0, dtype=torch.int64)

    def before_augment(self, x, y, generator):
        if not len(self.queue):  # an epoch's first batch (the last epoch used up the permutation)
            self.queue = torch.randperm(len(self.images), generator=generator)
        self.partners, self.queue = self.images[self.queue[:len(x)]], self.queue[len(x):]
        return x, y

    def forward(self, classifier, inputs):
        self.x2 = classifier.prepare(self.partners)
        self.m1, self.m2 = self.attack.masks(inputs), self.attack.masks(self.x2)
        return self.m1.flatten(1)

    def loss(self, logits, inputs, labels):
        div = diversity_loss(inputs, self.x2, self.m1, self.m2)
        loss = self.cfg.lambda_norm * F.relu(self.m1 - self.cfg.mask_density).mean() + self.cfg.lambda_div * div
        return loss, {"density": self.m1.detach().mean(), "div": div.detach()}

    def on_epoch_end(self, loop, record):
        for group in self.adam.param_groups:  # MultiStepLR's chained products, bit for bit
            group["lr"] *= 0.1 ** self.cfg.mask_milestones.count(loop.epoch)


class InputAwareObjective:
    """Trainer objective for the joint classifier + generator phase (see :class:`InputAware`)."""

    def __init__(self, attack: "InputAware", model: Classifier, num_classes: int):
        self.attack, self.model, self.num_classes = attack, model, num_classes

    def __call__(self, logits, inputs, labels):
        atk, model = self.attack, self.model
        atk.generator.train()
        atk.mask_net.eval()
        x = to_unit(model, inputs)
        n = len(x)
        n_bd, n_cross = atk.batch_counts(n)
        if n_bd + n_cross == 0:
            return F.cross_entropy(logits, labels), {}
        # Cross partners: other images of the same batch (VinAI draws them from a second loader).
        shift = n_bd + n_cross if (n_bd + n_cross) % n else 1
        partner = (torch.arange(n_bd, n_bd + n_cross, device=x.device) + shift) % n
        x1, x2 = x[:n_bd], x[partner]
        patterns = atk.generator(torch.cat([x1, x2]))
        p1, p2 = patterns[:n_bd], patterns[n_bd:]
        with torch.no_grad():
            masks = squash_mask(atk.mask_net(torch.cat([x1, x2])))
        bd = x1 + (p1 - x1) * masks[:n_bd]
        own = x[n_bd:n_bd + n_cross]
        cross = own + (p2 - own) * masks[n_bd:]
        composed = torch.cat([bd, cross, x[n_bd + n_cross:]])
        targets = torch.cat([atk.target_labels(labels[:n_bd], self.num_classes), labels[n_bd:]])
        # One forward over the whole composed batch, so BatchNorm sees the same mix as in the release.
        out = model.net(model.prepare(composed))
        ce = F.cross_entropy(out, targets)
        terms = {"ce": ce.detach()}
        loss = ce
        k = min(n_bd, n_cross)
        if k and atk.config.lambda_div:
            div = diversity_loss(x1[:k], x2[:k], p1[:k], p2[:k])
            loss = loss + atk.config.lambda_div * div
            terms["div"] = div.detach()
        if n_bd:
            terms["bd_acc"] = (out[:n_bd].argmax(1) == targets[:n_bd]).float().mean()
        return loss, terms


class InputAware(Attack):
    """Input-aware dynamic backdoor: x' = x + (G(x) − x)·M(x) with a per-image pattern G(x) and a
    near-binary per-image mask M(x); the "cross" mode (another image's trigger keeps the true
    label) forces the trigger to be image-specific.

    Nguyen & Tran, "Input-aware dynamic backdoor attack" (NeurIPS 2020); spec §4.9, following the
    VinAI release: (1) :meth:`fit_trigger` pre-trains M alone for 25 epochs (Adam lr 0.01,
    betas (0.5, 0.9)) on λ_norm·mean(ReLU(m − 0.032)) + λ_div·L_div(masks), λ_norm = 100,
    λ_div = 1; (2) M is frozen and the trainer optimises the classifier and G together on the
    objective of :meth:`training_objective`: the first p_attack = 0.1 of each batch become backdoor
    samples (target label, all2one or all2all), the next p_cross = 0.1 cross samples (true label),
    loss = CE over the composed batch + λ_div·mean(‖x1 − x2‖/‖G(x1) − G(x2)‖) (RMS distances).
    :meth:`poison` leaves the training set unchanged; all poisoning happens in the objective.

    G has its own Adam (``generator_lr`` 0.01, betas (0.5, 0.9)) stepped by the trainer with the
    classifier's SGD, as in the release. Deviations: G's lr is constant (the release's milestones
    [200, 300, 400, 500] lie beyond CPU-sized runs); cross partners are
    other images of the same (shuffled) batch instead of a second data loader; counts use round()
    (the release truncates); the trainer's augmentation is applied to the clean batch *before* the
    trigger is generated (the release augments after), so triggers are never cropped or flipped;
    the diversity distances are taken in [0, 1] image space (the release uses normalised inputs);
    the composed batch is forwarded once more after the trainer's own clean forward (≈ +1/3
    compute per step). Triggered images are rounded to uint8. The mask-net lr milestones
    (10, 20) follow our reading of the release config; spec §4.9 does not list them.
    """

    name = "input-aware"

    def __init__(self, config: InputAwareConfig):
        if not 0 <= config.cross_rate <= 1 or config.rate + config.cross_rate > 1:
            raise UserError(f"input-aware rate + cross_rate must be within [0, 1], got "
                            f"{config.rate} + {config.cross_rate}")
        if config.width < 1 or config.depth < 1 or config.mask_epochs < 0 or config.mask_batch_size < 1:
            raise UserError("input-aware width, depth and mask_batch_size must be ≥ 1 and mask_epochs ≥ 0")
        super().__init__(config)
        self.generator: EncoderDecoder | None = None
        self.mask_net: EncoderDecoder | None = None
        self._g_optimizer: torch.optim.Optimizer | None = None

    # -- networks ------------------------------------------------------------------------------------
    def build(self, shape: tuple[int, int, int], seed: int = 0, device="cpu") -> None:
        """Fresh G and M for images of ``shape`` (initialisation fixed by ``seed``)."""
        c, h, w = shape
        step = 2 ** self.config.depth
        if h % step or w % step:
            raise UserError(f"input-aware depth {self.config.depth} needs image sides divisible by {step}, "
                            f"got {h}×{w}; use a smaller depth (e.g. 2 for 28×28)")
        self._make_nets(c, seed, device)

    def _make_nets(self, channels: int, seed: int = 0, device="cpu") -> None:
        with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's stream
            torch.manual_seed(seed)
            self.generator = EncoderDecoder(channels, channels, self.config.width, self.config.depth).to(device)
            self._g_optimizer = None
            self.mask_net = EncoderDecoder(channels, 1, self.config.width, self.config.depth).to(device)

    def _require(self):
        if self.generator is None:
            raise UserError("input-aware has no generator yet: run fit_trigger or load the run's saved trigger")

    def masks(self, x: torch.Tensor) -> torch.Tensor:
        """Near-binary masks N×1×H×W in [0, 1] for images x in [0, 1]."""
        return squash_mask(self.mask_net(x))

    def fit_trigger(self, train: ImageDataset, *, seed: int = 0, device="cpu", run_dir: str | Path | None = None,
                    resume: bool = False, quiet: bool = False) -> None:
        """Build G and M, then pre-train M alone (stage 1 of the release) in the trainer, with a
        checkpoint per epoch under ``run_dir``."""
        self._check_target(train.num_classes)
        cfg = self.config
        self.build(train.shape, seed, device)
        # MultiStepLR applies a milestone 0 at once; the trainer's schedule only labels the records.
        adam = torch.optim.Adam(self.mask_net.parameters(), lr=cfg.mask_lr * 0.1 ** cfg.mask_milestones.count(0),
                                betas=(0.5, 0.9))
        train_cfg = TrainConfig(epochs=cfg.mask_epochs, batch_size=cfg.mask_batch_size, lr=cfg.mask_lr, momentum=0.0,
                                nesterov=False, weight_decay=0.0, schedule="multistep", milestones=cfg.mask_milestones,
                                augment="none", seed=seed, amp=cfg.amp)
        task = MaskPretraining(self, train.images, adam)
        Trainer(train_cfg, desc="input-aware masks", quiet=quiet).fit(
            Classifier(self.mask_net, "input-aware-mask", train.classes, input_shape=train.shape), train,
            task=task, callbacks=[task], run_dir=run_dir, resume=resume)
        self.mask_net.eval().requires_grad_(False)

    # -- joint training --------------------------------------------------------------------------------
    def batch_counts(self, batch_size: int) -> tuple[int, int]:
        """(backdoor, cross) sample counts for a batch of ``batch_size``."""
        n_bd = min(batch_size, int(round(self.config.rate * batch_size)))
        n_cross = min(batch_size - n_bd, int(round(self.config.cross_rate * batch_size)))
        return n_bd, n_cross

    def training_objective(self, model: Classifier, num_classes: int):
        self._check_target(num_classes)
        self._require()
        self.generator.to(model.device)
        self.mask_net.to(model.device).eval().requires_grad_(False)
        return InputAwareObjective(self, model, num_classes)

    def training_optimizers(self) -> list:
        """G's own Adam (lr ``generator_lr`` 0.01, betas (0.5, 0.9)), as the release."""
        self._require()
        if self._g_optimizer is None:
            self._g_optimizer = torch.optim.Adam(self.generator.parameters(), lr=self.config.generator_lr,
                                                 betas=(0.5, 0.9))
        return [self._g_optimizer]

    def poison(self, dataset: ImageDataset, seed: int = 0) -> PoisonedDataset:
        """The training set unchanged: poisoning happens inside :meth:`training_objective`."""
        self._check_target(dataset.num_classes)
        return PoisonedDataset(dataset.images.clone(), dataset.labels.clone(), list(dataset.classes),
                               f"{dataset.name}-{self.name}", dataset.index.clone())

    # -- trigger -------------------------------------------------------------------------------------
    @torch.no_grad()
    def apply_trigger(self, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        self._require()
        device = next(self.generator.parameters()).device
        was_training = self.generator.training
        self.generator.eval()
        self.mask_net.eval()
        out = []
        try:
            for i in range(0, len(images), batch_size):
                x = images[i:i + batch_size].to(device).float() / 255
                y = x + (self.generator(x) - x) * self.masks(x)
                out.append((y * 255).round_().clamp_(0, 255).to(torch.uint8).to(images.device))
        finally:
            self.generator.train(was_training)
        return torch.cat(out) if out else images.clone()

    def trigger_state(self) -> dict[str, torch.Tensor]:
        if self.generator is None:
            return {}
        state = {f"G.{k}": v.detach().cpu().clone() for k, v in self.generator.state_dict().items()}
        state.update({f"M.{k}": v.detach().cpu().clone() for k, v in self.mask_net.state_dict().items()})
        return state

    def load_trigger_state(self, state: dict[str, torch.Tensor]) -> None:
        g = {k[2:]: v for k, v in state.items() if k.startswith("G.")}
        m = {k[2:]: v for k, v in state.items() if k.startswith("M.")}
        if not g:
            return
        first = g["body.0.0.weight"]
        channels = first.shape[1]
        if first.shape[0] != self.config.width:
            raise UserError(f"the saved input-aware generator has width {first.shape[0]}, "
                            f"the config {self.config.width}")
        self._make_nets(channels)
        try:
            self.generator.load_state_dict(g)
            self.mask_net.load_state_dict(m)
        except RuntimeError as exc:
            raise UserError(f"the saved input-aware trigger does not fit the config: {exc}") from None
        self.generator.eval()
        self.mask_net.eval().requires_grad_(False)
