"""Shared fixtures. ``demo_run`` runs ``backdoor-eraser demo`` once per test session (about two minutes on
2 cores); ``synthetic_backdoor`` is its backdoored BadNets WRN-16-1. Set BACKDOOR_ERASER_TEST_RUNS=/some/dir
to keep these runs between sessions while developing (they are rebuilt when missing)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from backdoor_eraser.attacks.base import Attack, TriggeredTestSet
from backdoor_eraser.classifier import Classifier
from backdoor_eraser.data.dataset import DataSplits, ImageDataset


@dataclass
class SyntheticBackdoor:
    model: Classifier          # backdoored WRN-16-1 (ASR ≈ 100 %, ACC ≈ 98 %)
    splits: DataSplits         # synthetic train (5,000) / test (1,000)
    attack: Attack             # BadNets, target 0
    triggered: TriggeredTestSet
    clean: ImageDataset        # seeded stratified 10 % clean subset of the training split
    run_dir: Path
    metrics: dict              # metrics of the backdoored model


def _kept_runs() -> Path | None:
    keep = os.environ.get("BACKDOOR_ERASER_TEST_RUNS")
    return Path(keep) if keep else None


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> Path:
    """The folder written by ``backdoor-eraser demo``: backdoored/, finetune/, nad/, attention.png, summary.json."""
    from backdoor_eraser.cli import main

    out = (_kept_runs() or tmp_path_factory.mktemp("runs")) / "demo"
    if not (out / "summary.json").exists():
        assert main(["demo", "--out", str(out), "--device", "cpu", "--quiet"]) == 0
    return out


@pytest.fixture(scope="session")
def synthetic_backdoor(demo_run) -> SyntheticBackdoor:
    from backdoor_eraser import workflows
    from backdoor_eraser.data.subset import clean_subset
    from backdoor_eraser.metrics import evaluate
    from backdoor_eraser.runs import load_model, read_meta

    run_dir = demo_run / "backdoored"
    splits = workflows.load_data("synthetic", None, {})
    model, meta = load_model(run_dir)
    attack = workflows.attack_for(read_meta(run_dir), run_dir, None, None)
    triggered = attack.triggered_test_set(splits.test)
    clean = clean_subset(splits.train, fraction=workflows.DEMO_CLEAN_FRACTION, seed=0)
    return SyntheticBackdoor(model, splits, attack, triggered, clean, run_dir,
                             evaluate(model, splits.test, attack, triggered))
