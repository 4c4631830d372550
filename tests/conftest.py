"""Shared fixtures. ``demo_run`` runs ``backdoor-eraser demo`` once per test session (a few minutes on
2 cores); ``synthetic_backdoor`` is its backdoored BadNets WRN-16-1. Set BACKDOOR_ERASER_TEST_RUNS=/some/dir
to keep these runs between sessions while developing (they are rebuilt when missing)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from backdoor_eraser.training.precision import FP32_ENV

# The suite's trajectories must not depend on whether the host has native bf16: ``--amp auto`` means
# fp32 here (and in the worker processes the grid tests start). Tests of the choice itself mock it.
os.environ[FP32_ENV] = "1"
# Float reductions are split by the intra-op thread count, so small-budget trajectories (the demo model,
# Neural Cleanse's masks) differ between a 2-core and a 16-core host: every test, and every CLI or
# worker process it starts, computes with the thread count the expectations were measured with.
TEST_THREADS = int(os.environ.get("BACKDOOR_ERASER_TEST_THREADS", "2"))
os.environ["OMP_NUM_THREADS"] = str(TEST_THREADS)

from backdoor_eraser.attacks.base import Attack, TriggeredTestSet  # noqa: E402
from backdoor_eraser.classifier import Classifier  # noqa: E402
from backdoor_eraser.data.dataset import DataSplits, ImageDataset  # noqa: E402

import torch  # noqa: E402

torch.set_num_threads(TEST_THREADS)


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


@pytest.fixture
def interrupt_after_checkpoint(monkeypatch):
    """``interrupt_after_checkpoint(k)``: the trainer's k-th checkpoint is the last one written before a
    kill (a KeyboardInterrupt right after it), for exact-resume tests."""
    from backdoor_eraser.training import Trainer

    def arm(k: int):
        real, calls = Trainer._save_checkpoint, []

        def save(*args):
            real(*args)
            calls.append(1)
            if len(calls) == k:
                raise KeyboardInterrupt

        monkeypatch.setattr(Trainer, "_save_checkpoint", staticmethod(save))

    return arm


@pytest.fixture
def kill_and_resume(interrupt_after_checkpoint, tmp_path):
    """``kill_and_resume(make, model, data, k)``: ``make()``'s defense purifies once uninterrupted, once
    killed after the trainer's k-th checkpoint and resumed into the same folder; returns both results."""

    def run(make, model, data, k):
        whole = make().purify(model, data, run_dir=tmp_path / "whole", quiet=True)
        interrupt_after_checkpoint(k)
        with pytest.raises(KeyboardInterrupt):
            make().purify(model, data, run_dir=tmp_path / "cut", quiet=True)
        interrupt_after_checkpoint(10 ** 6)
        return whole, make().purify(model, data, run_dir=tmp_path / "cut", resume=True, quiet=True)

    return run


def same_rows(a, b, drop=("seconds", "images_per_s")) -> bool:
    """Two histories with the same records, wall-clock columns aside."""
    return [{k: v for k, v in r.items() if k not in drop} for r in a] == \
        [{k: v for k, v in r.items() if k not in drop} for r in b]


def pytest_terminal_summary(terminalreporter):
    """Which kernels and thread count the numbers above came from (they differ between hosts)."""
    terminalreporter.write_line(
        f"host: torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"{TEST_THREADS} test threads of {os.cpu_count()} cores")
