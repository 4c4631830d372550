"""Size of the package: physical lines and source lines (lines with code, not docstrings, comments or
blanks) of every .py file under src/, at git revisions or in the working tree.

    python benchmarks/code_size.py REV [REV ...] [--files PATH ...]

A revision of "." is the working tree. With --files only those paths count (e.g. the modules a change
touched), so a change's effect is measured apart from features that landed beside it.
"""
from __future__ import annotations

import argparse
import ast
import io
import subprocess
import tokenize
from pathlib import Path

SKIP = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}


def source_lines(text: str) -> int:
    docstrings = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                docstrings.update(range(first.lineno, first.end_lineno + 1))
    lines = set()
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type not in SKIP:
            lines.update(n for n in range(tok.start[0], tok.end[0] + 1) if n not in docstrings)
    return len(lines)


def files_at(rev: str, only: list[str] | None) -> dict[str, str]:
    if rev == ".":
        paths = only or [str(p) for p in sorted(Path("src").rglob("*.py"))]
        return {p: Path(p).read_text() for p in paths if Path(p).is_file()}
    listed = subprocess.run(["git", "ls-tree", "-r", "--name-only", rev, "src"], capture_output=True, text=True,
                            check=True).stdout.split()
    paths = [p for p in listed if p.endswith(".py") and (only is None or p in only)]
    return {p: subprocess.run(["git", "show", f"{rev}:{p}"], capture_output=True, text=True, check=True).stdout
            for p in paths}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("revs", nargs="+")
    ap.add_argument("--files", nargs="*")
    args = ap.parse_args()
    print("| revision | files | lines | source lines |\n|---|---|---|---|")
    for rev in args.revs:
        texts = files_at(rev, args.files)
        print(f"| {rev} | {len(texts)} | {sum(t.count(chr(10)) for t in texts.values())} | "
              f"{sum(source_lines(t) for t in texts.values())} |")


if __name__ == "__main__":
    main()
