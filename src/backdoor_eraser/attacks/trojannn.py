"""TrojanNN-style optimised patch (Liu et al., NDSS 2018): a masked trigger whose pixels are
optimised to excite chosen internal neurons of a given model (spec §4.2 decision (b))."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..classifier import Classifier
from ..data.dataset import ImageDataset
from ..errors import UserError
from ..models.taps import resolve_module
from ..training import Task, Trainer, TrainConfig
from .base import Attack, PoisonConfig

OPTIMIZERS = ("adam", "sign")
BACKGROUNDS = ("data", "zeros")


@dataclass
class TrojanNNConfig(PoisonConfig):
    """``model``: run folder or checkpoint whose neurons the patch excites (required; ``arch`` for a
    bare checkpoint). ``layer``: module name (default: the model's last attention site, e.g. WRN
    ``block3``). ``neurons``: channel indices; empty picks ``num_neurons`` automatically (see
    :class:`TrojanNN`). Mask: a ``size``×``size`` square at the bottom-right, or ``mask_image``
    (an image file resized to the images and thresholded at 0.5). Optimisation: ``steps`` of
    ``optimizer`` ``adam`` or ``sign`` (signed gradient) with ``trigger_lr`` in [0, 1] pixel units, on
    ``trigger_batch_size`` training images (``background`` ``data``) or a black canvas (``zeros``), in the
    trainer's precision ``amp``. Poisoned-label all2one 10 %, target 0."""

    target: int = 0
    rate: float = 0.1
    model: str | None = None
    arch: str | None = None
    layer: str | None = None
    neurons: tuple[int, ...] = ()
    num_neurons: int = 1
    size: int = 5
    mask_image: str | None = None
    steps: int = 500
    optimizer: str = "adam"
    trigger_lr: float = 0.01
    background: str = "data"
    trigger_batch_size: int = 64
    amp: str = "auto"


class LayerOutput:
    """Forward hook keeping the latest output of one module (any shape, graph kept)."""

    def __init__(self, net: nn.Module, name: str):
        self.value: torch.Tensor | None = None
        self._handle = resolve_module(net, name).register_forward_hook(self._keep)

    def _keep(self, module, inputs, output):
        self.value = output[0] if isinstance(output, (tuple, list)) else output

    def remove(self):
        self._handle.remove()


def unit_activation(features: torch.Tensor) -> torch.Tensor:
    """Per-unit activation B×C: the spatial mean of a B×C×H×W map, or the B×C features themselves."""
    return features.flatten(2).mean(2) if features.ndim > 2 else features


def outgoing_weight_strength(net: nn.Module, layer: str, channels: int) -> tuple[torch.Tensor, str] | None:
    """Σ|w| of each of ``layer``'s channels into the next weighted layer, and that layer's name.

    "Next" = the first Conv2d/Linear registered after ``layer`` (outside it) that takes exactly
    ``channels`` inputs; BatchNorm and activations in between are skipped. None when there is none.
    """
    names = [n for n, _ in net.named_modules()]
    after = names[names.index(layer) + 1:]
    for name in after:
        if name.startswith(layer + "."):
            continue
        module = dict(net.named_modules())[name]
        if isinstance(module, nn.Conv2d) and module.in_channels == channels and module.groups == 1:
            return module.weight.detach().abs().sum(dim=(0, 2, 3)), name
        if isinstance(module, nn.Linear) and module.in_features == channels:
            return module.weight.detach().abs().sum(0), name
    return None


def load_mask_image(path: str | Path, h: int, w: int) -> torch.Tensor:
    """bool 1×H×W: the image (as grey levels) resized bilinearly to h×w, ≥ 0.5 counts as mask."""
    from PIL import Image

    p = Path(path)
    if not p.is_file():
        raise UserError(f"trojannn mask_image {str(p)!r} does not exist")
    try:
        grey = Image.open(p).convert("L").resize((w, h), Image.BILINEAR)
    except OSError as exc:
        raise UserError(f"cannot read trojannn mask_image {str(p)!r}: {exc}") from None
    mask = torch.from_numpy(np.asarray(grey, dtype=np.float32) / 255 >= 0.5)[None]
    if not mask.any():
        raise UserError(f"trojannn mask_image {str(p)!r} has no pixel ≥ 0.5 after resizing to {h}×{w}")
    return mask


class TrojanNN(Attack):
    """A model-specific trigger: the pixels inside a mask are optimised so that chosen neurons of a
    given (e.g. clean) model fire strongly; the patch is then pasted (opaque) onto poisoned images.

    Liu, Ma, Aafer, Lee, Zhai, Wang, Zhang, "Trojaning attack on neural networks" (NDSS 2018),
    steps 1–3 (mask, neuron selection, trigger generation); spec §4.2 decision (b).
    Neuron choice when ``neurons`` is empty: the ``num_neurons`` channels of ``layer`` with the
    largest sum of absolute outgoing weights into the next weighted layer (TrojanZoo's reading of
    the paper's "strong connectivity"); if no next layer can be found (e.g. ``layer`` is the
    classifier itself), the channels most active on the training images. The choice, the rule
    used and the mean activation before/after optimisation are recorded in :meth:`describe`.
    Objective: maximise the mean (over images and spatial positions) pre-activation of the chosen
    channels; the patch starts uniform random (seeded by ``fit_trigger``'s seed) and is projected
    back to [0, 1] after every step.

    Deviations: the paper drives the neurons towards a target value and then retrains the
    model's later layers on reverse-engineered inputs (its step 4); here the optimised patch is
    used as an ordinary data-poisoning trigger (poisoned-label all2one 10 %, target 0), and the
    patch is optimised on real training images (``background="data"``) unless ``zeros`` asks for
    the paper's blank canvas. The model's state is not changed.
    """

    name = "trojannn"

    def __init__(self, config: TrojanNNConfig):
        if config.optimizer not in OPTIMIZERS:
            raise UserError(f"trojannn optimizer must be one of {', '.join(OPTIMIZERS)}, got {config.optimizer!r}")
        if config.background not in BACKGROUNDS:
            raise UserError(f"trojannn background must be one of {', '.join(BACKGROUNDS)}, got {config.background!r}")
        if config.size < 1 or config.num_neurons < 1 or config.steps < 0 or config.trigger_batch_size < 1:
            raise UserError("trojannn size, num_neurons and trigger_batch_size must be ≥ 1 and steps ≥ 0")
        super().__init__(config)
        self.mask: torch.Tensor | None = None    # bool 1×H×W
        self.patch: torch.Tensor | None = None   # uint8 C×H×W, zero off the mask
        self.info: dict = {}

    # -- trigger -------------------------------------------------------------------------------------
    def build_mask(self, h: int, w: int) -> torch.Tensor:
        if self.config.mask_image:
            return load_mask_image(self.config.mask_image, h, w)
        s = self.config.size
        if s > h or s > w:
            raise UserError(f"a {s}×{s} trojannn patch does not fit in {h}×{w} images")
        mask = torch.zeros(1, h, w, dtype=torch.bool)
        mask[:, h - s:, w - s:] = True
        return mask

    def apply_trigger(self, images: torch.Tensor) -> torch.Tensor:
        if self.patch is None:
            raise UserError("trojannn has no patch yet: run fit_trigger (it needs the 'model' option) "
                            "or load the run's saved trigger")
        if tuple(images.shape[1:]) != tuple(self.patch.shape):
            raise UserError(f"the trojannn patch is {tuple(self.patch.shape)}, the images {tuple(images.shape[1:])}")
        return torch.where(self.mask.to(images.device), self.patch.to(images.device), images)

    def trigger_state(self) -> dict[str, torch.Tensor]:
        if self.patch is None:
            return {}
        return {"mask": self.mask.to(torch.uint8), "patch": self.patch.clone(),
                "neurons": torch.tensor(self.info.get("neurons", []), dtype=torch.int64)}

    def load_trigger_state(self, state: dict[str, torch.Tensor]) -> None:
        if "patch" in state:
            self.mask = state["mask"].bool()
            self.patch = state["patch"].to(torch.uint8)
            if "neurons" in state:
                self.info["neurons"] = state["neurons"].tolist()

    def describe(self) -> dict:
        return {**super().describe(), **self.info}

    # -- optimisation --------------------------------------------------------------------------------
    def load_source_model(self, device) -> Classifier:
        from ..runs import load_model

        if not self.config.model:
            raise UserError("trojannn needs the 'model' option: a run folder or checkpoint whose neurons "
                            "the trigger is optimised for (e.g. model=runs/clean)")
        path = Path(self.config.model)
        model, _ = load_model(path, arch=None if path.is_dir() else self.config.arch, device=device)
        return model

    def fit_trigger(self, train: ImageDataset, *, seed: int = 0, device="cpu", run_dir: str | Path | None = None,
                    resume: bool = False, quiet: bool = False) -> None:
        """Choose the neurons and optimise the patch inside the mask to excite them: ``steps`` trainer
        epochs of one step on the whole canvas, with a checkpoint after each under ``run_dir``."""
        cfg = self.config
        model = self.load_source_model(device)
        layer = cfg.layer or (model.sites[-1] if model.sites else None)
        if not layer:
            raise UserError(f"{model.arch} has no default attention site: name the module with the 'layer' option")
        c, h, w = train.shape
        mask = self.build_mask(h, w)
        g = torch.Generator().manual_seed(seed)
        if cfg.background == "data":
            pick = torch.randperm(len(train), generator=g)[:cfg.trigger_batch_size]
            canvas = ImageDataset(train.images[pick], train.labels[pick], train.classes)
        else:
            canvas = ImageDataset(torch.zeros(1, c, h, w, dtype=torch.uint8), torch.zeros(1), train.classes)
        m, background = mask.to(model.device), canvas.images.to(model.device).float().div_(255)
        patch = nn.ParameterDict({"patch": nn.Parameter(torch.rand(c, h, w, generator=g).to(model.device))})
        p = patch["patch"]
        model.net.eval().requires_grad_(False)
        tap = LayerOutput(model.net, layer)
        try:
            def activation(p: torch.Tensor) -> torch.Tensor:
                """B×C unit activations of ``layer`` on the canvas with patch ``p`` pasted."""
                model.net(model.prepare(torch.where(m, p, background)))
                return unit_activation(tap.value)

            with torch.no_grad():
                start = activation(p)
            neurons, rule = self.choose_neurons(model.net, layer, start)
            initial = start[:, neurons].mean().item()
            adam = torch.optim.Adam([p], lr=cfg.trigger_lr) if cfg.optimizer == "adam" else None
            if adam is None:
                p.register_hook(torch.sign)  # the loop's SGD on the gradient's sign: signed gradient ascent
            # The loop only counts the steps: every step is the whole canvas, which activation() holds.
            task = Task(lambda act, inputs, labels: (-act[:, neurons].mean(), {}), forward=lambda clf, x: activation(p),
                        after_step=lambda: p.detach().clamp_(0, 1), optimizers=[adam] if adam else [])
            train_cfg = TrainConfig(epochs=cfg.steps, batch_size=len(canvas), lr=cfg.trigger_lr, momentum=0.0, nesterov=False,
                                    weight_decay=0.0, augment="none", shuffle=False, seed=seed, amp=cfg.amp)
            Trainer(train_cfg, desc="trojannn patch", quiet=True).fit(
                Classifier(patch, "trojannn-patch", train.classes, input_shape=train.shape), canvas, task=task,
                run_dir=run_dir, resume=resume)
            self.patch = (p.detach() * 255).round_().to(torch.uint8).cpu() * mask
            with torch.no_grad():
                final = activation(self.patch.to(model.device).float() / 255)[:, neurons].mean().item()
        finally:
            tap.remove()
        self.mask = mask
        self.info = {"layer": layer, "neurons": neurons, "neuron_rule": rule,
                     "activation": {"initial": initial, "final": final}}

    def choose_neurons(self, net: nn.Module, layer: str, activations: torch.Tensor) -> tuple[list[int], str]:
        channels = activations.shape[1]
        if self.config.neurons:
            bad = [n for n in self.config.neurons if not 0 <= n < channels]
            if bad:
                raise UserError(f"trojannn neurons {bad} are outside 0..{channels - 1} for layer {layer!r}")
            return list(self.config.neurons), "given"
        k = min(self.config.num_neurons, channels)
        found = outgoing_weight_strength(net, layer, channels)
        if found is not None:
            strength, nxt = found
            return strength.topk(k).indices.tolist(), f"outgoing-weights:{nxt}"
        return activations.mean(0).topk(k).indices.tolist(), "most-active"
