"""The committed model zoo: every manifest row names a folder whose weights match the recorded sha256."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

ZOO = Path(__file__).resolve().parents[1] / "zoo"
MANIFESTS = sorted(ZOO.glob("**/MANIFEST.md"))
ROW = re.compile(r"^\| (?P<folder>[\w.-]+) \| (?P<attack>[\w-]+) \|.*`(?P<sha>[0-9a-f]{64})`")


def manifest_rows(path: Path) -> list[dict]:
    return [m.groupdict() for line in path.read_text().splitlines() if (m := ROW.match(line))]


@pytest.mark.skipif(not MANIFESTS, reason="no zoo in this checkout")
@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: str(p.parent.relative_to(ZOO)) or "zoo")
def test_manifest_rows_match_their_files(manifest):
    rows = manifest_rows(manifest)
    assert rows, f"{manifest} lists no models"
    listed = {r["folder"] for r in rows}
    folders = {p.parent.name for p in manifest.parent.glob("*/model.safetensors")}
    assert listed == folders
    for row in rows:
        folder = manifest.parent / row["folder"]
        assert hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest() == row["sha"], folder
        meta = json.loads((folder / "meta.json").read_text())
        assert meta["attack"]["name"] == row["attack"]
