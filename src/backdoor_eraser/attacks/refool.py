"""Refool (Liu, Ma, Bailey, Lu, ECCV 2020): clean-label reflection backdoor (spec §4.6)."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data.dataset import ImageDataset
from ..errors import UserError
from .base import Attack, PoisonConfig, PoisonedDataset

GAMMA = 2.2
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
MAX_BLUR_RADIUS = 10        # ceil(2σ) for σ ≤ 5: kernels of at most 21 taps
MASK_NSIG = 3               # the spatial weight mask spans ±3σ of a Gaussian over the image
CHUNK = 512                 # images per vectorised step, to bound float64 temporaries
# Streams of per-image randomness: poisoning draws from (POISON, seed, index); test-time triggers
# from (TEST, content hash), so an image gets the same reflection however it is batched.
POISON_STREAM, TEST_STREAM = 1, 2


@dataclass
class RefoolConfig(PoisonConfig):
    """Clean-label on ``rate`` = 20 % of the target class. Reflections come from ``reflection_dir``
    (image files, resized to the image size), else from the training images whose original indices
    are ``reflection_indices`` (default: index 2 alone, the one reflection the ARGD code blends into
    every poisoned image), else, with ``reflection_indices`` None, from ``pool_size`` non-target
    training images drawn with the run seed (a random reflection per image: the paper's variety
    without its selection). ``ghost_prob`` picks the ghost-effect model, else the out-of-focus one.
    ``select_rounds`` > 0 runs the paper's adversarial selection on the pool first
    (attacks/refool_selection.py): per round a ``select_arch`` proxy trained ``select_epochs`` on a
    poisoned set, tested on ``select_val`` held-out non-target training images; reflections are then
    drawn with the weights it leaves. It repeats on a resumed attack (same seed, same weights)."""

    target: int = 0
    rate: float = 0.2
    label_mode: str = "clean"
    reflection_dir: str | None = None
    reflection_indices: tuple[int, ...] | None = (2,)
    pool_size: int = 200
    ghost_prob: float = 0.39
    # Off at 0, and then, with its settings, no part of a grid cell's identity (registry.identity_dict).
    select_rounds: int = field(default=0, metadata={"neutral": 0})
    select_epochs: int = field(default=10, metadata={"with": "select_rounds"})
    select_val: int = field(default=1000, metadata={"with": "select_rounds"})
    select_arch: str = field(default="wrn-16-1", metadata={"with": "select_rounds"})


@dataclass
class BlendParams:
    """Per-image random choices of the reflection model (one entry per image)."""

    reflection: torch.Tensor   # int64, index into the pool
    ghost: torch.Tensor        # bool, ghost model (else blur)
    alpha_t: torch.Tensor      # transmission weight 1 − U(0.05, 0.45)
    dy: torch.Tensor           # ghost shift, rows, in [3, 8]
    dx: torch.Tensor           # ghost shift, cols, in [3, 8]
    ghost_w: torch.Tensor      # g = |s − U(0.15, 0.5)|, s ∈ {0, 1}
    sigma: torch.Tensor        # blur σ ~ U(1, 5)
    att: torch.Tensor          # overflow attenuation U(1.08, 1.18)

    def take(self, idx: torch.Tensor) -> "BlendParams":
        return BlendParams(*(getattr(self, f.name)[idx] for f in fields(self)))


def draw_params(keys: list[tuple[int, ...]], pool_len: int, ghost_prob: float,
                weights: torch.Tensor | None = None) -> BlendParams:
    """One independent numpy stream per image, seeded by its key, so choices never depend on batching.
    The reflection is uniform over the pool, or drawn with probability ∝ ``weights``."""
    # numpy seeds must be non-negative; a negative run seed maps to its 64-bit two's complement.
    u = torch.from_numpy(np.stack([np.random.default_rng([v % (1 << 64) for v in k]).random(9) for k in keys]))
    s = (u[:, 5] > 0.5).double()
    if weights is None:
        reflection = (u[:, 2] * pool_len).long()
    else:
        cdf = torch.cumsum(weights.double(), 0)
        reflection = torch.searchsorted(cdf / cdf[-1], u[:, 2].contiguous(), right=True)
    return BlendParams(
        reflection=reflection.clamp_(max=pool_len - 1),
        ghost=u[:, 0] < ghost_prob,
        alpha_t=1 - (0.05 + 0.40 * u[:, 1]),
        dy=3 + (u[:, 3] * 6).long().clamp_(max=5),
        dx=3 + (u[:, 4] * 6).long().clamp_(max=5),
        ghost_w=(s - (0.15 + 0.35 * u[:, 6])).abs(),
        sigma=1 + 4 * u[:, 7],
        att=1.08 + 0.10 * u[:, 8],
    )


def ghost_reflection(r: torch.Tensor, dy: int, dx: int, g: torch.Tensor) -> torch.Tensor:
    """Double reflection: g·r plus (1 − g)·(r shifted by (dy, dx)), cropped to where both copies
    overlap and resized back (bilinear, half-pixel centres) to the image size."""
    n, c, h, w = r.shape
    first = F.pad(r, (0, dx, 0, dy))
    second = F.pad(r, (dx, 0, dy, 0))
    g = g.view(-1, 1, 1, 1)
    both = g * first + (1 - g) * second
    return F.interpolate(both[..., dy:h, dx:w], size=(h, w), mode="bilinear", align_corners=False)


def gaussian_blur(r: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with one σ per image (taps 2·ceil(2σ)+1, reflect-101 borders)."""
    n, c, h, w = r.shape
    radius = min(MAX_BLUR_RADIUS, h - 1, w - 1)
    offsets = torch.arange(-radius, radius + 1, dtype=r.dtype, device=r.device)
    sig = sigma.to(r).view(-1, 1)
    taps = torch.exp(-offsets.pow(2) / (2 * sig.pow(2)))
    # Each image keeps only its own 2·ceil(2σ)+1 taps; zeros beyond pad all kernels to one size.
    taps = taps * (offsets.abs() <= torch.ceil(2 * sig).clamp(max=radius))
    taps = (taps / taps.sum(1, keepdim=True)).repeat_interleave(c, 0)   # (N·C)×K
    x = r.reshape(1, n * c, h, w)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), taps[:, None, None, :], groups=n * c)
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), taps[:, None, :, None], groups=n * c)
    return x.view(n, c, h, w)


def spatial_mask(h: int, w: int, dtype=torch.float64, device="cpu") -> torch.Tensor:
    """H×W weight peaking at 1 in the centre: the square root of the outer product of two
    Gaussian bin masses over ±3σ (the image spans the whole kernel, as for 32-px CIFAR)."""

    def bins(length: int) -> torch.Tensor:
        step = (2 * MASK_NSIG + 1) / length
        edges = torch.linspace(-MASK_NSIG - step / 2, MASK_NSIG + step / 2, length + 1, dtype=dtype)
        return torch.special.ndtr(edges).diff()

    mask = torch.outer(bins(h), bins(w)).sqrt()
    return (mask / mask.max()).to(device)


def blur_blend(t: torch.Tensor, r: torch.Tensor, p: BlendParams) -> torch.Tensor:
    """Out-of-focus model on gamma-linear t, r: blurred reflection, overflow pulled back, weighted
    by the spatial mask × (1 − α_t/2), added to α_t·t."""
    n, c, h, w = t.shape
    r_blur = gaussian_blur(r, p.sigma)
    total = r_blur + t
    over = total > 1
    # Mean of the overflowing pixels per image and channel (at least 1, so no overflow → no change).
    mean = ((total * over).sum((2, 3)) / (over.sum((2, 3)) + 1e-6)).clamp(min=1)
    r_blur = (r_blur - ((mean - 1) * p.att.to(t).view(-1, 1))[..., None, None]).clamp(0, 1)
    alpha = p.alpha_t.to(t).view(-1, 1, 1, 1)
    weight = spatial_mask(h, w, t.dtype, t.device) * (1 - alpha / 2)
    return r_blur * weight + alpha * t


def ghost_blend(t: torch.Tensor, r: torch.Tensor, p: BlendParams) -> torch.Tensor:
    """Ghost model on gamma-linear t, r: α_t·t + (1 − α_t)·ghost(r), shifts grouped so each
    distinct (dy, dx) is one batched call."""
    r_g = torch.empty_like(r)
    shifts = torch.stack((p.dy, p.dx), 1)
    for dy, dx in torch.unique(shifts, dim=0).tolist():
        sel = torch.nonzero((shifts[:, 0] == dy) & (shifts[:, 1] == dx)).flatten()
        r_g[sel.to(r.device)] = ghost_reflection(r[sel.to(r.device)], dy, dx, p.ghost_w[sel].to(r))
    alpha = p.alpha_t.to(t).view(-1, 1, 1, 1)
    return alpha * t + (1 - alpha) * r_g


def reflect(images: torch.Tensor, reflections: torch.Tensor, p: BlendParams) -> torch.Tensor:
    """Blend reflection ``reflections[i]`` into ``images[i]`` (uint8 N×C×H×W) with the spec §4.6 models."""
    t = (images.double() / 255).pow(GAMMA)
    r = (reflections.to(images.device).double() / 255).pow(GAMMA)
    out = torch.empty_like(t)
    ghost = p.ghost.to(images.device)
    for branch, sel in ((ghost_blend, ghost), (blur_blend, ~ghost)):
        idx = torch.nonzero(sel).flatten()
        if len(idx):
            out[idx] = branch(t[idx], r[idx], p.take(idx.cpu()))
    # Truncation, like the release's np.uint8(blended·255).
    return (out.pow(1 / GAMMA).clamp(0, 1) * 255).to(torch.uint8)


def content_keys(images: torch.Tensor) -> list[int]:
    """A stable 63-bit key per image from its pixels."""
    arr = images.cpu().contiguous().numpy()
    return [int.from_bytes(hashlib.blake2b(a.tobytes(), digest_size=8).digest(), "little") >> 1 for a in arr]


def load_reflection_dir(path: str | Path, c: int, h: int, w: int) -> torch.Tensor:
    """Every image file under ``path``, subfolders included (sorted by relative path, so an unpacked
    data set works as it is), as uint8 N×C×H×W, resized (bilinear) to h×w."""
    from PIL import Image

    folder = Path(path)
    if not folder.is_dir():
        raise UserError(f"refool reflection folder {str(folder)!r} does not exist")
    files = sorted((f for f in folder.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()),
                   key=lambda f: f.relative_to(folder).as_posix())
    if not files:
        raise UserError(f"refool reflection folder {str(folder)!r} holds no images")
    arrays = []
    for f in files:
        try:
            img = Image.open(f).convert("RGB" if c == 3 else "L").resize((w, h), Image.BILINEAR)
        except OSError as exc:
            raise UserError(f"cannot read reflection image {str(f)!r}: {exc}") from None
        a = np.asarray(img, dtype=np.uint8)
        arrays.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
    return torch.from_numpy(np.stack(arrays).copy())


class Refool(Attack):
    """Refool: reflections blended into target-class images, labels kept.

    Liu, Ma, Bailey, Lu, "Reflection backdoor: a natural backdoor attack on deep neural networks"
    (ECCV 2020); spec §4.6, with the blending models of the Refool/ARGD code: ghost effect with
    probability 0.39, else out-of-focus blur, α_t = 1 − U(0.05, 0.45), gamma 2.2. Each poisoned image
    draws its reflection and blend parameters from a stream seeded by (run seed, original index);
    each test image from one seeded by a hash of its pixels.
    The default is the ARGD code's single training image (index 2) for every poisoned and test image;
    a random pool of non-target training images (``reflection_indices=None``) or a user folder (the
    paper used PascalVOC) are options, and on such a pool the paper's adversarial selection
    (``select_rounds``, attacks/refool_selection.py) weighs the reflections by how well they work. With a random pool of 200 the attack
    failed on the 20-epoch zoo (2 % ASR, zoo/fragile/refool): one fixed reflection is a learnable
    trigger, a different one per image much less so. The same-depth
    "clear" model of the paper is not drawn, as in the code; the spatial mask assumes the image spans
    the whole ±3σ kernel (the code's offset is 0 when the image is as large as the kernel).
    """

    name = "refool"

    def __init__(self, config: RefoolConfig):
        if config.pool_size < 1:
            raise UserError(f"refool pool_size must be ≥ 1, got {config.pool_size}")
        if config.reflection_indices is not None and not config.reflection_indices:
            raise UserError("refool reflection_indices must name at least one training image (or be none)")
        if not 0 <= config.ghost_prob <= 1:
            raise UserError(f"refool ghost_prob must be in [0, 1], got {config.ghost_prob}")
        if config.select_rounds < 0 or config.select_epochs < 1 or config.select_val < 1:
            raise UserError("refool needs select_rounds ≥ 0, select_epochs ≥ 1 and select_val ≥ 1")
        super().__init__(config)
        self._pool: torch.Tensor | None = None
        self._pool_index: torch.Tensor | None = None
        self.weights: torch.Tensor | None = None   # the selection's, one per reflection; None: uniform

    # -- the reflection pool ----------------------------------------------------------------
    def fit_trigger(self, train: ImageDataset, *, seed: int = 0, device="cpu", quiet: bool = False) -> None:
        """Read the reflection folder, or draw the pool from the training set's non-target classes; then,
        with ``select_rounds``, weigh the pool by the adversarial selection."""
        self._check_target(train.num_classes)
        self._fill_pool(train, seed)
        self.weights = None
        if self.config.select_rounds:
            from .refool_selection import select_reflections

            self.weights = select_reflections(self, train, seed=seed, device=device, quiet=quiet)

    def _fill_pool(self, train: ImageDataset, seed: int) -> None:
        if self.config.reflection_dir:
            self._pool = load_reflection_dir(self.config.reflection_dir, *train.shape)
            return
        if self.config.reflection_indices is not None:
            pos = []
            for i in self.config.reflection_indices:
                hit = torch.nonzero(train.index == int(i)).flatten()
                if not len(hit):
                    raise UserError(f"refool reflection index {i} is not in the training set "
                                    f"({len(train)} images, original indices {int(train.index.min())}–"
                                    f"{int(train.index.max())})")
                pos.append(int(hit[0]))
            self._pool = train.images[pos].clone()
            self._pool_index = train.index[pos].clone()
            return
        others = torch.nonzero(train.labels != self.config.target).flatten()
        if not len(others):
            raise UserError("refool needs non-target training images to draw reflections from")
        g = torch.Generator().manual_seed(seed)
        pos = torch.sort(others[torch.randperm(len(others), generator=g)[:self.config.pool_size]]).values
        self._pool = train.images[pos].clone()
        self._pool_index = train.index[pos].clone()

    def pool(self, shape: tuple[int, int, int]) -> torch.Tensor:
        """The reflection images, uint8 P×C×H×W, for images of ``shape``."""
        if self._pool is None and self.config.reflection_dir:
            self._pool = load_reflection_dir(self.config.reflection_dir, *shape)
        if self._pool is None:
            raise UserError("refool has no reflection pool: call fit_trigger on the training set, "
                            "load the run's trigger state or set reflection_dir")
        if tuple(self._pool.shape[1:]) != tuple(shape):
            raise UserError(f"refool reflections are {tuple(self._pool.shape[1:])}, the images {tuple(shape)}")
        return self._pool

    def trigger_state(self) -> dict[str, torch.Tensor]:
        state = {}
        if self._pool is not None:
            state["pool"] = self._pool.clone()
        if self._pool_index is not None:
            state["pool_index"] = self._pool_index.clone()
        if self.weights is not None:
            state["weights"] = self.weights.clone()
        return state

    def load_trigger_state(self, state: dict[str, torch.Tensor]) -> None:
        if "pool" in state:
            self._pool = state["pool"].to(torch.uint8)
        if "pool_index" in state:
            self._pool_index = state["pool_index"].to(torch.int64)
        if "weights" in state:
            self.weights = state["weights"].to(torch.float64)

    def describe(self) -> dict:
        desc = super().describe()
        if self.config.reflection_dir:
            desc["reflection_source"] = {"folder": str(Path(self.config.reflection_dir).resolve())}
        elif self._pool_index is not None:
            desc["reflection_source"] = {"train_indices": self._pool_index.tolist()}
        return desc

    # -- trigger and poisoning --------------------------------------------------------------
    def add_reflections(self, images: torch.Tensor, keys: list[tuple[int, ...]], with_choice: bool = False):
        """Reflect image i with the parameters drawn from stream ``keys[i]``; with ``with_choice`` also
        the index of each image's reflection in the pool."""
        pool = self.pool(tuple(images.shape[1:]))
        if min(images.shape[-2:]) <= 8:
            raise UserError("refool's ghost shift of up to 8 px needs images larger than 8×8")
        out, chosen = [], []
        for i in range(0, len(images), CHUNK):
            p = draw_params(keys[i:i + CHUNK], len(pool), self.config.ghost_prob, self.weights)
            out.append(reflect(images[i:i + CHUNK], pool[p.reflection], p))
            chosen.append(p.reflection)
        out = torch.cat(out) if out else images.clone()
        return (out, torch.cat(chosen) if chosen else torch.zeros(0, dtype=torch.int64)) if with_choice else out

    def apply_trigger(self, images: torch.Tensor) -> torch.Tensor:
        return self.add_reflections(images, [(TEST_STREAM, k) for k in content_keys(images)])

    def poison(self, dataset: ImageDataset, seed: int = 0, stream: tuple[int, ...] | None = None) -> PoisonedDataset:
        """Reflect the selected images, each with its own stream seeded by (seed, original index), after
        ``stream`` where given (the selection's rounds draw their own)."""
        self._check_target(dataset.num_classes)
        if self._pool is None and not self.config.reflection_dir:
            self.fit_trigger(dataset, seed=seed, quiet=True)
        pos = self.select_poison(dataset, seed)
        keys = [(*(stream or (POISON_STREAM,)), seed, int(i)) for i in dataset.index[pos]]
        return self._poison_at(dataset, pos, lambda images: self.add_reflections(images, keys))
