"""The result contract: a run folder holds ``model.safetensors``, ``meta.json``, ``metrics.json``,
``history.csv`` (and ``trigger.safetensors`` when the trigger has state). Everything downstream reads it.
``runfolder`` makes its writes atomic and refuses folders whose files do not match their meta.json.

Models from elsewhere are untrusted files: safetensors load as data; ``.pt/.pth/.tar`` load only
through ``torch.load(weights_only=True)`` unless the caller opts in to full unpickling.
"""
from __future__ import annotations

import json
import pickle
import platform
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import __version__
from .classifier import Classifier, Normalization, nonfinite_summary
from .errors import NonFiniteModel, UserError
from .models import attention_sites, create_model
from .runfolder import check_files, check_meta_types, commit, describe_missing_meta, json_text, write_atomic
from .training import write_history

MODEL_FILE = "model.safetensors"
META_FILE = "meta.json"
METRICS_FILE = "metrics.json"
HISTORY_FILE = "history.csv"
TRIGGER_FILE = "trigger.safetensors"
PICKLE_SUFFIXES = (".pt", ".pth", ".tar", ".ckpt", ".bin", ".pkl")


def save_run(run_dir: str | Path, model: Classifier, meta: dict, *, metrics: dict | None = None,
             history: list[dict] | None = None, trigger_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a run folder as one change (see ``runfolder.commit``); ``meta`` is extended with the model's
    description and provenance."""
    run_dir = Path(run_dir)
    state = {k: v.detach().cpu().contiguous() for k, v in model.net.state_dict().items()}
    full_meta = {**model.describe(), **meta, "toolkit_version": __version__, "torch_version": torch.__version__,
                 "python_version": platform.python_version(), "written_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    files = {MODEL_FILE: lambda p: save_file(state, str(p))}
    if history is not None:
        files[HISTORY_FILE] = lambda p: write_history(p, history)
    if trigger_state:
        trigger = {k: v.detach().cpu().contiguous() for k, v in trigger_state.items()}
        files[TRIGGER_FILE] = lambda p: save_file(trigger, str(p))
    if metrics is not None:
        files[METRICS_FILE] = lambda p: p.write_text(json_text(metrics))
    commit(run_dir, files, full_meta, replaces=(HISTORY_FILE, TRIGGER_FILE))
    return run_dir


def write_json(path: Path, obj) -> None:
    write_atomic(Path(path), lambda p: p.write_text(json_text(obj)))


def read_meta(run_dir: str | Path) -> dict:
    """meta.json of a run folder, checked: its types, and that the files it lists are the ones present."""
    run_dir = Path(run_dir)
    path = run_dir / META_FILE
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(describe_missing_meta(run_dir)) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); the run folder is damaged: restore it or rebuild it "
                        "with --overwrite") from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    check_meta_types(meta, path)
    check_files(run_dir, meta)
    return meta


def read_trigger_state(run_dir: str | Path) -> dict[str, torch.Tensor]:
    path = Path(run_dir) / TRIGGER_FILE
    if not path.exists():
        return {}
    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001  (safetensors raises its own error types)
        raise UserError(f"cannot read {path} as safetensors ({exc}); the run folder is damaged: restore it or "
                        "rebuild it with --overwrite") from None


def read_state_dict(path: str | Path, *, unsafe_load: bool = False) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors or pickle checkpoint, refusing anything that needs code to run."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"model file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types
            raise UserError(f"cannot read {path} as safetensors: {exc}") from None
    if path.suffix not in PICKLE_SUFFIXES:
        raise UserError(f"unknown model file type {path.suffix!r}; use .safetensors or one of {', '.join(PICKLE_SUFFIXES)}")
    with open(path, "rb") as fh:
        head = fh.read(2)
    # torch.save writes a zip archive (or, before torch 1.6, a protocol-2 pickle); anything else is damaged
    # and would otherwise be reported as needing --unsafe-load.
    if head != b"PK" and head[:1] != b"\x80":
        raise UserError(f"cannot read checkpoint {path}: it is neither a PyTorch zip archive nor a pickle "
                        "(damaged, or another format)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not unsafe_load)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unsupported content"
        raise UserError(f"{path} needs full unpickling, which can run arbitrary code ({first[:160]}); "
                        "if you trust this file, pass --unsafe-load (unsafe_load=True)") from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise UserError(f"cannot read checkpoint {path}: {exc}") from None
    return extract_state_dict(obj, path)


def extract_state_dict(obj, path: Path | str = "checkpoint") -> dict[str, torch.Tensor]:
    """Accept a bare state dict, or a dict holding one under ``state_dict`` (or ``model``/``net``);
    a whole pickled ``nn.Module`` (only with --unsafe-load) gives its state dict. Strips ``module.``."""
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model", "net"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path} holds no state dict (expected a dict of tensors, or one under 'state_dict')")
    if all(k.startswith("module.") for k in obj):  # saved from DataParallel
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def load_into(net: torch.nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """``load_state_dict(strict=True)`` with an error that lists what does not fit."""
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)}≠{tuple(own[k].shape)}" for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        def fmt(items):
            return ", ".join(items[:8]) + (f" … (+{len(items) - 8})" if len(items) > 8 else "")
        parts = []
        if missing:
            parts.append(f"missing keys: {fmt(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {fmt(unexpected)}")
        if wrong:
            parts.append(f"shape mismatches: {fmt(wrong)}")
        raise UserError(f"{source} does not fit the architecture; " + "; ".join(parts))
    net.load_state_dict(state, strict=True)


def infer_num_classes(state: dict[str, torch.Tensor]) -> int | None:
    """Rows of the last 2-D weight (the classifier), if any."""
    weights = [v for k, v in state.items() if k.endswith("weight") and v.ndim == 2]
    return int(weights[-1].shape[0]) if weights else None


def load_model(path: str | Path, *, arch: str | None = None, num_classes: int | None = None,
               normalization: str | Normalization | None = None, classes: list[str] | None = None,
               input_shape: tuple[int, int, int] | None = None, sites: list[str] | None = None,
               unsafe_load: bool = False, device: str | torch.device = "cpu") -> tuple[Classifier, dict]:
    """Load a run folder, or a bare checkpoint file (then ``arch`` is required).

    Returns the classifier and the run's meta (``{}`` for a bare file). Explicit arguments override meta.
    """
    path = Path(path)
    meta: dict = {}
    if path.is_dir():
        meta = read_meta(path)
        weights = path / MODEL_FILE
        if not weights.exists():
            raise UserError(f"run folder {path} has no {MODEL_FILE}")
    elif path.exists():
        weights = path
    else:
        raise UserError(f"model path {str(path)!r} does not exist")
    arch = arch or meta.get("arch")
    if not arch:
        raise UserError(f"{path} is a bare checkpoint: say which architecture it is with --arch")
    state = read_state_dict(weights, unsafe_load=unsafe_load)
    broken = nonfinite_summary(state)
    if broken:
        raise NonFiniteModel(f"{weights} holds non-finite weights ({broken}): the model is broken (e.g. its training "
                             "diverged) and cannot be evaluated, searched or purified")
    hint_channels, hint_classes = arch_shape_hints(arch, state)
    num_classes = num_classes or meta.get("num_classes") or hint_classes or infer_num_classes(state) or 10
    if input_shape is None:
        input_shape = tuple(meta["input_shape"]) if "input_shape" in meta else None
    in_channels = input_shape[0] if input_shape else hint_channels or _infer_in_channels(state)
    net = create_model(arch, num_classes=num_classes, in_channels=in_channels)
    load_into(net, state, str(weights))
    if isinstance(normalization, str) or normalization is None:
        norm = Normalization.parse(normalization) if normalization is not None else \
            Normalization.from_dict(meta.get("normalization"))
    else:
        norm = normalization
    classes = classes or meta.get("classes") or [str(i) for i in range(num_classes)]
    if len(classes) != num_classes:
        raise UserError(f"{len(classes)} class names for a model with {num_classes} outputs")
    sites = sites or meta.get("sites") or list(getattr(net, "attention_sites", []) or [])
    model = Classifier(net, arch, list(classes), norm, list(sites), tuple(input_shape or (in_channels, 32, 32)))
    model.to(device)
    net.eval()
    return model, meta


def arch_shape_hints(arch: str, state: dict[str, torch.Tensor]) -> tuple[int | None, int | None]:
    """Input channels and classes of a checkpoint of ``arch``, read from the architecture's own first conv
    and last linear weight by name: key order proves nothing (safetensors sorts keys alphabetically)."""
    try:
        probe = create_model(arch, num_classes=10, in_channels=3).state_dict()
    except UserError:
        return None, None
    convs = [k for k, v in probe.items() if v.ndim == 4]
    linears = [k for k, v in probe.items() if v.ndim == 2]
    first = state.get(convs[0]) if convs else None
    last = state.get(linears[-1]) if linears else None
    return (int(first.shape[1]) if first is not None and first.ndim == 4 else None,
            int(last.shape[0]) if last is not None and last.ndim == 2 else None)


def _infer_in_channels(state: dict[str, torch.Tensor]) -> int:
    first = next((v for v in state.values() if v.ndim == 4), None)
    return int(first.shape[1]) if first is not None else 3


def new_model(arch: str, classes: list[str], input_shape: tuple[int, int, int], normalization: Normalization,
              device="cpu", seed: int = 0) -> Classifier:
    """A freshly initialised classifier (initialisation fixed by ``seed``)."""
    torch.manual_seed(seed)
    net = create_model(arch, num_classes=len(classes), in_channels=input_shape[0])
    sites = attention_sites(net) if getattr(net, "attention_sites", None) else []
    return Classifier(net, arch, list(classes), normalization, sites, tuple(input_shape)).to(device)
