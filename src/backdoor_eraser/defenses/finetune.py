"""Fine-tuning baseline: train every layer on the clean subset with cross-entropy (spec §5.1)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..training import Trainer, eval_columns
from .base import ERASE_RECOVER_SCHEDULE, NAD_PAPER_SCHEDULE, NAD_RELEASE_SCHEDULE, Defense, PurifyResult, Stage
from .recovery import KD_STAGE, EraseRecoverConfig, recover


@dataclass
class FinetuneConfig(EraseRecoverConfig):
    """NAD's optimiser with β = 0, 10 epochs to match the NAD student budget (spec §5.1 decision), at a
    constant lr 0.1 and followed by the 40-epoch recovery (EraseRecoverConfig: the evidence's default)."""


class Finetune(Defense):
    """Fine-tuning on the defender's clean subset.

    The baseline of every source paper; NAD's "finetuning is main.py with all β = 0" (NAD issues
    #2/#3) and its teacher (spec §5.1). Same optimiser and augmentation as NAD. Default: the
    ``erase-recover`` recipe, lr 0.1 for all 10 epochs, then the input model's clean predictions
    distilled back for 40 (our evidence, not a paper's: benchmarks/results/erase-harder-findings.md).
    Presets: ``paper`` and ``release`` are NAD's schedules with β = 0; ``short`` is the paper's, the
    default until the evidence replaced it; ``erase-recover`` the default written out.
    """

    name = "finetune"
    stages = (Stage("finetune", "epochs"), KD_STAGE)
    presets = {"paper": dict(NAD_PAPER_SCHEDULE), "release": dict(NAD_RELEASE_SCHEDULE),
               "short": dict(NAD_PAPER_SCHEDULE), "erase-recover": dict(ERASE_RECOVER_SCHEDULE)}

    def purify(self, model, clean, *, run_dir=None, resume=False, eval_fn=None, quiet=False) -> PurifyResult:
        run_dir = Path(run_dir) if run_dir else None
        cfg, probe = self.fitted_config(model, clean, run_dir, quiet)
        student = model.copy()
        trainer = Trainer(cfg.train_config(), desc="finetune", quiet=quiet)
        res = trainer.fit(student, clean, callbacks=eval_columns(eval_fn), run_dir=run_dir, resume=resume)
        result = PurifyResult(student, res.history,
                              {"epochs": res.epochs, "steps": res.steps, "seconds": res.seconds, "lr_probe": probe})
        return recover(model, result, clean, cfg, run_dir=run_dir, resume=resume, quiet=quiet)
