"""``backdoor-eraser bench`` and ``report``: set up a spec's cells in the store, run them, write the report."""
from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

from ..errors import UserError
from .runner import RunOptions, code_version
from .spec import Cell, GridSpec, describe_cells, expand, load_spec, parse_only
from .store import Store


def say(msg: str):
    print(msg, file=sys.stderr, flush=True)


def parse_data_dirs(values: list[str] | None) -> dict[str, str]:
    """``["DIR"]`` → every data set in DIR; ``["cifar10=DIR", "gtsrb=DIR2"]`` → per data set."""
    out = {}
    for v in values or []:
        name, eq, path = v.partition("=")
        if eq and name and "/" not in name:
            out[name] = path
        else:
            out["*"] = v
    for name, path in out.items():
        if not Path(path).exists():
            raise UserError(f"--data-dir {path} does not exist")
    return out


def run_dir_for(out: Path, cell: Cell) -> Path:
    a = cell.axes
    if cell.kind == "attack":
        name = f"{a['attack']}-{cell.hash[:10]}"
    else:
        name = f"{a['attack']}-{a['defense']}-s{a['seed']}-{cell.hash[:10]}"
    return (out / "cells" / cell.kind / name.replace("/", "_")).resolve()


def prepare(spec: GridSpec, out: Path, *, run_spec: GridSpec | None = None, zoo=None,
            command: str = "") -> tuple[Store, list[Cell], set[str] | None]:
    """Registers every cell of ``spec`` as its members (so the report shows the whole spec, cells not run
    yet marked missing); returns the store, the cells to run (those of ``run_spec``, the spec after
    ``--only``) and their hashes (None: all of the spec's)."""
    cells = expand(spec, zoo=zoo, say=say)
    run = cells if run_spec is None else expand(run_spec, zoo=zoo)
    if not run:
        raise UserError(f"{spec.source}: the spec{'' if run_spec is None else ' after --only'} has no cells")
    scope = None if run_spec is None else {c.hash for c in run}
    store = Store(out)
    new = store.add(spec.name, cells, lambda c: run_dir_for(out, c), command=command, spec_text=spec.text)
    counts = store.counts(spec.name, scope)
    say(f"{spec.name}: {describe_cells(run)}; {counts['done']} done, {counts['failed']} failed, "
        f"{counts['pending'] + counts['running']} to run ({len(new if scope is None else new & scope)} new) "
        f"— store {store.path}")
    if scope is not None and len(cells) > len(run):
        say(f"--only: {len(run)} of the spec's {len(cells)} cells run; the report shows all of them")
    others = store.code_versions() - {code_version()}
    if others:
        say(f"note: {len(others)} other toolkit version(s) made cells in this store ({', '.join(sorted(others))}); "
            "their results are kept and each cell records its version")
    return store, run, scope


def run_bench(spec_name: str, *, out: str | Path | None = None, data_dirs: list[str] | None = None,
              only: list[str] | None = None, zoo: str | None = None, workers: int = 1, executor: str = "local",
              ray_address: str | None = None, cpus_per_cell: float = 1.0, gpus_per_cell: float = 0.0,
              device: str = "auto", retry_failed: bool = False, dry_run: bool = False, report: bool = True,
              command: str | None = None) -> dict:
    """Run (or continue) a grid; returns the store's status counts."""
    spec = load_spec(spec_name)
    only_axes = parse_only(only)
    run_spec = spec.filtered(only_axes) if only_axes else None  # bad axis values fail before anything is written
    out = Path(out or f"runs/{spec.name}")
    if workers < 1:
        raise UserError(f"--workers must be ≥ 1, got {workers}")
    if executor not in ("local", "ray"):
        raise UserError(f"--executor must be local or ray, got {executor!r}")
    opts = RunOptions(data_dirs=parse_data_dirs(data_dirs), device=device, epoch_eval=spec.settings.epoch_eval,
                      figures=spec.settings.figures, quiet=not sys.stderr.isatty())
    for d in spec.datasets:
        opts.data_dir(d.name)  # fails now, before anything runs, when a data folder is missing
    from ..workflows import resolve_device
    resolve_device(device)
    _check_writable(out)
    store, cells, scope = prepare(spec, out, run_spec=run_spec, zoo=zoo, command=command or _command())
    try:
        if retry_failed:
            say(f"{store.retry_failed(spec.name, scope)} failed cells will run again")
        if dry_run:
            return store.counts(spec.name, scope)
        t0 = time.perf_counter()
        from .store import now
        started = now()
        from .executor import run_local, run_ray
        if executor == "ray":
            run_ray(out, spec.name, opts, address=ray_address, cpus_per_cell=cpus_per_cell,
                    gpus_per_cell=gpus_per_cell, say=say, scope=scope)
        else:
            run_local(out, spec.name, opts, workers=workers, say=say, scope=scope)
        wall = time.perf_counter() - t0
        counts = store.counts(spec.name, scope)
        say(f"{spec.name}: {counts['done']} done, {counts['failed']} failed, "
            f"{counts['pending'] + counts['running']} not run, in {wall:.0f} s")
        if executor == "local" and workers == 1:
            ran = store.db.execute("SELECT COUNT(*), SUM(wall_seconds) FROM cells WHERE finished >= ? AND "
                                   "status IN ('done', 'failed') AND wall_seconds IS NOT NULL", (started,)).fetchone()
            if ran[0]:
                # Everything outside the cells' own work: store writes, claiming, progress lines.
                say(f"grid overhead: {wall - ran[1]:.1f} s of {wall:.0f} s ({100 * (wall - ran[1]) / wall:.2f} %) "
                    f"over {ran[0]} cells")
    finally:
        store.close()
    if report:
        paths = run_report(out, spec=spec.name, figures=spec.settings.figures, reference=spec.settings.reference)
        print(Path(paths["md"]).read_text())
        say(f"report: {paths['html']}")
    return counts


def run_report(out: str | Path, *, spec: str | None = None, figures: bool = True, reference: str | None = None) -> dict:
    """(Re)build report.html, results.md and results.csv in ``out`` from its store alone."""
    from .report import write_report

    store = Store(out, create=False)
    try:
        specs = store.specs()
        if spec is None and len(specs) == 1:
            spec = specs[0]
        rows = store.rows(spec)
        invocations = [i for i in store.invocations() if spec is None or i["spec"] == spec]
    finally:
        store.close()
    if not rows:
        raise UserError(f"the store in {out} holds no cells" + (f" of spec {spec!r}" if spec else ""))
    if reference is None:
        reference = _reference_from(invocations)
    return write_report(rows, Path(out), invocations=invocations, title=f"backdoor-eraser: {spec or ', '.join(specs)}",
                        reference=reference, figures=figures)


def _reference_from(invocations: list[dict]) -> str:
    from .spec import parse_spec

    for inv in reversed(invocations):
        try:
            return parse_spec(inv["spec_text"], source=inv["spec"]).settings.reference
        except UserError:
            continue
    return "nad"


def _check_writable(out: Path):
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"cannot write to --out {out}: {exc.strerror or exc}") from None


def _command() -> str:
    return "backdoor-eraser " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def listing() -> str:
    from ..registry import first_sentence
    from .spec import builtin_names

    lines = []
    for name in builtin_names():
        spec = load_spec(name)
        cells = expand(spec)
        lines.append(f"{name}: {first_sentence(spec.description)} "
                     f"[{describe_cells(cells)}]")
    return "\n".join(lines)
