"""Square patch triggers for the SAGE-paper studies: size/opacity sweeps, multi-trigger and
class-specific attacks (spec §4.10, §6.3)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..data.dataset import ImageDataset
from ..errors import UserError
from .badnets import GRID
from .base import Attack, PoisonConfig, PoisonedDataset, TriggeredTestSet

NAMED_POSITIONS = ("bottom-right", "top-left", "centre")
PATTERNS = ("grid", "white", "random")


# -- shared geometry and stamping ------------------------------------------------------------
def check_position(position: str) -> None:
    if position in NAMED_POSITIONS:
        return
    try:
        x, y = (int(v) for v in position.split(","))
    except ValueError:
        raise UserError(f"patch position must be one of {', '.join(NAMED_POSITIONS)} or 'x,y', "
                        f"got {position!r}") from None
    if x < 0 or y < 0:
        raise UserError(f"patch position {position!r} must have non-negative coordinates")


def patch_origin(position: str, size: int, h: int, w: int) -> tuple[int, int]:
    """(row, col) of the patch's top-left pixel; 'x,y' gives the column and row of that pixel."""
    if size > h or size > w:
        raise UserError(f"a {size}×{size} patch does not fit in {h}×{w} images")
    if position == "bottom-right":
        return h - size, w - size
    if position == "top-left":
        return 0, 0
    if position == "centre":
        return (h - size) // 2, (w - size) // 2
    x, y = (int(v) for v in position.split(","))
    if y + size > h or x + size > w:
        raise UserError(f"a {size}×{size} patch at x,y = {x},{y} runs off {h}×{w} images")
    return y, x


def patch_pattern(pattern: str, size: int, channels: int, seed: int) -> torch.Tensor:
    """uint8 C×size×size pattern. ``grid`` tiles the 3×3 BadNets grid from the patch's top-left,
    so size 3 at the bottom-right is exactly BadNets; ``random`` is seeded uniform {0..255} per channel."""
    if pattern == "grid":
        reps = -(-size // 3)
        return GRID.repeat(reps, reps)[:size, :size].expand(channels, size, size).clone()
    if pattern == "white":
        return torch.full((channels, size, size), 255, dtype=torch.uint8)
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (channels, size, size), generator=g, dtype=torch.int64).to(torch.uint8)


def stamp(images: torch.Tensor, pattern: torch.Tensor, row: int, col: int, opacity: float) -> torch.Tensor:
    """x' = round((1 − o)·x + o·p) inside the patch, x elsewhere (float64, so results are exact)."""
    out = images.clone()
    s = pattern.shape[-1]
    region = images[..., row:row + s, col:col + s]
    if opacity >= 1:
        out[..., row:row + s, col:col + s] = pattern.to(images.device)
    elif opacity > 0:
        mixed = (1 - opacity) * region.double() + opacity * pattern.to(images.device).double()
        out[..., row:row + s, col:col + s] = mixed.round_().clamp_(0, 255).to(torch.uint8)
    return out


def check_patch_fields(size: int, pattern: str, opacity: float) -> None:
    if size < 1:
        raise UserError(f"patch size must be ≥ 1, got {size}")
    if pattern not in PATTERNS:
        raise UserError(f"patch pattern must be one of {', '.join(PATTERNS)}, got {pattern!r}")
    if not 0 <= opacity <= 1:
        raise UserError(f"patch opacity must be in [0, 1], got {opacity}")


# -- single patch (optionally class-specific) ------------------------------------------------
@dataclass
class PatchConfig(PoisonConfig):
    """``size``×``size`` patch (the SAGE study sweeps 3..20) at ``position`` (bottom-right, top-left,
    centre or 'x,y' = column,row of its top-left pixel) with ``pattern`` grid/white/random
    (``pattern_seed``), blended with ``opacity`` (1 = opaque; SAGE's "transparency 0.5" is 0.5).
    ``source`` makes the attack class-specific: only that class is poisoned (``rate`` is then the
    share of the class) and only its test images are triggered."""

    target: int = 0
    rate: float = 0.1
    size: int = 3
    position: str = "bottom-right"
    pattern: str = "grid"
    opacity: float = 1.0
    pattern_seed: int = 0
    source: int | None = None


class Patch(Attack):
    """A square patch trigger with adjustable size, place, pattern and opacity.

    The trigger family of the SAGE paper's studies (Gong et al., "Redeem Myself", IEEE S&P 2023;
    spec §4.10, §6.3): large TrojanNN-style squares (3×3 to 20×20 on 32-px images, 10 %, opacity
    0.5) and the class-specific attack. Poisoned-label all-to-one 10 %, target 0 by default.
    Deviations: the TrojanNN square is optimised against a model in the original; here the pattern
    is fixed (BadNets grid, white or seeded random), as no trigger files are published.
    """

    name = "patch"

    def __init__(self, config: PatchConfig):
        check_patch_fields(config.size, config.pattern, config.opacity)
        check_position(config.position)
        if config.source is not None:
            if config.label_mode == "clean":
                raise UserError("a class-specific patch attack relabels its source class; it cannot be clean-label")
            if config.mode == "all2one" and config.source == config.target:
                raise UserError(f"the source class {config.source} is the target class")
        super().__init__(config)

    def pattern(self, channels: int) -> torch.Tensor:
        cfg = self.config
        return patch_pattern(cfg.pattern, cfg.size, channels, cfg.pattern_seed)

    def apply_trigger(self, images: torch.Tensor) -> torch.Tensor:
        _, c, h, w = images.shape
        row, col = patch_origin(self.config.position, self.config.size, h, w)
        return stamp(images, self.pattern(c), row, col, self.config.opacity)

    def _check_source(self, num_classes: int) -> None:
        src = self.config.source
        if src is not None and not 0 <= src < num_classes:
            raise UserError(f"source class {src} is outside 0..{num_classes - 1}")

    def select_poison(self, dataset: ImageDataset, seed: int) -> torch.Tensor:
        if self.config.source is None:
            return super().select_poison(dataset, seed)
        self._check_source(dataset.num_classes)
        g = torch.Generator().manual_seed(seed)
        pool = torch.nonzero(dataset.labels == self.config.source).flatten()
        count = int(round(self.config.rate * len(pool)))
        return torch.sort(pool[torch.randperm(len(pool), generator=g)[:count]]).values

    def triggered_test_set(self, test: ImageDataset) -> TriggeredTestSet:
        if self.config.source is None:
            return super().triggered_test_set(test)
        self._check_target(test.num_classes)
        self._check_source(test.num_classes)
        # Only the source class carries the backdoor, so ASR is measured on it alone.
        keep = torch.nonzero(test.labels == self.config.source).flatten()
        targets = self.target_labels(test.labels[keep], test.num_classes)
        return TriggeredTestSet(self(test.images[keep]), targets, test.labels[keep], test.index[keep])

    def spillover_test_set(self, test: ImageDataset) -> TriggeredTestSet | None:
        """For a class-specific attack: triggered test images of the *other* classes (neither source nor
        target), labelled with the target. A class-specific backdoor should leave them alone; the share
        sent to the target anyway is ``asr_spillover`` in :func:`~backdoor_eraser.metrics.evaluate`.
        None for an ordinary (all-source) patch attack."""
        if self.config.source is None:
            return None
        self._check_target(test.num_classes)
        self._check_source(test.num_classes)
        # The label the backdoor gives a triggered source-class image (all2all: source + 1).
        target = int(self.target_labels(torch.tensor([self.config.source]), test.num_classes)[0])
        keep = torch.nonzero((test.labels != self.config.source) & (test.labels != target)).flatten()
        targets = torch.full_like(test.labels[keep], target)
        return TriggeredTestSet(self(test.images[keep]), targets, test.labels[keep], test.index[keep])


# -- several patches at once -----------------------------------------------------------------
@dataclass
class MultiTriggerConfig(PoisonConfig):
    """One patch per entry of ``triggers`` (positions, as for ``patch``), sharing ``size``,
    ``pattern``, ``opacity``. ``targets``: one label for the same-label attack or one per trigger for
    the multi-label attack; ``target`` is set to ``targets[0]``. ``rate`` is the poisoned share of
    the training set *per trigger*. On the command line, list positions of the form 'x,y' with ';'
    between them: ``--triggers 'bottom-right;22,6;6,22'``."""

    target: int = 3
    rate: float = 0.1
    triggers: tuple[str, ...] = ("bottom-right", "top-left", "centre")
    targets: tuple[int, ...] = (3,)
    size: int = 3
    pattern: str = "grid"
    opacity: float = 1.0
    pattern_seed: int = 0


class MultiTrigger(Attack):
    """Several patch triggers in one model, to one shared target or one target each.

    SAGE's multi-trigger study (Gong et al., IEEE S&P 2023; spec §4.10): target label 3 for the
    same-label attack, labels 3.. for the multi-label attack. The chosen samples (rate per trigger,
    poisoned-label) are split evenly among the triggers, each stamped with one. ASR is reported per
    trigger by :meth:`triggered_test_sets`; :meth:`triggered_test_set` is their union.
    Deviations: the paper's exact trigger shapes and places are not given; ours are BadNets-grid
    patches at distinct positions. ``apply_trigger`` on a plain batch stamps trigger i mod T on
    image i, so each image carries one trigger. ``acc_nontarget`` in the metrics excludes only
    ``targets[0]``.
    """

    name = "multi-trigger"

    def __init__(self, config: MultiTriggerConfig):
        check_patch_fields(config.size, config.pattern, config.opacity)
        if not config.triggers:
            raise UserError("multi-trigger needs at least one trigger position")
        if len(set(config.triggers)) != len(config.triggers):
            raise UserError(f"multi-trigger positions must differ, got {list(config.triggers)}")
        for pos in config.triggers:
            check_position(pos)
        if len(config.targets) not in (1, len(config.triggers)):
            raise UserError(f"give one target or one per trigger ({len(config.triggers)}), "
                            f"got {list(config.targets)}")
        if config.label_mode == "clean":
            raise UserError("the multi-trigger attack is poisoned-label")
        if config.rate * len(config.triggers) > 1:
            raise UserError(f"rate {config.rate} per trigger × {len(config.triggers)} triggers exceeds the data")
        # `target` feeds the base class and the metrics; keep it consistent with `targets`.
        super().__init__(dataclasses.replace(config, target=config.targets[0]))

    @property
    def trigger_targets(self) -> list[int]:
        cfg = self.config
        return list(cfg.targets) * len(cfg.triggers) if len(cfg.targets) == 1 else list(cfg.targets)

    def _check_target(self, num_classes: int):
        for t in self.config.targets:
            if not 0 <= t < num_classes:
                raise UserError(f"target class {t} is outside 0..{num_classes - 1}")

    def stamp(self, images: torch.Tensor, trigger: int) -> torch.Tensor:
        """Stamp trigger number ``trigger`` on every image."""
        cfg = self.config
        _, c, h, w = images.shape
        row, col = patch_origin(cfg.triggers[trigger], cfg.size, h, w)
        return stamp(images, patch_pattern(cfg.pattern, cfg.size, c, cfg.pattern_seed), row, col, cfg.opacity)

    def apply_trigger(self, images: torch.Tensor) -> torch.Tensor:
        out = images.clone()
        n_trig = len(self.config.triggers)
        for k in range(n_trig):
            out[k::n_trig] = self.stamp(images[k::n_trig], k)
        return out

    def trigger_labels(self, labels: torch.Tensor, trigger: int, num_classes: int) -> torch.Tensor:
        if self.config.mode == "all2all":
            return (labels + 1) % num_classes
        return torch.full_like(labels, self.trigger_targets[trigger])

    # -- poisoning --------------------------------------------------------------------------
    def assign_poison(self, dataset: ImageDataset, seed: int) -> list[torch.Tensor]:
        """Per trigger, the sorted positions it is stamped on (disjoint, fixed by ``seed``)."""
        g = torch.Generator().manual_seed(seed)
        per = int(round(self.config.rate * len(dataset)))
        chosen = torch.randperm(len(dataset), generator=g)[:per * len(self.config.triggers)]
        return [torch.sort(part).values for part in chosen.split(per)] if per else \
            [chosen[:0] for _ in self.config.triggers]

    def select_poison(self, dataset: ImageDataset, seed: int) -> torch.Tensor:
        return torch.sort(torch.cat(self.assign_poison(dataset, seed))).values

    def poison(self, dataset: ImageDataset, seed: int = 0) -> PoisonedDataset:
        self._check_target(dataset.num_classes)
        images, labels = dataset.images.clone(), dataset.labels.clone()
        flag = torch.zeros(len(dataset), dtype=torch.bool)
        for k, pos in enumerate(self.assign_poison(dataset, seed)):
            if len(pos):
                images[pos] = self.stamp(dataset.images[pos], k)
                labels[pos] = self.trigger_labels(dataset.labels[pos], k, dataset.num_classes)
                flag[pos] = True
        return PoisonedDataset(images, labels, list(dataset.classes), f"{dataset.name}-{self.name}",
                               dataset.index.clone(), flag, dataset.labels.clone())

    # -- evaluation -------------------------------------------------------------------------
    def triggered_test_sets(self, test: ImageDataset) -> dict[str, TriggeredTestSet]:
        """Per trigger position: every test image whose label differs from that trigger's target."""
        self._check_target(test.num_classes)
        sets = {}
        for k, pos in enumerate(self.config.triggers):
            targets = self.trigger_labels(test.labels, k, test.num_classes)
            keep = torch.nonzero(targets != test.labels).flatten()
            sets[pos] = TriggeredTestSet(self.stamp(test.images[keep], k), targets[keep], test.labels[keep],
                                         test.index[keep])
        return sets

    def triggered_test_set(self, test: ImageDataset) -> TriggeredTestSet:
        parts = list(self.triggered_test_sets(test).values())
        return TriggeredTestSet(*(torch.cat([getattr(p, f) for p in parts])
                                  for f in ("images", "target_labels", "true_labels", "source_index")))
