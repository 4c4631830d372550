"""``backdoor-eraser`` command line: demo, attack, purify, evaluate, attacks, defenses.

Attack and defense parameters are the fields of their config dataclasses, given as extra
``--name value`` flags (see ``backdoor-eraser attacks`` / ``defenses``) or in a YAML file (``--params``).
"""
from __future__ import annotations

import argparse
import json
import sys

from . import __version__, attacks, defenses
from .errors import UserError
from .params import coerce, describe_params, parse_param_flags, read_yaml_params
from .registry import build_config, config_fields, json_ready
from .training import ATTACK_TRAINING, TrainConfig


def _add_common(p: argparse.ArgumentParser):
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--seed", type=int, default=0, help="fixes the clean subset, poisoning and training (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def _add_model_source(p: argparse.ArgumentParser):
    p.add_argument("--model", required=True, help="a run folder, or a checkpoint file (.safetensors/.pt/.pth/.tar)")
    p.add_argument("--arch", help="architecture of a bare checkpoint, e.g. wrn-16-1")
    p.add_argument("--num-classes", type=int, help="classes of a bare checkpoint (default: from its last layer)")
    p.add_argument("--normalization", help="input normalisation of a bare checkpoint: none (raw [0,1], as the "
                   "NAD-family releases), cifar10, imagenet, mnist, or M1,M2,M3:S1,S2,S3")
    p.add_argument("--unsafe-load", action="store_true",
                   help="allow full unpickling of a .pt file (runs code from the file: only for files you trust)")
    p.add_argument("--dataset", help="data set name (default: the one recorded in the run folder)")
    p.add_argument("--data-dir", help="data folder (default: the one recorded in the run folder)")


TRAIN_HELP = {
    "step_size": "epochs per step (schedule=step)",
    "gamma": "lr factor per step/milestone",
    "milestones": "comma-separated epochs (schedule=multistep)",
    "augment": "steps joined with '+': crop, flip, cutout (e.g. crop+flip+cutout); crop-flip or none",
    "cutout_holes": "Cutout holes per image (with augment ...+cutout)",
    "cutout_length": "Cutout length: the releases' 3 zeroes a 2x2 square",
    "channels_last": "channels-last memory layout (faster convolutions on CPU)",
    "amp": "auto: bf16 autocast where the CPU/GPU runs bf16 natively, else fp32; bf16; none (fp32)",
    "amp_strict": "with --amp bf16: fail instead of falling back to fp32 where bf16 is not native",
}


def _add_train(p: argparse.ArgumentParser, defaults: dict):
    """One flag per TrainConfig field (the seed comes from --seed), so the two never drift apart."""
    g = p.add_argument_group("training (TrainConfig)")
    for name, typ, default in config_fields(TrainConfig):
        if name == "seed":
            continue
        value = defaults.get(name, default)
        flag = "--" + name.replace("_", "-")
        shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
        help_text = f"{TRAIN_HELP.get(name, '')} (default {shown})".strip()

        def read(text, typ=typ, default=default, name=name):
            return coerce(text, typ, default, name)

        if isinstance(default, bool):
            g.add_argument(flag, dest=f"train_{name}", nargs="?", const="true", default=value, type=read,
                           metavar="BOOL", help=help_text)
        else:
            g.add_argument(flag, dest=f"train_{name}", default=value, type=read, metavar=name.upper(), help=help_text)
    # Kept from before every field had its own flag.
    g.add_argument("--no-nesterov", dest="train_nesterov", action="store_false", help=argparse.SUPPRESS)


def _train_config(a) -> TrainConfig:
    values = {name: getattr(a, f"train_{name}") for name, _, _ in config_fields(TrainConfig) if name != "seed"}
    return build_config(TrainConfig, {**values, "seed": a.seed}, what="training")


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False everywhere: a defense's --epochs or NAD's --p must never be read as a prefix of
    # --epochs-budget or --params.
    ap = argparse.ArgumentParser(prog="backdoor-eraser", description=__doc__, allow_abbrev=False,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", allow_abbrev=False, help="backdoor a model on built-in synthetic data and erase it with NAD (a few minutes on CPU)")
    p.add_argument("--out", default="runs/demo")
    _add_common(p)

    p = sub.add_parser("attack", allow_abbrev=False, help="train a backdoored model; extra --name value flags set attack parameters")
    p.add_argument("--dataset", required=True, help="cifar10, gtsrb, mnist, folder, synthetic")
    p.add_argument("--data-dir", help="data folder or archive (see README)")
    p.add_argument("--download", action="store_true", help="download the data set when missing (cifar10)")
    p.add_argument("--arch", default="wrn-16-1")
    p.add_argument("--attack", required=True)
    p.add_argument("--params", help="YAML file of attack parameters (flags override it)")
    p.add_argument("--normalization", default="none", help="input normalisation stored with the model (default none)")
    p.add_argument("--out", required=True)
    p.add_argument("--resume", action="store_true", help="continue the same job from the run folder's last epoch "
                   "checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace what --out holds (its old files are deleted first)")
    p.add_argument("--no-epoch-eval", action="store_true", help="skip test-set metrics after each epoch")
    _add_train(p, ATTACK_TRAINING)
    _add_common(p)

    p = sub.add_parser("purify", allow_abbrev=False, help="erase a backdoor; extra --name value flags set defense parameters")
    _add_model_source(p)
    p.add_argument("--method", required=True, help=f"one of: {', '.join(defenses.names())}")
    p.add_argument("--params", help="YAML file of defense parameters (flags override it)")
    p.add_argument("--preset", help="a named recipe of the defense (paper, release; see backdoor-eraser defenses); "
                   "explicit parameters override it")
    p.add_argument("--clean-fraction", type=float, help="share of the training set the defender holds (default 0.05)")
    p.add_argument("--clean-count", type=int, help="number of clean images instead of a fraction")
    p.add_argument("--epochs-budget", type=int, help="give every training stage of the defense this many epochs "
                   "(for equal-budget comparisons; explicit epoch flags win)")
    p.add_argument("--attack", help="attack to measure ASR with (default: the one recorded with the model)")
    p.add_argument("--target", type=int, help="attack target class (with --attack)")
    p.add_argument("--out", required=True)
    p.add_argument("--resume", action="store_true", help="continue the same job from the run folder's last "
                   "checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace what --out holds (its old files are deleted first)")
    p.add_argument("--no-epoch-eval", action="store_true", help="skip test-set metrics after each epoch")
    p.add_argument("--val-curves", action="store_true", help="also record ACC, ASR and RA on the validation images "
                   "(training images outside the clean subset and the poisoned ones) after each epoch, as val_acc, "
                   "val_asr, val_ra in history.csv: the curves to choose a recipe on")
    _add_common(p)

    p = sub.add_parser("evaluate", allow_abbrev=False, help="ACC, ASR and RA of a model; extra --name value flags set attack parameters")
    _add_model_source(p)
    p.add_argument("--attack", help="attack to measure ASR with (default: the one recorded with the model)")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    _add_common(p)

    p = sub.add_parser("show-trigger", allow_abbrev=False, help="write a PNG of clean and triggered examples; extra --name value "
                       "flags set attack parameters")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--attack", help="attack name: its trigger is built (or fitted) from scratch")
    src.add_argument("--run", help="attack run folder: show the trigger it was trained with (learned ones included)")
    p.add_argument("--dataset", help="data set (default: synthetic, or the one recorded in --run)")
    p.add_argument("--data-dir")
    p.add_argument("--params", help="YAML file of attack parameters (flags override it)")
    p.add_argument("--count", type=int, default=8, help="number of example images (default 8)")
    p.add_argument("--amplify", type=float, default=5.0, help="factor for the difference row (default 5)")
    p.add_argument("--out", required=True, help="PNG path")
    _add_common(p)

    p = sub.add_parser("detect", allow_abbrev=False, help="check a model for a backdoor with Neural Cleanse; extra --name value "
                       "flags set detector parameters")
    _add_model_source(p)
    p.add_argument("--detector", default="neural-cleanse")
    p.add_argument("--params", help="YAML file of detector parameters (flags override it)")
    p.add_argument("--clean-fraction", type=float, help="share of the training set used (default 0.05)")
    p.add_argument("--clean-count", type=int)
    p.add_argument("--out", required=True, help="folder for detect.json and masks.png")
    p.add_argument("--resume", action="store_true", help="continue the per-class trigger searches from their "
                   "checkpoints")
    p.add_argument("--overwrite", action="store_true", help="replace what --out holds (its old files are deleted first)")
    _add_common(p)

    p = sub.add_parser("bench", allow_abbrev=False, help="run a benchmark grid (a built-in spec or a YAML file); rerun to resume")
    p.add_argument("spec", nargs="?", help="built-in spec name (see --list) or a YAML spec file")
    p.add_argument("--list", action="store_true", help="list the built-in specs")
    p.add_argument("--out", help="grid folder: store, cell run folders, report (default runs/<spec name>)")
    p.add_argument("--data-dir", action="append", help="data folder for every data set, or NAME=DIR per data set "
                   "(repeatable)")
    p.add_argument("--only", nargs="+", metavar="AXIS=V1,V2",
                   help="run only the cells these axis values select (the report still covers the whole spec), "
                        "e.g. --only attack=badnets,blend defense=finetune,nad seed=0")
    p.add_argument("--zoo", help="folder of attack run folders: attack entries with a zoo name use DIR/NAME "
                   "when it exists instead of training")
    p.add_argument("--workers", type=int, default=1, help="local worker processes (default 1)")
    p.add_argument("--executor", choices=("local", "ray"), default="local")
    p.add_argument("--ray-address", help="Ray cluster address (default: start a local Ray)")
    p.add_argument("--cpus-per-cell", type=float, default=1.0, help="Ray CPUs per cell (default 1)")
    p.add_argument("--gpus-per-cell", type=float, default=0.0, help="Ray GPUs per cell (default 0)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--retry-failed", action="store_true", help="run failed cells again")
    p.add_argument("--dry-run", action="store_true", help="set the cells up in the store and stop")
    p.add_argument("--no-report", action="store_true", help="do not write the report at the end")

    p = sub.add_parser("report", allow_abbrev=False, help="(re)build report.html, results.md and results.csv of a grid folder from its store")
    p.add_argument("folder", help="grid folder (the --out of bench)")
    p.add_argument("--spec", help="spec name (default: the only one in the store)")
    p.add_argument("--no-figures", action="store_true", help="tables only (faster)")

    sub.add_parser("attacks", allow_abbrev=False, help="list attacks and their parameters")
    sub.add_parser("defenses", allow_abbrev=False, help="list defenses and detectors and their parameters")
    return ap


def _params(registry, name: str | None, yaml_path: str | None, rest: list[str], extra: dict | None = None) -> dict:
    if not name:
        if rest:
            raise UserError(f"unexpected arguments {' '.join(rest)}")
        return {}
    cfg_cls = registry.config_class(name)
    params = read_yaml_params(yaml_path)
    params.update(extra or {})
    params.update(parse_param_flags(cfg_cls, rest, f"{registry.kind} {name!r}"))
    return params


def _listing(registry) -> str:
    out = []
    for name in registry.names():
        out.append(f"{name}: {registry.summary(name)}")
        out += ["    " + line for line in describe_params(registry.config_class(name))]
        for preset, values in sorted(getattr(registry.get(name), "presets", {}).items()):
            shown = ", ".join(f"{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in values.items())
            out.append(f"    preset {preset}: {shown}")
    return "\n".join(out)


def _print_metrics(m: dict):
    def pct(k):
        return f"{100 * m[k]:.2f}%" if k in m else "-"
    print(f"ACC {pct('acc')}  ACC(non-target) {pct('acc_nontarget')}  ASR {pct('asr')}  RA {pct('ra')}")


def _one_line(exc: BaseException) -> str:
    # Messages quoting a parser (YAML, safetensors) may span lines; the CLI promises one.
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip())


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args, rest = ap.parse_known_args(argv)
    try:
        return _run(args, rest)
    except UserError as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:
        # The file system failed outside a job's run folder (a PNG path, a data cache, a grid store).
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _run(args, rest) -> int:
    from . import workflows

    cmd = args.command
    if cmd in ("demo", "attacks", "defenses", "bench", "report") and rest:
        raise UserError(f"unexpected arguments: {' '.join(rest)}")
    if cmd == "attacks":
        print(_listing(attacks.ATTACKS))
        return 0
    if cmd == "defenses":
        print(_listing(defenses.DEFENSES))
        print("\ndetectors (backdoor-eraser detect):")
        print(_listing(defenses.DETECTORS))
        return 0
    if cmd == "bench":
        from .grid import bench
        if args.list:
            print(bench.listing())
            return 0
        if not args.spec:
            raise UserError("name a spec: a built-in one (backdoor-eraser bench --list) or a YAML file")
        counts = bench.run_bench(args.spec, out=args.out, data_dirs=args.data_dir, only=args.only, zoo=args.zoo,
                                 workers=args.workers, executor=args.executor, ray_address=args.ray_address,
                                 cpus_per_cell=args.cpus_per_cell, gpus_per_cell=args.gpus_per_cell,
                                 device=args.device, retry_failed=args.retry_failed, dry_run=args.dry_run,
                                 report=not args.no_report and not args.dry_run)
        return 1 if counts.get("failed") else 0
    if cmd == "report":
        from .grid import bench
        paths = bench.run_report(args.folder, spec=args.spec, figures=not args.no_figures)
        for kind, path in paths.items():
            print(f"{kind}: {path}")
        return 0
    if cmd == "demo":
        workflows.run_demo(args.out, device=args.device, seed=args.seed, quiet=args.quiet)
        return 0
    if cmd == "attack":
        params = _params(attacks.ATTACKS, args.attack, args.params, rest)
        metrics = workflows.run_attack(
            dataset=args.dataset, data_dir=args.data_dir, arch=args.arch, attack=args.attack, attack_params=params,
            train=_train_config(args), out=args.out, seed=args.seed, device=args.device,
            normalization=args.normalization, data_options={"download": True} if args.download else None,
            resume=args.resume, overwrite=args.overwrite, epoch_eval=not args.no_epoch_eval, quiet=args.quiet)
        _print_metrics(metrics)
        print(f"run folder: {args.out}")
        return 0
    if cmd == "purify":
        if args.clean_fraction is not None and args.clean_count is not None:
            raise UserError("give --clean-fraction or --clean-count, not both")
        if args.clean_fraction is not None and not 0 < args.clean_fraction <= 1:
            raise UserError(f"--clean-fraction must be in (0, 1], got {args.clean_fraction}")
        attack_params = {"target": args.target} if args.target is not None else {}
        if args.target is not None and not args.attack:
            raise UserError("--target needs --attack")
        params = _params(defenses.DEFENSES, args.method, args.params, rest)
        metrics = workflows.run_purify(
            model=args.model, method=args.method, out=args.out, defense_params=params,
            clean_fraction=args.clean_fraction, clean_count=args.clean_count, seed=args.seed, dataset=args.dataset,
            data_dir=args.data_dir, arch=args.arch, normalization=args.normalization, num_classes=args.num_classes,
            unsafe_load=args.unsafe_load, attack=args.attack, attack_params=attack_params, device=args.device,
            resume=args.resume, quiet=args.quiet, epoch_eval=not args.no_epoch_eval, epochs_budget=args.epochs_budget,
            preset=args.preset, overwrite=args.overwrite, val_curves=args.val_curves)
        print("before: ", end="")
        _print_metrics(metrics["before"])
        print("after:  ", end="")
        _print_metrics(metrics)
        print(f"run folder: {args.out}")
        return 0
    if cmd == "show-trigger":
        if args.run:
            if rest or args.params:
                raise UserError("--run shows the recorded trigger; attack parameters cannot be changed")
            path = workflows.run_show_trigger(run=args.run, dataset=args.dataset, data_dir=args.data_dir,
                                              out=args.out, count=args.count, amplify=args.amplify, seed=args.seed,
                                              device=args.device)
        else:
            params = _params(attacks.ATTACKS, args.attack, args.params, rest)
            path = workflows.run_show_trigger(attack=args.attack, attack_params=params,
                                              dataset=args.dataset or "synthetic", data_dir=args.data_dir,
                                              out=args.out, count=args.count, amplify=args.amplify, seed=args.seed,
                                              device=args.device)
        print(f"wrote {path}")
        return 0
    if cmd == "detect":
        from .defenses import DETECTORS
        params = _params(DETECTORS, args.detector, args.params, rest)
        res = workflows.run_detect(
            model=args.model, out=args.out, detector=args.detector, params=params,
            clean_fraction=args.clean_fraction, clean_count=args.clean_count, seed=args.seed, dataset=args.dataset,
            data_dir=args.data_dir, arch=args.arch, normalization=args.normalization, num_classes=args.num_classes,
            unsafe_load=args.unsafe_load, device=args.device, quiet=args.quiet, overwrite=args.overwrite,
            resume=args.resume)
        flagged = res.get("flagged") or []
        print(f"anomaly index {res.get('mad_index', float('nan')):.2f}; flagged classes: "
              f"{', '.join(map(str, flagged)) if flagged else 'none'}  ({args.out}/detect.json)")
        return 0
    if cmd == "evaluate":
        params = _params(attacks.ATTACKS, args.attack, None, rest)
        metrics = workflows.run_evaluate(
            model=args.model, attack=args.attack, attack_params=params, dataset=args.dataset, data_dir=args.data_dir,
            arch=args.arch, normalization=args.normalization, num_classes=args.num_classes,
            unsafe_load=args.unsafe_load, device=args.device)
        if args.json:
            print(json.dumps(json_ready(metrics), indent=2))
        else:
            _print_metrics(metrics)
        return 0
    raise UserError(f"unknown command {cmd}")


if __name__ == "__main__":
    sys.exit(main())
