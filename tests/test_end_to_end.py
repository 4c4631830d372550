"""The README's first command, end to end on the synthetic data: backdoor → fine-tune / NAD → metrics.

This is a real (small) training run, about two minutes on 2 CPU cores.
"""
import json

import pytest

from backdoor_eraser.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_dir(demo_run):
    return demo_run


def test_backdoor_is_planted_and_nad_erases_it(demo_dir):
    rows = json.loads((demo_dir / "summary.json").read_text())
    bd, ft, nad = rows["backdoored"], rows["finetune"], rows["nad"]
    assert bd["asr"] >= 0.90, bd
    # The demo's clean accuracy depends on the host's kernels (the trajectory of its constant-lr recipe):
    # 0.946 with AVX2 kernels, 0.737 with AVX-512 ones on the same machine. What the demo guarantees is a
    # model that learned the task well above chance and carries the backdoor.
    assert bd["acc"] >= 0.70, bd
    assert nad["asr"] < 0.20, nad
    assert bd["acc"] - nad["acc"] < 0.05, (bd, nad)
    assert nad["ra"] > 0.80, nad


def test_run_folders_follow_the_contract(demo_dir):
    for name in ("backdoored", "finetune", "nad", "nad/teacher"):
        files = {p.name for p in (demo_dir / name).iterdir()}
        assert {"model.safetensors", "meta.json"} <= files, (name, files)
    for name in ("backdoored", "finetune", "nad"):
        files = {p.name for p in (demo_dir / name).iterdir()}
        assert {"metrics.json", "history.csv"} <= files
    meta = json.loads((demo_dir / "nad" / "meta.json").read_text())
    assert meta["defense"]["name"] == "nad" and meta["defense_info"]["distance"] == "code"
    assert meta["defense"]["config"]["beta"] == [500.0, 1000.0, 1000.0]
    assert meta["clean_subset"]["count"] == len(meta["clean_subset"]["indices"]) == 500
    assert meta["attack"]["name"] == "badnets" and meta["normalization"] == {"mean": None, "std": None}
    attack_meta = json.loads((demo_dir / "backdoored" / "meta.json").read_text())
    assert len(attack_meta["poison_indices"]) == 500
    history = (demo_dir / "nad" / "history.csv").read_text().splitlines()
    # 10 student epochs, then the default's 40 recovery epochs (phase "kd")
    assert len(history) == 51 and "at3" in history[0] and "phase" in history[0]
    assert sum(line.count(",kd,") for line in history[1:]) == 40
    png = (demo_dir / "attention.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_evaluate_reads_the_run_folder(demo_dir, capsys):
    assert main(["evaluate", "--model", str(demo_dir / "nad"), "--json", "--device", "cpu"]) == 0
    got = json.loads(capsys.readouterr().out)
    summary = json.loads((demo_dir / "summary.json").read_text())["nad"]
    assert got["asr"] == pytest.approx(summary["asr"]) and got["acc"] == pytest.approx(summary["acc"])
