"""What a training step does (a task) and what watches the loop (callbacks).

The one :class:`~backdoor_eraser.training.Trainer` runs every training stage of every attack and
defense. A **task** owns one step: how a uint8 batch is rewritten before augmentation (on-the-fly
poisoning), the forward pass (a plain call, a curve point, masked BatchNorm), the loss and its logged
terms, the parameters the loop's SGD trains and any optimisers of its own. **Callbacks** see every
step and every epoch's record, may ask the loop to stop, and keep state that the per-epoch checkpoint
saves, so dynamic-lr rules, best-checkpoint keepers and early stops resume exactly (the shape of
Lightning's ``Callback``, with ``state_dict``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterable

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from ..classifier import Classifier

Loss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]
BeforeAugment = Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


class Task:
    """Cross-entropy training of ``classifier.net``, with every part replaceable.

    Pass ``loss(logits, inputs, labels) -> (loss, terms)`` for another objective (NAD's distillation),
    ``before_augment(x_uint8, y, generator) -> (x, y)`` to rewrite batches (WaNet's warp),
    ``forward(classifier, inputs) -> logits`` for another forward pass (TrojanNN's pasted patch),
    ``after_step()`` to run after every step (its clamp), ``parameters`` to train more than the net's
    trainable parameters (ARGD's embeddings) and ``optimizers`` for parameters with an optimiser of
    their own (input-aware's Adam), stepped after the loop's SGD, which leaves them alone.
    Subclasses override the methods instead (MCR's curve, RNP's masks).
    """

    def __init__(self, loss: Loss | None = None, *, before_augment: BeforeAugment | None = None,
                 forward: Callable | None = None, after_step: Callable[[], None] | None = None,
                 parameters: Iterable[torch.nn.Parameter] = (), optimizers: Iterable[torch.optim.Optimizer] = (),
                 label_smoothing: float = 0.0):
        self._loss = loss
        self._before_augment = before_augment
        self._forward, self._after_step = forward, after_step
        self._extra = list(parameters)
        self._optimizers = list(optimizers)
        self.label_smoothing = label_smoothing

    def parameters(self, classifier: "Classifier") -> list[torch.Tensor]:
        """What the loop's SGD trains: the net's trainable parameters that no optimiser of the task's
        own holds, and ``parameters``."""
        own = {id(p) for opt in self.optimizers() for group in opt.param_groups for p in group["params"]}
        return [p for p in classifier.net.parameters() if p.requires_grad and id(p) not in own] + self._extra

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return self._optimizers

    def before_augment(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator):
        return self._before_augment(x, y, generator) if self._before_augment else (x, y)

    def forward(self, classifier: "Classifier", inputs: torch.Tensor) -> torch.Tensor:
        return self._forward(classifier, inputs) if self._forward else classifier.net(inputs)

    def loss(self, logits: torch.Tensor, inputs: torch.Tensor, labels: torch.Tensor):
        if self._loss is not None:
            return self._loss(logits, inputs, labels)
        return F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing), {}

    def after_step(self) -> None:
        """After every optimiser step (e.g. clamp masks into [0, 1])."""
        if self._after_step:
            self._after_step()

    def state_dict(self) -> dict[str, Any]:
        """State beyond the optimised parameters (which the checkpoint saves itself)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class Loop:
    """What callbacks see of the running loop: the classifier, optimiser, position, and ``request_stop``."""

    def __init__(self, classifier, optimizer, epochs: int, steps_per_epoch: int):
        self.classifier, self.optimizer = classifier, optimizer
        self.epochs, self.steps_per_epoch = epochs, steps_per_epoch
        self.epoch = 0          # 1-based epoch being run
        self.step = 0           # optimiser steps so far
        self.stop_reason: str | None = None

    def request_stop(self, reason: str) -> None:
        """End training after the current step; the epoch's record and checkpoint are still written,
        and a resumed run does not train further."""
        self.stop_reason = self.stop_reason or reason


class Callback:
    """Hooks of the loop. ``wants_steps``: ``on_step`` gets Python numbers of each step, which costs a
    device sync per step, so the loop only computes them when some callback asks."""

    wants_steps = False

    def on_step(self, loop: Loop, info: dict) -> None:
        """After each optimiser step: ``info`` = {"epoch", "step", "loss", "correct", "batch_size"}."""

    def on_epoch_end(self, loop: Loop, record: dict) -> None:
        """After each epoch (or a stopped partial one); may add columns to ``record``."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class EvalColumns(Callback):
    """Adds ``evaluate(classifier)``'s metrics to each epoch's record (test-set curves for reports,
    never used for any choice)."""

    def __init__(self, evaluate: Callable[["Classifier"], dict]):
        self.evaluate = evaluate

    def on_epoch_end(self, loop, record):
        record.update(self.evaluate(loop.classifier))
        loop.classifier.net.train()


def eval_columns(evaluate: Callable | None) -> list[Callback]:
    """``[EvalColumns(evaluate)]``, or nothing without an evaluation function."""
    return [EvalColumns(evaluate)] if evaluate is not None else []
