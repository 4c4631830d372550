"""The end-to-end jobs behind the CLI, callable from Python: attack, purify, evaluate, demo."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from . import attacks, defenses
from .classifier import Classifier, Normalization
from .data import load_dataset
from .data.dataset import DataSplits
from .data.subset import select_clean_subset
from .errors import UserError
from .metrics import evaluate, format_table
from .registry import config_to_dict
from .runs import load_model, new_model, read_meta, read_trigger_state, save_run, write_json
from .training import Trainer, TrainConfig


def resolve_device(name: str | None = "auto") -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is available")
    return dev


def say(msg: str, quiet: bool = False):
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def load_data(dataset: str, data_dir: str | None, options: dict | None = None) -> DataSplits:
    t0 = time.perf_counter()
    splits = load_dataset(dataset, data_dir, **(options or {}))
    splits.meta.setdefault("load_seconds", time.perf_counter() - t0)
    return splits


def dataset_record(dataset: str, data_dir, options: dict | None) -> dict:
    return {"name": dataset, "data_dir": str(Path(data_dir).resolve()) if data_dir else None,
            "options": options or {}}


def run_attack(*, dataset: str, data_dir: str | None, arch: str, attack: str, attack_params: dict | None = None,
               train: TrainConfig | None = None, out: str | Path, seed: int = 0, device="auto",
               normalization: str = "none", data_options: dict | None = None, resume: bool = False,
               epoch_eval: bool = True, quiet: bool = False, splits: DataSplits | None = None) -> dict:
    """Train a backdoored model and write its run folder; returns the metrics."""
    dev = resolve_device(device)
    train = train or TrainConfig(epochs=100, batch_size=128, lr=0.1, weight_decay=5e-4, schedule="cosine", seed=seed)
    atk = attacks.create(attack, **(attack_params or {}))
    splits = splits or load_data(dataset, data_dir, data_options)
    atk.fit_trigger(splits.train, seed=seed, device=dev)
    poisoned = atk.poison(splits.train, seed=seed)
    model = new_model(arch, splits.train.classes, splits.train.shape, Normalization.parse(normalization), dev, seed)
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
    eval_fn = (lambda m: evaluate(m, splits.test, atk, triggered)) if epoch_eval else None
    res = Trainer(train, desc=f"attack {atk.name}", quiet=quiet).fit(
        model, poisoned, eval_fn=eval_fn, run_dir=out, resume=resume, batch_hook=batch_hook,
        objective=objective, extra_params=atk.training_parameters(), extra_optimizers=atk.training_optimizers())
    if triggered is None:
        triggered = atk.triggered_test_set(splits.test)
    metrics = evaluate(model, splits.test, atk, triggered)
    metrics.update(epochs=res.epochs, steps=res.steps, train_seconds=res.seconds)
    meta = {"kind": "attack", "dataset": dataset_record(dataset, data_dir, data_options), "attack": atk.describe(),
            "train": config_to_dict(train), "seed": seed, "conv_weight_sq_norm": conv_weight_sq_norm(model.net),
            "poison_indices": poisoned.poison_indices.tolist()}
    save_run(out, model, meta, metrics=metrics, history=res.history, trigger_state=atk.trigger_state())
    return metrics


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


def run_purify(*, model: str | Path, method: str, out: str | Path, defense_params: dict | None = None,
               clean_fraction: float | None = None, clean_count: int | None = None, seed: int = 0,
               dataset: str | None = None, data_dir: str | None = None, arch: str | None = None,
               normalization: str | None = None, num_classes: int | None = None, unsafe_load: bool = False,
               attack: str | None = None, attack_params: dict | None = None, device="auto", resume: bool = False,
               quiet: bool = False, splits: DataSplits | None = None, epoch_eval: bool = True,
               epochs_budget: int | None = None) -> dict:
    """Erase a backdoor with ``method`` on a seeded clean subset of the training data; writes a run folder.

    ``epochs_budget`` gives every training stage of the defense that many epochs (explicit
    ``defense_params`` still win)."""
    dev = resolve_device(device)
    defenses.DEFENSES.config_class(method)  # fail fast on an unknown name
    src, meta = load_model(model, arch=arch, normalization=normalization, num_classes=num_classes,
                           unsafe_load=unsafe_load, device=dev)
    splits, data_rec = data_for(meta, dataset, data_dir, splits)
    if clean_fraction is None and clean_count is None:
        clean_fraction = 0.05
    params = dict(defense_params or {})
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
        params = {**defenses.epoch_budget_params(method, epochs_budget, len(data), params.get("batch_size")), **params}
    defense = defenses.create(method, **params)
    clean = data
    triggered = atk.triggered_test_set(splits.test) if atk else None
    if needs_poisoned:
        say(f"{defense.name}: trains on the poisoned training set ({int(data.poison_flag.sum())} of {len(data)} "
            "poisoned); the given model only fixes the architecture", quiet)
    else:
        say(f"{defense.name}: {len(clean)} clean images ({len(clean) / len(splits.train):.1%} of the training set, "
            f"seed {seed})", quiet)
    before = evaluate(src, splits.test, atk, triggered)
    eval_fn = (lambda m: evaluate(m, splits.test, atk, triggered)) if epoch_eval else None
    t0 = time.perf_counter()
    result = defense.purify(src, clean, run_dir=out, resume=resume, eval_fn=eval_fn, quiet=quiet)
    wall = time.perf_counter() - t0
    after = evaluate(result.model, splits.test, atk, triggered)
    metrics = {**after, "before": before, "wall_seconds": wall, **{k: v for k, v in result.info.items()
                                                                  if k in ("epochs", "steps", "total_epochs", "total_steps")}}
    source = {"model": str(Path(model).resolve()), "attack": atk.describe() if atk else None,
              "attack_run": str(src_dir.resolve()) if src_dir and meta.get("kind") == "attack"
              else meta.get("source", {}).get("attack_run"), "dataset": data_rec}
    run_meta = {"kind": "defense", "defense": defense.describe(), "defense_info": result.info, "seed": seed,
                "epochs_budget": epochs_budget,
                "dataset": data_rec, "attack": source["attack"], "source": source,
                "clean_subset": None if needs_poisoned else
                {"fraction": clean_fraction, "count": len(idx), "seed": seed, "indices": idx.tolist()}}
    save_run(out, result.model, run_meta, metrics=metrics, history=result.history,
             trigger_state=atk.trigger_state() if atk else None)
    for name, art in result.artifacts.items():
        save_run(Path(out) / name, art, {"kind": f"{defense.name}-{name}", "dataset": data_rec, "seed": seed})
    return metrics


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


def run_detect(*, model: str | Path, out: str | Path, detector: str = "neural-cleanse", params: dict | None = None,
               clean_fraction: float | None = None, clean_count: int | None = None, seed: int = 0,
               dataset: str | None = None, data_dir: str | None = None, arch: str | None = None,
               normalization: str | None = None, num_classes: int | None = None, unsafe_load: bool = False,
               device="auto", quiet: bool = False, splits: DataSplits | None = None) -> dict:
    """Run a backdoor detector (Neural Cleanse) on a model with a seeded clean subset; writes
    ``detect.json`` and a PNG of the reverse-engineered masks into ``out``."""
    from .defenses import DETECTORS, save_masks_png

    dev = resolve_device(device)
    det = DETECTORS.create(detector, **(params or {}))
    clf, meta = load_model(model, arch=arch, normalization=normalization, num_classes=num_classes,
                           unsafe_load=unsafe_load, device=dev)
    splits, data_rec = data_for(meta, dataset, data_dir, splits)
    if clean_fraction is None and clean_count is None:
        clean_fraction = 0.05
    idx = select_clean_subset(splits.train.labels, fraction=clean_fraction, count=clean_count, seed=seed,
                              num_classes=splits.train.num_classes)
    t0 = time.perf_counter()
    report = det.detect(clf, splits.train.subset(idx), device=dev, quiet=quiet)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"detector": detector, "config": config_to_dict(det.config), "model": str(Path(model).resolve()),
              "clean_subset": {"fraction": clean_fraction, "count": len(idx), "seed": seed},
              "seconds": time.perf_counter() - t0, **report.to_dict()}
    write_json(out / "detect.json", result)
    save_masks_png(report, out / "masks.png")
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
    atk = attack_for(meta, Path(model) if Path(model).is_dir() else None, attack, attack_params)
    metrics = evaluate(clf, splits.test, atk)
    if atk:
        metrics["attack"] = atk.describe()
    return metrics


def run_show_trigger(*, attack: str | None = None, attack_params: dict | None = None, run: str | Path | None = None,
                     dataset: str | None = "synthetic", data_dir: str | None = None, out: str | Path, count: int = 8,
                     amplify: float = 5.0, seed: int = 0, splits: DataSplits | None = None,
                     title: str | None = None) -> Path:
    """PNG of ``count`` test images of different non-target classes, clean and triggered.

    With ``run`` (an attack run folder) the trigger is the one recorded there, learned triggers
    included; otherwise ``attack`` is built and, where it needs fitting, fitted on the training split."""
    from .viz import trigger_figure

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
        atk.fit_trigger(splits.train, seed=seed, device="cpu")
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
    run_attack(dataset="synthetic", data_dir=None, arch="wrn-16-1", attack="badnets", train=train,
               out=out / "backdoored", seed=seed, device=device, quiet=quiet, splits=splits, epoch_eval=False)
    rows = {}
    for method in ("finetune", "nad"):
        m = run_purify(model=out / "backdoored", method=method, out=out / method, clean_fraction=DEMO_CLEAN_FRACTION,
                       seed=seed, device=device, quiet=quiet, splits=splits, epoch_eval=False)
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
DEMO_ATTACK_TRAIN = TrainConfig(epochs=6, batch_size=32, lr=0.05, weight_decay=5e-4, schedule="constant",
                                augment="none")
DEMO_CLEAN_FRACTION = 0.1
