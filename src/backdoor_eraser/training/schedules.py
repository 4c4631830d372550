"""Learning-rate schedules as functions of fractional epoch (so they can change per step)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import UserError

SCHEDULES = ("constant", "step", "multistep", "cosine", "onecycle", "curve")


@dataclass(frozen=True)
class Schedule:
    """``kind``: constant; step (×gamma every ``step_size`` epochs); multistep (×gamma at each
    milestone epoch); cosine (to 0 over the run); onecycle (linear warm-up for ``warmup``
    of the run, then linear decay to 0, as in airbench); curve (the IBM/Garipov mode-connectivity
    schedule, once per epoch: 1 up to 50 % of the run, linear to 0.01 at 90 %, then 0.01)."""

    kind: str = "constant"
    step_size: int = 2
    gamma: float = 0.1
    milestones: tuple[int, ...] = ()
    warmup: float = 0.2

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise UserError(f"unknown schedule {self.kind!r}; known: {', '.join(SCHEDULES)}")

    def factor(self, epoch: float, total_epochs: int) -> float:
        """Multiplier of the base lr at fractional ``epoch`` (0 ≤ epoch < total_epochs)."""
        if self.kind == "constant":
            return 1.0
        if self.kind == "step":
            return self.gamma ** int(epoch // self.step_size)
        if self.kind == "multistep":
            return self.gamma ** sum(1 for m in self.milestones if epoch >= m)
        if self.kind == "curve":
            alpha = int(epoch) / max(total_epochs, 1)
            if alpha <= 0.5:
                return 1.0
            return 1.0 - (alpha - 0.5) / 0.4 * 0.99 if alpha <= 0.9 else 0.01
        progress = min(max(epoch / max(total_epochs, 1), 0.0), 1.0)
        if self.kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        # onecycle
        if progress < self.warmup:
            return progress / self.warmup
        return max(0.0, (1 - progress) / (1 - self.warmup))
