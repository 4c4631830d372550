"""The end-to-end jobs behind the CLI, callable from Python: attack, purify, evaluate, demo."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from . import attacks, defenses
from .classifier import Classifier, Normalization
from .data import load_dataset
from .data.dataset import DataSplits
from .data.subset import select_clean_subset, select_validation
from .errors import NonFiniteModel, UserError
from .metrics import evaluate, format_table
from .registry import config_to_dict
from .runfolder import begin_job, file_record, holds_run_folder, indices_digest
from .runs import MODEL_FILE, load_model, new_model, read_meta, read_trigger_state, save_run, write_json
from .training import ATTACK_TRAINING, Task, Trainer, TrainConfig, eval_columns, resolve_amp


def resolve_device(name: str | None = "auto") -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name} was asked for but no CUDA device is available; use cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA device(s), "
                            f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
        return dev
    if dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise UserError(f"--device {name}: no MPS (Apple GPU) device is available here; use cpu or auto")
        return dev
    raise UserError(f"--device {name}: {dev.type!r} devices are not supported; use auto, cpu, cuda or cuda:N")


def say(msg: str, quiet: bool = False):
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def load_data(dataset: str, data_dir: str | None, options: dict | None = None) -> DataSplits:
    t0 = time.perf_counter()
    splits = load_dataset(dataset, data_dir, **(options or {}))
    splits.meta.setdefault("load_seconds", time.perf_counter() - t0)
    return splits


def check_data_fits(model: Classifier, splits: DataSplits, what: str) -> None:
    """Refuse labels the model has no output for; warn when it has outputs the data set never uses."""
    top = max(int(splits.train.labels.max()), int(splits.test.labels.max()))
    if top >= model.num_classes:
        raise UserError(f"the data set has labels up to {top} but {what} has only {model.num_classes} outputs; "
                        "give the data set it was trained on (--dataset, --data-dir)")
    if splits.train.num_classes != model.num_classes:
        print(f"warning: {what} has {model.num_classes} classes but the data set {splits.train.num_classes}: "
              "metrics cover only the data set's classes", file=sys.stderr, flush=True)


def weights_file(model: str | Path) -> Path:
    path = Path(model)
    return path / MODEL_FILE if path.is_dir() else path


def dataset_record(dataset: str, data_dir, options: dict | None) -> dict:
    return {"name": dataset, "data_dir": str(Path(data_dir).resolve()) if data_dir else None,
            "options": options or {}}


@holds_run_folder()
def run_attack(*, dataset: str, data_dir: str | None, arch: str, attack: str, attack_params: dict | None = None,
               train: TrainConfig | None = None, out: str | Path, seed: int = 0, device="auto",
               normalization: str = "none", data_options: dict | None = None, resume: bool = False,
               overwrite: bool = False, epoch_eval: bool = True, quiet: bool = False,
               splits: DataSplits | None = None) -> dict:
    """Train a backdoored model and write its run folder; returns the metrics.

    ``out`` must be new or empty unless ``resume`` (the same job, continued) or ``overwrite`` (cleared). ``epoch_eval`` adds
    the test set's metrics to every epoch's history row (curves for reports); ``val_curves`` adds the
    validation images' as ``val_acc``, ``val_asr``, ``val_ra`` (curves a recipe may be chosen on)."""
    dev = resolve_device(device)
    train = train or TrainConfig(**{**ATTACK_TRAINING, "seed": seed})
    train.check()
    resolve_amp(train.amp, dev, strict=train.amp_strict)  # fail before any work
    params = dict(attack_params or {})
    if "amp" in {f.name for f in dataclasses.fields(attacks.ATTACKS.config_class(attack))}:
        # Its own optimisation (input-aware's generators, TrojanNN's patch) runs in the training's
        # precision unless told otherwise: one --amp flag for the whole job.
        params.setdefault("amp", train.amp)
    atk = attacks.create(attack, **params)
    norm = Normalization.parse(normalization)
    begin_job(out, {"kind": "attack", "attack": atk.describe(), "seed": seed, "arch": arch,
                    "normalization": norm.to_dict(), "dataset": {"name": dataset, "options": data_options or {}},
                    "train": config_to_dict(train)}, resume=resume, quiet=quiet)
    splits = splits or load_data(dataset, data_dir, data_options)
    check_target(atk, splits)
    atk.fit_trigger(splits.train, seed=seed, device=dev, quiet=quiet)
    poisoned = atk.poison(splits.train, seed=seed)
    model = new_model(arch, splits.train.classes, splits.train.shape, norm, dev, seed)
    batch_hook = atk.training_batch_hook(splits.train.num_classes)
    objective = atk.training_objective(model, splits.train.num_classes)
    learned_trigger = atk.learns_trigger_in_training()
    if batch_hook:
        how = f"poisons {atk.config.rate:.0%} of every batch on the fly"
    elif objective is not None:
        how = f"learns its trigger with the model and poisons {atk.config.rate:.0%} of every batch"
    else:
        how = f"poisoned {int(poisoned.poison_flag.sum())} of {len(poisoned)} training images"
    say(f"{atk.name}: {how} (target {atk.config.target}, {atk.config.mode}, {atk.config.label_mode}-label)", quiet)
    # A trigger trained along with the model changes every epoch: rebuild its test set each time.
    triggered = None if learned_trigger else atk.triggered_test_set(splits.test)
    eval_fn = (lambda m: evaluate(m, splits.test, atk, triggered, name=f"the model in training for {out}")) \
        if epoch_eval else None
    task = Task(objective, before_augment=batch_hook, parameters=atk.training_parameters(),
                optimizers=atk.training_optimizers(), label_smoothing=train.label_smoothing)
    res = Trainer(train, desc=f"attack {atk.name}", quiet=quiet).fit(
        model, poisoned, task=task, callbacks=eval_columns(eval_fn), run_dir=out, resume=resume)
    if triggered is None:
        triggered = atk.triggered_test_set(splits.test)
    metrics = final_metrics(model, splits, atk, triggered, f"the model trained for {out}")
    last = res.history[-1] if res.history else {}
    metrics.update(epochs=res.epochs, steps=res.steps, train_seconds=res.seconds, precision=res.precision,
                   train_images_per_s=res.images_per_s(), train_loss=last.get("loss"), train_acc=last.get("train_acc"))
    meta = {"kind": "attack", "dataset": dataset_record(dataset, data_dir, data_options), "attack": atk.describe(),
            "train": config_to_dict(train), "precision": res.precision, "seed": seed, "conv_weight_sq_norm": conv_weight_sq_norm(model.net),
            "poison_indices": poisoned.poison_indices.tolist()}
    save_run(out, model, meta, metrics=metrics, history=res.history, trigger_state=atk.trigger_state())
    return metrics


def final_metrics(model: Classifier, splits: DataSplits, atk, triggered, name: str) -> dict:
    try:
        return evaluate(model, splits.test, atk, triggered, name=name)
    except NonFiniteModel as exc:
        raise NonFiniteModel(f"{exc}; nothing was saved: rerun with a lower lr and --overwrite") from None


def check_target(atk, splits: DataSplits) -> None:
    n = splits.train.num_classes
    targets = getattr(atk.config, "targets", None) or ()
    for t in [getattr(atk.config, "target", None), *targets]:
        if isinstance(t, int) and not 0 <= t < n:
            raise UserError(f"attack {atk.name!r}: target class {t} does not exist in a data set of {n} classes "
                            f"(0 to {n - 1})")


def conv_weight_sq_norm(net: torch.nn.Module) -> float:
    """Sum of squared conv weights. BatchNorm makes convs scale-invariant, so the effective lr of a
    restart is about lr / this: a model with a small norm is fragile under a high-lr fine-tune."""
    return float(sum(m.weight.detach().double().pow(2).sum() for m in net.modules()
                     if isinstance(m, torch.nn.Conv2d)))


def attack_for(meta: dict, run_dir: Path | None, name: str | None, params: dict | None):
    """The attack to evaluate with: the one named on the command line, else the one in the run's meta."""
    if name:
        return attacks.create(name, **(params or {}))
    desc = meta.get("attack") or meta.get("source", {}).get("attack")
    if not desc:
        return None
    state = {}
    for folder in (run_dir, meta.get("source", {}).get("attack_run")):
        if folder and Path(folder).is_dir():
            state = read_trigger_state(folder)
            if state:
                break
    return attacks.from_description(desc, state)


def data_for(meta: dict, dataset: str | None, data_dir: str | None, splits: DataSplits | None) -> tuple[DataSplits, dict]:
    if splits is not None:
        return splits, meta.get("dataset") or {"name": dataset}
    rec = meta.get("dataset") or meta.get("source", {}).get("dataset")
    if dataset:
        rec = dataset_record(dataset, data_dir, {})
    elif data_dir and rec:
        rec = {**rec, "data_dir": str(Path(data_dir).resolve())}
    if not rec:
        raise UserError("this model has no run metadata naming its data set: pass --dataset (and --data-dir)")
    return load_data(rec["name"], rec.get("data_dir"), rec.get("options")), rec


@holds_run_folder(source_arg="model")
def run_purify(*, model: str | Path, method: str, out: str | Path, defense_params: dict | None = None,
               clean_fraction: float | None = None, clean_count: int | None = None, seed: int = 0,
               dataset: str | None = None, data_dir: str | None = None, arch: str | None = None,
               normalization: str | None = None, num_classes: int | None = None, unsafe_load: bool = False,
               attack: str | None = None, attack_params: dict | None = None, device="auto", resume: bool = False,
               quiet: bool = False, splits: DataSplits | None = None, epoch_eval: bool = True,
               epochs_budget: int | None = None, preset: str | None = None, overwrite: bool = False,
               val_curves: bool = False) -> dict:
    """Erase a backdoor with ``method`` on a seeded clean subset of the training data; writes a run folder.

    ``preset`` starts from one of the defense's named recipes; ``epochs_budget`` gives every training
    stage of the defense that many epochs; explicit ``defense_params`` win over both. ``out`` must be
    new or empty unless ``resume`` (the same job, continued) or ``overwrite`` (cleared). ``epoch_eval`` adds
    the test set's metrics to every epoch's history row (curves for reports); ``val_curves`` adds the
    validation images' as ``val_acc``, ``val_asr``, ``val_ra`` (curves a recipe may be chosen on)."""
    dev = resolve_device(device)
    defenses.DEFENSES.config_class(method)  # fail fast on an unknown name
    defenses.resolve_params(method, preset)  # and on an unknown preset, before the model is read
    src, meta = load_model(model, arch=arch, normalization=normalization, num_classes=num_classes,
                           unsafe_load=unsafe_load, device=dev)
    model_sha = file_record(weights_file(model))["sha256"]
    splits, data_rec = data_for(meta, dataset, data_dir, splits)
    check_data_fits(src, splits, f"model {model}")
    if clean_fraction is None and clean_count is None:
        clean_fraction = 0.05
    params = dict(defense_params or {})
    if "seed" in {f.name for f in dataclasses.fields(defenses.DEFENSES.config_class(method))}:
        params.setdefault("seed", seed)  # the seed fixes the defense's training as well as the clean subset
    needs_poisoned = getattr(defenses.DEFENSES.get(method), "needs_poisoned_training_set", False)
    src_dir = Path(model) if Path(model).is_dir() else None
    atk = attack_for(meta, src_dir, attack, attack_params)
    if needs_poisoned:
        # Training-time defenses (ABL) see the attacker's poisoned training set, rebuilt from the attack run.
        data = poisoned_set_for(meta, atk, splits)
        idx = torch.zeros(0, dtype=torch.int64)
    else:
        idx = select_clean_subset(splits.train.labels, fraction=clean_fraction, count=clean_count, seed=seed,
                                  num_classes=splits.train.num_classes)
        data = splits.train.subset(idx, name=f"{splits.train.name}-clean")
    if epochs_budget is not None:
        batch_size = defenses.resolve_params(method, preset, params).get("batch_size")
        params = {**defenses.epoch_budget_params(method, epochs_budget, len(data), batch_size), **params}
    defense = defenses.create(method, preset=preset, **params)
    defense.check_model(src)  # e.g. one β per attention site, before any teacher is trained
    amp = getattr(defense.config, "amp", None)  # --amp-strict on hardware without bf16 fails here, before any work
    precision = resolve_amp(amp, dev, strict=getattr(defense.config, "amp_strict", False)) if amp else "none"
    clean = data
    begin_job(out, {"kind": "defense", "defense": defense.describe(), "seed": seed, "model": str(Path(model).resolve()),
                    "model_sha256": model_sha, "epochs_budget": epochs_budget,
                    "dataset": {"name": data_rec.get("name"), "options": data_rec.get("options") or {}},
                    "clean_subset": None if needs_poisoned else indices_digest(idx.tolist())},
              resume=resume, quiet=quiet)
    triggered, before_test = input_model_on_test(src, model_sha, splits, atk, name=f"model {model}")
    if needs_poisoned:
        say(f"{defense.name}: trains on the poisoned training set ({int(data.poison_flag.sum())} of {len(data)} "
            "poisoned); the given model only fixes the architecture", quiet)
    else:
        say(f"{defense.name}: {len(clean)} clean images ({len(clean) / len(splits.train):.1%} of the training set, "
            f"seed {seed})", quiet)
    val = validation_set(splits, idx, meta)
    val_triggered = atk.triggered_test_set(val) if atk else None
    before = {**before_test, "val": validation_metrics(src, val, atk, val_triggered)}
    def eval_fn(m):
        row = evaluate(m, splits.test, atk, triggered, name=f"the model in training for {out}") if epoch_eval else {}
        if val_curves:
            row.update({f"val_{k}": v for k, v in validation_metrics(m, val, atk, val_triggered).items()
                        if k != "n_test"})
        return row
    t0 = time.perf_counter()
    result = defense.purify(src, clean, run_dir=out, resume=resume, eval_fn=eval_fn if epoch_eval or val_curves
                            else None, quiet=quiet)
    wall = time.perf_counter() - t0
    after = final_metrics(result.model, splits, atk, triggered, f"the model purified for {out}")
    after["val"] = validation_metrics(result.model, val, atk, val_triggered)
    metrics = {**after, "before": before, "wall_seconds": wall, "precision": precision,
               **{k: v for k, v in result.info.items() if k in ("epochs", "steps", "total_epochs", "total_steps")}}
    if diagnostics := defense.diagnostic_values(result.info):
        metrics["diagnostics"] = diagnostics
    source = {"model": str(Path(model).resolve()), "model_sha256": model_sha, "attack": atk.describe() if atk else None,
              "attack_run": str(src_dir.resolve()) if src_dir and meta.get("kind") == "attack"
              else meta.get("source", {}).get("attack_run"), "dataset": data_rec}
    run_meta = {"kind": "defense", "defense": defense.describe(), "defense_info": result.info, "seed": seed,
                "precision": precision,
                "epochs_budget": epochs_budget,
                "dataset": data_rec, "attack": source["attack"], "source": source,
                "clean_subset": None if needs_poisoned else
                {"fraction": clean_fraction, "count": len(idx), "seed": seed, "indices": idx.tolist()}}
    # The artifacts (NAD's teacher) first: the main folder's commit is the last word of the job.
    for name, art in result.artifacts.items():
        save_run(Path(out) / name, art, {"kind": f"{defense.name}-{name}", "dataset": data_rec, "seed": seed})
    save_run(out, result.model, run_meta, metrics=metrics, history=result.history,
             trigger_state=atk.trigger_state() if atk else None)
    return metrics


# (model sha256, attack) -> (test split, triggered test set, the model's test metrics); see input_model_on_test.
_ON_TEST: dict[tuple, tuple] = {}


def input_model_on_test(model: Classifier, model_sha: str, splits: DataSplits, atk, *, name: str) -> tuple:
    """(triggered test set, the input model's test metrics), kept for the next defense run in this process
    on the same model: a grid worker runs every defense cell of a model in a row, and both depend only on
    the weights, the attack with its trigger state and the test split (a triggered Refool or WaNet test
    set alone takes seconds to build)."""
    key = (model_sha, json.dumps(atk.describe(), sort_keys=True, default=str) if atk else None,
           tensors_digest(atk.trigger_state()) if atk else None)
    hit = _ON_TEST.get(key)
    if hit is None or hit[0] is not splits.test:
        triggered = atk.triggered_test_set(splits.test) if atk else None
        hit = (splits.test, triggered, evaluate(model, splits.test, atk, triggered, name=name))
        while len(_ON_TEST) >= 2:  # a triggered CIFAR-10 test set is 28 MB
            _ON_TEST.pop(next(iter(_ON_TEST)))
        _ON_TEST[key] = hit
    return hit[1], dict(hit[2])


def tensors_digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def validation_set(splits: DataSplits, clean_idx: torch.Tensor, meta: dict):
    """Training images outside the clean subset and outside the attack's poisoned ones
    (``select_validation``): what defaults are chosen on, never the test split."""
    exclude = torch.cat([clean_idx, torch.as_tensor(meta.get("poison_indices") or [], dtype=torch.int64)])
    return splits.train.subset(select_validation(len(splits.train), exclude), name=f"{splits.train.name}-val")


def validation_metrics(model: Classifier, val, atk, triggered) -> dict:
    m = evaluate(model, val, atk, triggered, name="the model on the validation images")
    return {k: m[k] for k in ("acc", "asr", "ra", "n_test") if k in m}


def poisoned_set_for(meta: dict, atk, splits: DataSplits):
    """The attack run's poisoned training set, rebuilt from its attack, trigger state and seed and checked
    against the poisoned indices it recorded."""
    if meta.get("kind") != "attack" or atk is None:
        raise UserError("this defense trains on the poisoned training set: give --model an attack run folder "
                        "(from `backdoor-eraser attack`), whose attack and seed rebuild that set")
    if atk.training_batch_hook(splits.train.num_classes) is not None or atk.learns_trigger_in_training():
        raise UserError(f"attack {atk.name!r} poisons batches on the fly, so there is no fixed poisoned "
                        "training set for this defense to work on")
    poisoned = atk.poison(splits.train, seed=meta.get("seed", 0))
    recorded = meta.get("poison_indices")
    if recorded is not None and poisoned.poison_indices.tolist() != list(recorded):
        raise UserError("the rebuilt poisoned set does not match the indices recorded in the attack run")
    return poisoned


@holds_run_folder(source_arg="model")
def run_detect(*, model: str | Path, out: str | Path, detector: str = "neural-cleanse", params: dict | None = None,
               clean_fraction: float | None = None, clean_count: int | None = None, seed: int = 0,
               dataset: str | None = None, data_dir: str | None = None, arch: str | None = None,
               normalization: str | None = None, num_classes: int | None = None, unsafe_load: bool = False,
               device="auto", quiet: bool = False, splits: DataSplits | None = None, overwrite: bool = False,
               resume: bool = False) -> dict:
    """Run a backdoor detector (Neural Cleanse) on a model with a seeded clean subset; writes
    ``detect.json`` and a PNG of the reverse-engineered masks into ``out`` (new or empty, unless
    ``overwrite``: then cleared; ``resume`` continues the per-class searches from their checkpoints
    under ``out/search``)."""
    from .defenses import DETECTORS, save_masks_png

    dev = resolve_device(device)
    det = DETECTORS.create(detector, **(params or {}))
    clf, meta = load_model(model, arch=arch, normalization=normalization, num_classes=num_classes,
                           unsafe_load=unsafe_load, device=dev)
    splits, data_rec = data_for(meta, dataset, data_dir, splits)
    check_data_fits(clf, splits, f"model {model}")
    if clean_fraction is None and clean_count is None:
        clean_fraction = 0.05
    idx = select_clean_subset(splits.train.labels, fraction=clean_fraction, count=clean_count, seed=seed,
                              num_classes=splits.train.num_classes)
    begin_job(out, {"kind": "detect", "detector": detector, "config": config_to_dict(det.config), "seed": seed,
                    "source": {"model": str(Path(model).resolve())},
                    "clean_subset": {"fraction": clean_fraction, "count": clean_count}}, resume=resume, quiet=quiet)
    t0 = time.perf_counter()
    report = det.detect(clf, splits.train.subset(idx), device=dev, quiet=quiet, run_dir=Path(out) / "search",
                        resume=resume)
    out = Path(out)
    result = {"detector": detector, "config": config_to_dict(det.config), "model": str(Path(model).resolve()),
              "clean_subset": {"fraction": clean_fraction, "count": len(idx), "seed": seed},
              "seconds": time.perf_counter() - t0, **report.to_dict()}
    # detect.json last: when it exists, so does the whole report.
    staged = out / ".masks.partial.png"  # the suffix tells matplotlib the format
    try:
        save_masks_png(report, staged)
        os.replace(staged, out / "masks.png")
    finally:
        staged.unlink(missing_ok=True)
    write_json(out / "detect.json", result)
    return result


def run_evaluate(*, model: str | Path, attack: str | None = None, attack_params: dict | None = None,
                 dataset: str | None = None, data_dir: str | None = None, arch: str | None = None,
                 normalization: str | None = None, num_classes: int | None = None, unsafe_load: bool = False,
                 device="auto", splits: DataSplits | None = None) -> dict:
    """ACC/ASR/RA of a run folder or checkpoint on the clean and triggered test set."""
    dev = resolve_device(device)
    clf, meta = load_model(model, arch=arch, normalization=normalization, num_classes=num_classes,
                           unsafe_load=unsafe_load, device=dev)
    splits, _ = data_for(meta, dataset, data_dir, splits)
    check_data_fits(clf, splits, f"model {model}")
    atk = attack_for(meta, Path(model) if Path(model).is_dir() else None, attack, attack_params)
    if atk is not None:
        check_target(atk, splits)
    metrics = evaluate(clf, splits.test, atk, name=f"model {model}")
    if atk:
        metrics["attack"] = atk.describe()
    return metrics


def run_show_trigger(*, attack: str | None = None, attack_params: dict | None = None, run: str | Path | None = None,
                     dataset: str | None = "synthetic", data_dir: str | None = None, out: str | Path, count: int = 8,
                     amplify: float = 5.0, seed: int = 0, splits: DataSplits | None = None,
                     title: str | None = None, device="cpu") -> Path:
    """PNG of ``count`` test images of different non-target classes, clean and triggered.

    With ``run`` (an attack run folder) the trigger is the one recorded there, learned triggers
    included; otherwise ``attack`` is built and, where it needs fitting, fitted on the training split
    (on ``device``)."""
    from .viz import trigger_figure

    if not isinstance(count, int) or count < 1:
        raise UserError(f"--count must be at least 1, got {count}")
    if not math.isfinite(amplify) or amplify <= 0:
        raise UserError(f"--amplify must be a positive number, got {amplify}")
    dev = resolve_device(device)
    if run is not None:
        meta = read_meta(run)
        atk = attack_for(meta, Path(run), None, None)
        if atk is None:
            raise UserError(f"{run} records no attack")
        splits, rec = data_for(meta, dataset, data_dir, splits)
        dataset = rec["name"]
    else:
        if attack is None:
            raise UserError("name an attack or an attack run folder")
        atk = attacks.create(attack, **(attack_params or {}))
        splits = splits or load_data(dataset or "synthetic", data_dir, {})
        atk.fit_trigger(splits.train, seed=seed, device=dev)
    triggered = atk.triggered_test_set(splits.test)
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(triggered), generator=g)[:count]
    images = splits.test.images[triggered.source_index[pick]]
    return trigger_figure(atk, images, out, amplify=amplify,
                          title=title or f"{atk.name} on {dataset} (target {getattr(atk.config, 'target', '?')})")


def run_demo(out: str | Path = "runs/demo", *, device="auto", seed: int = 0, quiet: bool = False) -> dict:
    """Backdoor a WRN-16-1 on the built-in synthetic data, erase it with fine-tuning and NAD, compare."""
    from .viz import attention_figure

    out = Path(out)
    t0 = time.perf_counter()
    splits = load_data("synthetic", None, {})
    say(f"demo: synthetic data, {len(splits.train)} train / {len(splits.test)} test images, WRN-16-1, BadNets", quiet)
    train = DEMO_ATTACK_TRAIN
    # The demo's folders are its own: running it again replaces them.
    run_attack(dataset="synthetic", data_dir=None, arch="wrn-16-1", attack="badnets", train=train,
               out=out / "backdoored", seed=seed, device=device, quiet=quiet, splits=splits, epoch_eval=False,
               overwrite=True)
    rows = {}
    for method in ("finetune", "nad"):
        m = run_purify(model=out / "backdoored", method=method, out=out / method, clean_fraction=DEMO_CLEAN_FRACTION,
                       seed=seed, device=device, quiet=quiet, splits=splits, epoch_eval=False,
                       defense_params={"amp": DEMO_ATTACK_TRAIN.amp}, overwrite=True)
        rows.setdefault("backdoored", m["before"])
        rows[method] = {k: v for k, v in m.items() if k != "before"}
    atk = attack_for(read_meta(out / "backdoored"), out / "backdoored", None, None)
    trig = atk.triggered_test_set(splits.test)
    models = {"backdoored": load_model(out / "backdoored")[0], "teacher": load_model(out / "nad" / "teacher")[0],
              "NAD student": load_model(out / "nad")[0]}
    attention_figure(models, trig.images[0], out / "attention.png",
                     title=f"attention of a triggered test image (true class {int(trig.true_labels[0])})")
    table = format_table(rows)
    print(table)
    print(f"\nrun folders and attention.png in {out}  ({time.perf_counter() - t0:.0f} s)")
    write_json(out / "summary.json", rows)
    return rows


# The corner trigger needs several hundred steps after the textures are learned; small batches give
# them within about a minute on 2 cores. No augmentation, like the NAD release's attack training.
# One-cycle (warm-up over the first 1.2 epochs to lr 0.1, then linear decay): at a constant lr 0.05
# from the first step the net fell into predicting the poisoned majority class 0 for 0 to 3 epochs,
# depending on the CPU's float rounding, and on a slow escape ended at ACC 0.74 with the trigger
# barely learned. With the warm-up, 13 of 13 seeds measured learned the textures by epoch 2 and the
# trigger by epoch 3-4 (ACC 0.99-1.00, ASR 1.00). fp32 for the attack and both defenses: the demo's
# numbers do not depend on whether the host runs bf16 natively.
DEMO_ATTACK_TRAIN = TrainConfig(epochs=6, batch_size=32, lr=0.1, weight_decay=5e-4, schedule="onecycle",
                                augment="none", amp="none")
DEMO_CLEAN_FRACTION = 0.1
