"""Copy finished attack runs into a zoo folder: the run's files without what only training needs.

Usage: python benchmarks/zoo_export.py RUN_DIR ZOO_DIR [--leave-out FILE --note TEXT]

Copies RUN_DIR to ZOO_DIR/<name of RUN_DIR> without ``checkpoint.pt`` (optimiser state for ``--resume``),
``job.json`` and ``.lock``. ``--leave-out trigger.safetensors`` also leaves a file out that is too large to
commit (clean-label's 4,000 PGD-perturbed training images, 12 MB); it is removed from meta.json's
``files`` list (else the folder would be refused as incomplete) and ``--note`` goes into meta.json's
``zoo_note``, saying why and how to rebuild it. The model's bytes and sha256 are unchanged. A run without
metrics.json is unfinished and refused; so is a destination that exists.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

TRAINING_ONLY = {"checkpoint.pt", "job.json", ".lock"}


def export(run: Path, zoo: Path, leave_out: list[str], note: str | None) -> Path:
    if not (run / "metrics.json").is_file():
        sys.exit(f"{run} has no metrics.json: the run is unfinished (resume it first)")
    if leave_out and not note:
        sys.exit("--leave-out needs --note: the zoo folder must say why a file is missing and how to rebuild it")
    dst = zoo / run.name
    if dst.exists():
        sys.exit(f"{dst} exists; remove it first")
    meta = json.loads((run / "meta.json").read_text())
    files = dict(meta.get("files") or {})
    for name in leave_out:
        if name not in files:
            sys.exit(f"{name} is not one of the run's files ({', '.join(sorted(files))})")
        del files[name]
    dst.mkdir(parents=True)
    for path in sorted(run.iterdir()):
        if path.is_file() and path.name not in TRAINING_ONLY | set(leave_out):
            shutil.copy2(path, dst / path.name)
    if leave_out or note:  # otherwise meta.json stays byte for byte the run's
        meta["files"] = files
        if note:
            meta["zoo_note"] = note
        (dst / "meta.json").write_text(json.dumps(meta, indent=2, allow_nan=False) + "\n")
    return dst


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path)
    p.add_argument("zoo", type=Path)
    p.add_argument("--leave-out", action="append", default=[])
    p.add_argument("--note")
    args = p.parse_args(argv)
    print(export(args.run, args.zoo, args.leave_out, args.note))


if __name__ == "__main__":
    main()
