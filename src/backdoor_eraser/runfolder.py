"""Run-folder integrity: exclusive use, refusing to clobber, resume checks and atomic commits.

A job (attack, purify, detect) *claims* its ``--out`` folder for as long as it runs: it takes an
exclusive ``flock`` on ``.lock`` (a second job into the same folder fails at once), proves the folder
writable before any work, and refuses a folder that already holds files unless it resumes
(``--resume``) or replaces it (``--overwrite`` clears it first). ``job.json`` records the job's
configuration before any work, so ``--resume`` can refuse a different job, also after an interruption
that left only a checkpoint.

A folder is *complete* when its ``meta.json`` lists the files written with it (``files``: name →
size and sha256) and they match. :func:`commit` stages every file under a temporary name, removes the
old ``meta.json`` and ``metrics.json``, renames the staged files into place, then ``meta.json``, then
``metrics.json``: a failed write leaves either the old folder (failure while staging) or one that
readers refuse as incomplete, never new weights beside old metadata; ``metrics.json`` existing means
done. Folders from before the ``files`` list (zoo/fragile) have none and are read as they are.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Callable

import torch

from .errors import UserError
from .registry import json_ready

LOCK_FILE = ".lock"
JOB_FILE = "job.json"
META_FILE = "meta.json"
METRICS_FILE = "metrics.json"
STAGED_SUFFIX = ".partial"
# Files a job writes before its results; a folder holding only these has nothing to resume or lose.
BOOKKEEPING = frozenset({LOCK_FILE, JOB_FILE})
# Any of these at the top level makes a folder recognisably the toolkit's, so --overwrite may clear it.
RUN_FOLDER_MARKS = frozenset({META_FILE, METRICS_FILE, JOB_FILE, "model.safetensors", "checkpoint.pt", "detect.json"})
FIX = "rerun the job with --resume to finish it, or with --overwrite to start over"
AFTER_FULL_DISK = "free some space, then rerun the job (attack, purify: with --resume)"


class RunFolderError(UserError):
    """A run folder that is busy, unwritable, incomplete, inconsistent or from another job."""


def staged_name(name: str) -> str:
    return f".{name}{STAGED_SUFFIX}"


def file_record(path: Path) -> dict:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return {"size": path.stat().st_size, "sha256": h.hexdigest()}


def json_text(obj) -> str:
    return json.dumps(json_ready(obj), indent=2, allow_nan=False) + "\n"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` then rename onto ``path``: readers see the old file or the whole new one."""
    path = Path(path)
    tmp = path.with_name(staged_name(path.name))
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def commit(run_dir: Path, files: dict[str, Callable[[Path], None]], meta: dict, *,
           replaces: tuple[str, ...] = ()) -> None:
    """Write ``files`` (name → writer of a path) and ``meta.json`` (with their ``files`` list) as one
    change; ``replaces`` names files of an earlier commit to remove when this one has none of them."""
    run_dir.mkdir(parents=True, exist_ok=True)
    staged: dict[str, Path] = {}
    try:
        for name, write in files.items():
            staged[name] = run_dir / staged_name(name)
            write(staged[name])
            _fsync(staged[name])
        record = {**meta, "files": {name: file_record(tmp) for name, tmp in staged.items()}}
        staged[META_FILE] = run_dir / staged_name(META_FILE)
        staged[META_FILE].write_text(json_text(record))
        _fsync(staged[META_FILE])
        # From here on the old folder is gone: readers find it incomplete until meta.json is in place.
        (run_dir / METRICS_FILE).unlink(missing_ok=True)
        (run_dir / META_FILE).unlink(missing_ok=True)
        for name in replaces:
            if name not in staged:
                (run_dir / name).unlink(missing_ok=True)
        last = [n for n in (META_FILE, METRICS_FILE) if n in staged]
        for name in [n for n in staged if n not in last] + last:
            os.replace(staged.pop(name), run_dir / name)
    except BaseException:
        for tmp in staged.values():
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):
        _fsync(run_dir)


def check_files(run_dir: Path, meta: dict) -> None:
    """Refuse a folder whose files differ from the ``files`` list of its meta.json."""
    for name, want in (meta.get("files") or {}).items():
        path = run_dir / name
        if not path.is_file():
            raise RunFolderError(f"run folder {run_dir} is incomplete: {name} is missing (a write was "
                                 f"interrupted); {FIX}")
        got = file_record(path)
        if got != want:
            raise RunFolderError(f"run folder {run_dir} is inconsistent: {name} is not the file its meta.json "
                                 f"records (changed, damaged or from another run); {FIX}")


def describe_missing_meta(run_dir: Path) -> str:
    names = {p.name for p in run_dir.iterdir()} if run_dir.is_dir() else set()
    if "model.safetensors" in names or any(n.endswith(STAGED_SUFFIX) for n in names):
        return f"run folder {run_dir} is incomplete: its last write was interrupted before meta.json; {FIX}"
    if names & {"checkpoint.pt", JOB_FILE}:
        return (f"run folder {run_dir} holds an unfinished job (no meta.json yet: still running or "
                f"interrupted); {FIX}")
    return f"{str(run_dir)!r} is not a run folder: it has no {META_FILE}"


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _numbers(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)


def _strings(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _named(v) -> bool:
    return isinstance(v, dict) and isinstance(v.get("name"), str) and isinstance(v.get("config", {}), dict)


def _dataset(v) -> bool:
    return isinstance(v, dict) and isinstance(v.get("name"), str) and isinstance(v.get("data_dir"), (str, type(None))) \
        and isinstance(v.get("options", {}), (dict, type(None)))


def _normalization(v) -> bool:
    return isinstance(v, dict) and all(v.get(k) is None or _numbers(v.get(k)) for k in ("mean", "std"))


def _file_list(v) -> bool:
    return isinstance(v, dict) and all(isinstance(r, dict) and _is_int(r.get("size")) and isinstance(r.get("sha256"), str)
                                       for r in v.values())


# What each meta.json key must hold (a missing key is fine; None is fine where it says so).
META_TYPES: dict[str, tuple[Callable[[object], bool], str, bool]] = {
    "arch": (lambda v: isinstance(v, str) and v != "", "an architecture name", False),
    "num_classes": (lambda v: _is_int(v) and v >= 1, "an integer ≥ 1", False),
    "classes": (_strings, "a list of class names", False),
    "normalization": (_normalization, "{'mean': [...], 'std': [...]} or nulls", True),
    "sites": (_strings, "a list of module names", False),
    "input_shape": (lambda v: isinstance(v, list) and len(v) == 3 and all(_is_int(x) and x > 0 for x in v),
                    "[channels, height, width]", False),
    "kind": (lambda v: isinstance(v, str), "a string", False),
    "dataset": (_dataset, "{'name': ..., 'data_dir': ..., 'options': {...}}", True),
    "attack": (_named, "{'name': ..., 'config': {...}}", True),
    "defense": (_named, "{'name': ..., 'config': {...}}", True),
    "train": (lambda v: isinstance(v, dict), "a mapping", True),
    "seed": (_is_int, "an integer", True),
    "poison_indices": (lambda v: isinstance(v, list) and all(_is_int(x) for x in v), "a list of integers", True),
    "source": (lambda v: isinstance(v, dict), "a mapping", True),
    "clean_subset": (lambda v: isinstance(v, dict), "a mapping", True),
    "files": (_file_list, "a mapping of file names to {'size', 'sha256'}", False),
}


def check_meta_types(meta, path: Path) -> None:
    if not isinstance(meta, dict):
        raise RunFolderError(f"{path} holds no mapping; the run folder is damaged: restore it or rebuild it with "
                             "--overwrite")
    for key, (ok, what, nullable) in META_TYPES.items():
        if key in meta and not (meta[key] is None and nullable) and not ok(meta[key]):
            shown = json.dumps(meta[key])[:60]
            raise RunFolderError(f"{path}: {key!r} must be {what}, not {shown}; the run folder is damaged: restore "
                                 "it or rebuild it with --overwrite")
    source = meta.get("source")
    if isinstance(source, dict):
        for key, ok in (("attack", _named), ("dataset", _dataset), ("attack_run", lambda v: isinstance(v, str)),
                        ("model", lambda v: isinstance(v, str))):
            if source.get(key) is not None and not ok(source[key]):
                raise RunFolderError(f"{path}: 'source.{key}' has the wrong type ({json.dumps(source[key])[:60]}); "
                                     "the run folder is damaged: restore it or rebuild it with --overwrite")


# ---------------------------------------------------------------------------------------------- claiming

def _os_reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def write_fault(exc: BaseException, out: Path) -> UserError | None:
    """The one-line error for a failed write under ``out`` (disk full, no permission), or None."""
    if isinstance(exc, OSError):
        where = str(exc.filename or out)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return RunFolderError(f"cannot write {where}: {_os_reason(exc)}; {AFTER_FULL_DISK}")
        inside = Path(os.path.abspath(where)).is_relative_to(os.path.abspath(out))
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return RunFolderError(f"cannot access {where}: {_os_reason(exc)}; fix its permissions"
                                  + (" or choose another --out" if inside else ""))
        return RunFolderError(f"{where}: {_os_reason(exc)}")
    # torch.save reports a failed write as a RuntimeError from its zip writer ("PytorchStreamWriter
    # failed writing file", or an enforce failure such as "unexpected pos 704 vs 598").
    text = str(exc)
    if isinstance(exc, RuntimeError) and ("PytorchStreamWriter" in text or "file write failed" in text
                                          or ("inline_container" in text and "unexpected pos" in text)):
        first = text.strip().splitlines()[0][:160]
        return RunFolderError(f"cannot write a checkpoint under {out} ({first}); the disk may be full: "
                              f"{AFTER_FULL_DISK}")
    return None


def _looks_like_run_folder(names: set[str]) -> bool:
    return bool(names & RUN_FOLDER_MARKS) or any(n.endswith(STAGED_SUFFIX) for n in names)


def _clear(out: Path, names: list[str]) -> None:
    for name in names:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


@contextlib.contextmanager
def claim(out: str | Path, *, resume: bool = False, overwrite: bool = False, source: str | Path | None = None):
    """Hold ``out`` for one job (see the module docstring); ``source`` is a model the job reads, which
    ``out`` must not contain."""
    out = Path(out)
    if resume and overwrite:
        raise UserError("give --resume or --overwrite, not both")
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"--out {out} is a file, not a folder")
    if source is not None:
        src, dst = Path(source).resolve(), out.resolve()
        if src == dst or dst in src.parents:
            raise UserError(f"--out {out} holds the model being read ({source}); choose another folder")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()
        raise RunFolderError(f"cannot write the run folder {out}: {_os_reason(exc)}; choose a writable --out") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise RunFolderError(f"run folder {out} is in use by another job (pid {holder}); wait for it to "
                                 "end or choose another --out") from None
        except OSError:
            pass  # a file system without flock: the job runs unlocked rather than not at all
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            os.fsync(fd)
        except OSError as exc:
            raise write_fault(exc, out) from None
        _admit(out, resume, overwrite)
        try:
            yield out
        except BaseException:
            _tidy_after_failure(out, created)
            raise
    finally:
        os.close(fd)


def _admit(out: Path, resume: bool, overwrite: bool) -> None:
    names = {p.name for p in out.iterdir()}
    others = sorted(names - BOOKKEEPING)
    if not others:
        return
    shown = ", ".join(others[:4]) + (" …" if len(others) > 4 else "")
    if not _looks_like_run_folder(names):
        raise RunFolderError(f"--out {out} holds other files ({shown}) and is no run folder; choose a new or "
                             "empty folder")
    if overwrite:
        _clear(out, others + [JOB_FILE] * (JOB_FILE in names))
    elif not resume:
        raise RunFolderError(f"run folder {out} is not empty ({shown}); pass --resume to continue the job in it "
                             "or --overwrite to replace it")


def _tidy_after_failure(out: Path, created: bool) -> None:
    """A job that failed before writing anything leaves no folder behind."""
    with contextlib.suppress(OSError):
        if {p.name for p in out.iterdir()} <= BOOKKEEPING:
            for name in BOOKKEEPING:
                (out / name).unlink(missing_ok=True)
            if created:
                out.rmdir()


def holds_run_folder(source_arg: str | None = None):
    """Decorate a job taking keyword arguments ``out``, ``resume``, ``overwrite``: it runs while holding
    its folder, and write faults inside it become one-line errors."""
    def wrap(job):
        @functools.wraps(job)
        def run(*args, **kwargs):
            out = Path(kwargs["out"])
            with claim(out, resume=kwargs.get("resume", False), overwrite=kwargs.get("overwrite", False),
                       source=kwargs.get(source_arg) if source_arg else None):
                try:
                    return job(*args, **kwargs)
                except (OSError, RuntimeError) as exc:
                    fault = write_fault(exc, out)
                    if fault is None:
                        raise
                    raise fault from None
        return run
    return wrap


# ------------------------------------------------------------------------------------------- resuming

def job_from_meta(meta: dict) -> dict | None:
    """The job record of a finished folder written before job.json existed."""
    kind = meta.get("kind")
    dataset = meta.get("dataset") or {}
    base = {"kind": kind, "seed": meta.get("seed"),
            "dataset": {"name": dataset.get("name"), "options": dataset.get("options") or {}}}
    if kind == "attack":
        return {**base, "attack": meta.get("attack"), "arch": meta.get("arch"),
                "normalization": meta.get("normalization"), "train": meta.get("train")}
    if kind == "defense":
        source = meta.get("source") or {}
        clean = meta.get("clean_subset")
        return {**base, "defense": meta.get("defense"), "model": source.get("model"),
                "model_sha256": source.get("model_sha256"), "epochs_budget": meta.get("epochs_budget"),
                "clean_subset": indices_digest(clean.get("indices")) if isinstance(clean, dict) else None}
    return None


def indices_digest(indices) -> str | None:
    return None if indices is None else hashlib.sha256(json.dumps(list(indices)).encode()).hexdigest()[:16]


def differences(recorded, wanted, path: str = "") -> list[str]:
    """``key: recorded → wanted`` for every leaf that differs; keys missing on one side (written by
    another toolkit version) and recorded ``None`` digests are not differences."""
    if isinstance(recorded, dict) and isinstance(wanted, dict):
        out = []
        for key in recorded.keys() & wanted.keys():
            out += differences(recorded[key], wanted[key], f"{path}.{key}" if path else key)
        return out
    if recorded is None and path.endswith("sha256"):
        return []
    return [] if recorded == wanted else [f"{path or 'job'} {_short(recorded)} → {_short(wanted)}"]


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:36] + "…"


def begin_job(out: str | Path, job: dict, *, resume: bool, quiet: bool = False) -> None:
    """On ``resume``, refuse a folder written by a different job and unreadable checkpoints; then record
    ``job`` in job.json."""
    out = Path(out)
    job = json.loads(json_text(job))
    if resume and {p.name for p in out.iterdir()} - BOOKKEEPING:
        recorded = _recorded_job(out)
        if recorded is None:
            if not quiet:
                print(f"warning: {out} records no job settings (written by an older version); resuming "
                      "without checking that they match", flush=True, file=sys.stderr)
        else:
            diff = differences(recorded, job)
            if diff:
                raise RunFolderError(f"run folder {out} holds a different job, so --resume would mix the two: "
                                     f"{'; '.join(diff[:6])} (recorded → asked); rerun with the recorded "
                                     "settings, or use --overwrite to start over")
        check_checkpoints(out)
    write_atomic(out / JOB_FILE, lambda p: p.write_text(json_text(job)))


def _recorded_job(out: Path) -> dict | None:
    for name, convert in ((JOB_FILE, lambda d: d), (META_FILE, job_from_meta)):
        path = out / name
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                raise RunFolderError(f"{path} is unreadable, so --resume cannot check the job; use --overwrite "
                                     "to start over") from None
            if not isinstance(data, dict):
                raise RunFolderError(f"{path} holds no job record; use --overwrite to start over")
            return convert(data)
    return None


def check_checkpoints(out: Path) -> None:
    """Every ``*.pt`` under ``out`` must load as data before a resumed job relies on it."""
    for path in sorted(out.rglob("*.pt")):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001  (torch raises many types for damaged files)
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
            raise RunFolderError(f"checkpoint {path} is unreadable ({first}); delete it to redo that stage, "
                                 "or rerun with --overwrite to start over") from None
        if not isinstance(state, dict):
            raise RunFolderError(f"checkpoint {path} holds no checkpoint; delete it to redo that stage, or rerun "
                                 "with --overwrite to start over")
