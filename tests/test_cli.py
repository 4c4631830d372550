"""Command-line behaviour on bad input: one error line, non-zero exit, no traceback."""
import json

import pytest
import torch

from backdoor_eraser.cli import main
from backdoor_eraser.classifier import Normalization
from backdoor_eraser.params import parse_param_flags
from backdoor_eraser.defenses.nad import NADConfig
from backdoor_eraser.errors import UserError
from backdoor_eraser.runs import new_model, save_run


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv, message", [
    (["attack", "--dataset", "cifar10", "--data-dir", "/no/such/dir", "--attack", "badnets", "--out", "x"], "/no/such/dir"),
    (["attack", "--dataset", "synthetic", "--attack", "nope", "--out", "x"], "unknown attack 'nope'; known: badnets, blend, clean-label, input-aware, multi-trigger, patch, refool, sig, trojan, trojannn, wanet"),
    (["attack", "--dataset", "synthetic", "--arch", "vgg-99", "--attack", "badnets", "--out", "x", "--epochs", "0"],
     "unknown architecture 'vgg-99'"),
    (["attack", "--dataset", "synthetic", "--attack", "badnets", "--out", "x", "--alpha", "0.3"],
     "attack 'badnets' has no parameter --alpha"),
    (["purify", "--model", "/no/model", "--method", "nope", "--out", "x"], "unknown defense 'nope'; known: abl, anp, argd, fine-pruning, finetune, mcr, nad, rnp, sage"),
    (["purify", "--model", "/no/model", "--method", "nad", "--out", "x", "--clean-fraction", "1.5"], "--clean-fraction must be in (0, 1]"),
    (["purify", "--model", "/no/model", "--method", "nad", "--out", "x"], "does not exist"),
    (["evaluate", "--model", "/no/model"], "does not exist"),
])
def test_bad_input_is_one_error_line(capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    lines = [l for l in err.splitlines() if l.strip()]
    assert lines[-1].startswith("error: ") and message in lines[-1]
    assert "Traceback" not in err


def test_param_flags_are_typed():
    got = parse_param_flags(NADConfig, ["--beta", "1,2,3", "--distance=paper", "--epochs", "4"], "defense 'nad'")
    assert got == {"beta": (1.0, 2.0, 3.0), "distance": "paper", "epochs": 4}
    with pytest.raises(UserError, match="cannot read 'x' as int"):
        parse_param_flags(NADConfig, ["--epochs", "x"], "defense 'nad'")


def test_tuple_items_with_commas_are_separated_by_semicolons():
    from backdoor_eraser.attacks.patch import MultiTriggerConfig

    got = parse_param_flags(MultiTriggerConfig, ["--triggers", "bottom-right;22,6;6,22", "--targets", "3,4,5"], "x")
    assert got == {"triggers": ("bottom-right", "22,6", "6,22"), "targets": (3, 4, 5)}
    assert parse_param_flags(MultiTriggerConfig, ["--triggers", "top-left,centre"], "x") == \
        {"triggers": ("top-left", "centre")}


def test_listings(capsys):
    code, out, _ = run_cli(capsys, "defenses")
    assert code == 0 and "nad:" in out and "--beta" in out and "(500.0, 1000.0, 1000.0)" in out
    code, out, _ = run_cli(capsys, "attacks")
    assert code == 0 and "--key-image" in out


def test_evaluate_json_on_a_bare_checkpoint(capsys, tmp_path):
    m = new_model("wrn-16-1", [str(i) for i in range(10)], (3, 32, 32), Normalization(), seed=0)
    torch.save({"state_dict": m.net.state_dict()}, tmp_path / "m.pth")
    code, out, err = run_cli(capsys, "evaluate", "--model", str(tmp_path / "m.pth"), "--arch", "wrn-16-1",
                             "--normalization", "none", "--dataset", "synthetic", "--attack", "badnets",
                             "--target", "5", "--json", "--device", "cpu")
    assert code == 0, err
    got = json.loads(out)
    assert got["attack"]["config"]["target"] == 5 and got["n_test"] == 1000 and got["n_triggered"] == 900
    assert 0 <= got["asr"] <= 1 and 0 <= got["acc"] <= 1


def test_show_trigger_writes_png(capsys, tmp_path):
    out = tmp_path / "t.png"
    code, stdout, err = run_cli(capsys, "show-trigger", "--attack", "badnets", "--position", "four-corners",
                                "--count", "3", "--out", str(out))
    assert code == 0, err
    assert out.read_bytes()[:4] == b"\x89PNG" and str(out) in stdout


def test_epoch_budget_mapping():
    from backdoor_eraser.defenses import epoch_budget_params
    assert epoch_budget_params("nad", 3, 500) == {"epochs": 3, "teacher_epochs": 3, "kd_epochs": 0}
    assert epoch_budget_params("mcr", 2, 500) == {"epochs": 2, "curve_epochs": 2}
    assert epoch_budget_params("anp", 3, 500) == {"iterations": 12}  # ceil(3·500 / 128)
    with pytest.raises(UserError, match="≥ 1"):
        epoch_budget_params("nad", 0, 500)


def test_purify_with_epoch_budget_records_epochs_and_steps(synthetic_backdoor, tmp_path, capsys):
    out = tmp_path / "ft"
    code, stdout, err = run_cli(capsys, "purify", "--model", str(synthetic_backdoor.run_dir), "--method", "finetune",
                                "--clean-count", "100", "--epochs-budget", "2", "--out", str(out), "--device", "cpu",
                                "--quiet", "--no-epoch-eval")
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and metrics["steps"] == 4  # 100 images, batch 64 → 2 steps per epoch
    assert metrics["wall_seconds"] > 0 and "before" in metrics
    meta = json.loads((out / "meta.json").read_text())
    assert meta["epochs_budget"] == 2 and meta["defense"]["config"]["epochs"] == 2
    assert "after:" in stdout


def test_abl_through_purify_rebuilds_the_poisoned_set(synthetic_backdoor, tmp_path, capsys):
    out = tmp_path / "abl"
    code, stdout, err = run_cli(capsys, "purify", "--model", str(synthetic_backdoor.run_dir), "--method", "abl",
                                "--isolation-epochs", "1", "--finetune-epochs", "0", "--unlearning-epochs", "1",
                                "--out", str(out), "--device", "cpu", "--quiet", "--no-epoch-eval")
    assert code == 0, err
    meta = json.loads((out / "meta.json").read_text())
    info = meta["defense_info"]
    assert meta["clean_subset"] is None
    assert info["isolated_count"] == 50  # 1 % of 5,000
    assert len(info["isolated_indices"]) == 50
    # The isolation's precision and recall reach metrics.json, so grid stores hold them.
    metrics = json.loads((out / "metrics.json").read_text())
    assert isinstance(info["isolation_precision"], float)
    assert metrics["diagnostics"] == {"isolation_precision": info["isolation_precision"],
                                      "isolation_recall": info["isolation_recall"]}


def test_abl_refuses_a_model_without_attack_run(tmp_path, capsys):
    m = new_model("wrn-16-1", [str(i) for i in range(10)], (3, 32, 32), Normalization(), seed=0)
    save_run(tmp_path / "plain", m, {"kind": "import", "dataset": {"name": "synthetic", "data_dir": None}})
    code, _, err = run_cli(capsys, "purify", "--model", str(tmp_path / "plain"), "--method", "abl",
                           "--out", str(tmp_path / "o"), "--device", "cpu", "--quiet")
    assert code == 2 and "poisoned training set" in err


def test_detect_writes_report(synthetic_backdoor, tmp_path, capsys):
    out = tmp_path / "nc"
    code, stdout, err = run_cli(capsys, "detect", "--model", str(synthetic_backdoor.run_dir), "--clean-count", "100",
                                "--epochs", "2", "--out", str(out), "--device", "cpu", "--quiet")
    assert code == 0, err
    report = json.loads((out / "detect.json").read_text())
    assert len(report["l1_norms"]) == 10 and "flagged" in report and report["clean_subset"]["count"] == 100
    assert (out / "masks.png").read_bytes()[:4] == b"\x89PNG" and "anomaly index" in stdout
    # an interrupted search resumes from its per-class checkpoints and gives the same report
    import shutil
    part = tmp_path / "nc-part"
    shutil.copytree(out, part)
    (part / "detect.json").unlink()
    (part / "masks.png").unlink()
    shutil.rmtree(part / "search" / "class-9")
    code, _, err = run_cli(capsys, "detect", "--model", str(synthetic_backdoor.run_dir), "--clean-count", "100",
                           "--epochs", "2", "--out", str(part), "--device", "cpu", "--quiet", "--resume")
    assert code == 0, err
    again = json.loads((part / "detect.json").read_text())
    assert again["l1_norms"] == report["l1_norms"] and again["flagged"] == report["flagged"]


def test_show_trigger_from_a_run_folder_uses_the_recorded_trigger(capsys, tmp_path):
    from backdoor_eraser.training import TrainConfig
    from backdoor_eraser.workflows import run_attack

    run = tmp_path / "blend-run"
    run_attack(dataset="synthetic", data_dir=None, arch="wrn-16-1", attack="blend", attack_params={"key_seed": 5},
               train=TrainConfig(epochs=0), out=run, quiet=True, epoch_eval=False)
    pngs = {}
    for label, args in {"run": ["--run", str(run)], "same": ["--attack", "blend", "--key-seed", "5"],
                        "other": ["--attack", "blend", "--key-seed", "6"]}.items():
        pngs[label] = tmp_path / f"{label}.png"
        code, _, err = run_cli(capsys, "show-trigger", *args, "--count", "3", "--out", str(pngs[label]))
        assert code == 0, err
    assert pngs["run"].read_bytes() == pngs["same"].read_bytes()
    assert pngs["run"].read_bytes() != pngs["other"].read_bytes()
    code, _, err = run_cli(capsys, "show-trigger", "--run", str(run), "--alpha", "0.5", "--out", str(tmp_path / "x.png"))
    assert code == 2 and "recorded trigger" in err


def test_defense_flags_are_never_read_as_prefixes_of_other_flags():
    from backdoor_eraser.cli import build_parser

    args, rest = build_parser().parse_known_args(["purify", "--model", "m", "--method", "finetune", "--epochs", "1",
                                                  "--out", "o"])
    assert args.epochs_budget is None and rest == ["--epochs", "1"]
    args, rest = build_parser().parse_known_args(["purify", "--model", "m", "--method", "nad", "--p", "3", "--out", "o"])
    assert args.params is None and rest == ["--p", "3"]
    args, rest = build_parser().parse_known_args(["attack", "--dataset", "synthetic", "--attack", "badnets",
                                                  "--out", "o", "--epoch", "3"])
    assert args.train_epochs == 60 and rest == ["--epoch", "3"]
