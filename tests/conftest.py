"""Shared fixtures. ``synthetic_backdoor`` trains the demo's BadNets WRN-16-1 on the synthetic data once
per test session (about a minute on 2 cores). Set BACKDOOR_ERASER_TEST_RUNS=/some/dir to keep that run
between sessions while developing (it is rebuilt when missing)."""
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


@pytest.fixture(scope="session")
def synthetic_backdoor(tmp_path_factory) -> SyntheticBackdoor:
    from backdoor_eraser import workflows
    from backdoor_eraser.data.subset import clean_subset
    from backdoor_eraser.metrics import evaluate
    from backdoor_eraser.runs import load_model, read_meta

    keep = os.environ.get("BACKDOOR_ERASER_TEST_RUNS")
    run_dir = Path(keep) / "synthetic-badnets" if keep else tmp_path_factory.mktemp("runs") / "synthetic-badnets"
    splits = workflows.load_data("synthetic", None, {})
    if not (run_dir / "model.safetensors").exists():
        workflows.run_attack(dataset="synthetic", data_dir=None, arch="wrn-16-1", attack="badnets",
                             train=workflows.DEMO_ATTACK_TRAIN, out=run_dir, seed=0, device="cpu", quiet=True,
                             splits=splits, epoch_eval=False)
    model, meta = load_model(run_dir)
    attack = workflows.attack_for(read_meta(run_dir), run_dir, None, None)
    triggered = attack.triggered_test_set(splits.test)
    clean = clean_subset(splits.train, fraction=workflows.DEMO_CLEAN_FRACTION, seed=0)
    return SyntheticBackdoor(model, splits, attack, triggered, clean, run_dir,
                             evaluate(model, splits.test, attack, triggered))
