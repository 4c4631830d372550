"""Running one cell: an attack cell trains a backdoored model, a defense cell purifies one; both write
the usual run folder (and resume from its per-epoch checkpoint when interrupted)."""
from __future__ import annotations

import functools
import json
import platform
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import __version__
from ..errors import UserError
from ..registry import build_config
from ..training import TrainConfig
from .spec import file_sha256


@dataclass
class RunOptions:
    """How cells run here; none of it changes a cell's result, so none of it is in the cell's hash."""

    data_dirs: dict = field(default_factory=dict)   # dataset name (or "*") → folder
    device: str = "auto"
    epoch_eval: bool = False
    figures: bool = True
    quiet: bool = False
    threads: int | None = None

    def data_dir(self, dataset: str) -> str | None:
        if dataset == "synthetic":
            return None
        found = self.data_dirs.get(dataset, self.data_dirs.get("*"))
        if found is None:
            raise UserError(f"dataset {dataset!r} needs a data folder: pass --data-dir DIR "
                            f"(or --data-dir {dataset}=DIR)")
        return found


class DataCache:
    """Decoded data sets kept in memory across the cells a worker runs."""

    def __init__(self):
        self._splits = {}

    def get(self, dataset: str, data_dir: str | None, options: dict | None = None):
        from ..workflows import load_data

        key = (dataset, data_dir, json.dumps(options or {}, sort_keys=True))
        if key not in self._splits:
            self._splits[key] = load_data(dataset, data_dir, dict(options or {}))
        return self._splits[key]


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """The toolkit version and, in a git checkout, its commit (recorded with each cell, not hashed)."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
        commit = out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{__version__}+{commit}" if commit else __version__


def host_info(device: str) -> dict:
    return {"hostname": socket.gethostname(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "device": device,
            "python": platform.python_version()}


def run_cell(row: dict, model_dirs: dict[str, str], opts: RunOptions, cache: DataCache) -> tuple[dict, int | None]:
    """Run the cell of store row ``row``; ``model_dirs`` maps dependency hashes to their run folders.
    Returns (metrics, optimizer steps)."""
    from .. import workflows

    cfg = row["config"]
    run_dir = Path(row["run_dir"])
    dataset = cfg["dataset"]["name"]
    data_dir = opts.data_dir(dataset)
    splits = cache.get(dataset, data_dir, cfg["dataset"]["options"])
    if cfg["kind"] == "attack":
        train = build_config(TrainConfig, cfg["train"], what="attack training")
        metrics = workflows.run_attack(
            dataset=dataset, data_dir=data_dir, data_options=cfg["dataset"]["options"], arch=cfg["arch"], attack=cfg["attack"]["name"],
            attack_params=cfg["attack"]["config"], train=train, out=run_dir, seed=cfg["seed"], device=opts.device,
            normalization=cfg["normalization"], resume=True, epoch_eval=opts.epoch_eval, quiet=opts.quiet,
            splits=splits)
        if opts.figures:
            _figure(lambda: workflows.run_show_trigger(run=run_dir, splits=splits, out=run_dir / "trigger.png",
                                                       title=f"{cfg['attack']['name']} (cell {row['hash'][:8]})"))
        return metrics, metrics.get("steps")
    if cfg["kind"] == "defense":
        model = _model_folder(cfg["model"], model_dirs)
        d = cfg["defense"]
        metrics = workflows.run_purify(
            model=model, method=d["name"], out=run_dir, defense_params=d["params"], seed=cfg["seed"],
            clean_fraction=cfg["clean_fraction"], device=opts.device, resume=True, quiet=opts.quiet, splits=splits,
            epoch_eval=opts.epoch_eval, epochs_budget=cfg["epochs_budget"], preset=d.get("preset"))
        if opts.figures:
            _figure(lambda: _attention(model, run_dir, splits, d["name"]))
        return metrics, metrics.get("total_steps", metrics.get("steps"))
    if cfg["kind"] == "evaluate":
        model = _model_folder(cfg["model"], model_dirs)
        metrics = workflows.run_evaluate(model=model, device=opts.device, splits=splits)
        if opts.figures:
            run_dir.mkdir(parents=True, exist_ok=True)
            _figure(lambda: workflows.run_show_trigger(run=model, splits=splits, out=run_dir / "trigger.png",
                                                       title=f"{metrics.get('attack', {}).get('name', '')} ({model.name})"))
        return metrics, 0
    if cfg["kind"] == "detect":
        model = _model_folder(cfg["model"], model_dirs)
        d = cfg["detector"]
        res = workflows.run_detect(model=model, out=run_dir, detector=d["name"], params=d["config"],
                                   clean_fraction=cfg["clean_fraction"], seed=cfg["seed"], device=opts.device,
                                   quiet=opts.quiet, splits=splits, resume=True)
        return res, None
    raise UserError(f"cell {row['hash']} has unknown kind {cfg['kind']!r}")


def _model_folder(ref: dict, model_dirs: dict[str, str]) -> Path:
    from ..runs import MODEL_FILE

    if "cell" in ref:
        return Path(model_dirs[ref["cell"]])
    path = Path(ref["run"])
    if not (path / MODEL_FILE).is_file():
        raise UserError(f"the attack model {path} is gone")
    if file_sha256(path / MODEL_FILE) != ref["sha256"]:
        raise UserError(f"{path / MODEL_FILE} changed since the grid was set up (sha256 differs); "
                        "run the spec again to register the new model")
    return path


def _attention(attack_run: Path, run_dir: Path, splits, method: str):
    from ..runs import load_model, read_meta
    from ..viz import attention_figure
    from ..workflows import attack_for

    atk = attack_for(read_meta(attack_run), attack_run, None, None)
    if atk is None:
        return
    # The first triggered test image, from the first 64 test images: a whole triggered test set takes
    # 15-30 s to build for Refool, per cell, for one picture (triggers are keyed by original index, so
    # the image is the same).
    triggered = atk.triggered_test_set(splits.test.subset(torch.arange(min(64, len(splits.test)))))
    if not len(triggered):
        triggered = atk.triggered_test_set(splits.test)
    image = triggered.images[0]
    models = {"backdoored": load_model(attack_run)[0], method: load_model(run_dir)[0]}
    attention_figure(models, image, run_dir / "attention.png", title="attention of a triggered test image")


def _figure(make):
    """Figures are extras: one that cannot be drawn costs a warning, not the cell."""
    try:
        make()
    except Exception as exc:  # noqa: BLE001  (any drawing failure)
        print(f"warning: figure skipped: {type(exc).__name__}: {exc}", file=sys.stderr)


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if not isinstance(exc, UserError) else text


def timed_run(row, model_dirs, opts, cache) -> tuple[dict, int | None, float]:
    t0 = time.perf_counter()
    metrics, steps = run_cell(row, model_dirs, opts, cache)
    return metrics, steps, time.perf_counter() - t0
