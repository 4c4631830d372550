"""Bad inputs and injected faults through the real CLI entry point: every one must end in one error
line (no traceback), name the problem, and leave each run folder absent, as it was, or complete.

One tiny attack run (WRN-10-1, one epoch on a 40-image folder data set of 10 classes) is built per
module and copied by the tests that damage it; "{tree}" in an argument list stands for that data set.
"""
import errno
import fcntl
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from backdoor_eraser import runs, workflows
from backdoor_eraser.cli import main
from backdoor_eraser.runfolder import LOCK_FILE, claim, file_record

ARCH = ["--arch", "wrn-10-1"]
QUIET = ["--device", "cpu", "--quiet"]
DATA = ["--dataset", "folder", "--data-dir", "{tree}"]
ATTACK = ["attack", *DATA, *ARCH, "--attack", "badnets", "--epochs", "1", "--batch-size", "256", "--no-epoch-eval",
          *QUIET]
BLEND = ["attack", *DATA, *ARCH, "--attack", "blend", "--epochs", "0", "--no-epoch-eval", *QUIET]
FINETUNE = ["--method", "finetune", "--clean-count", "20", "--epochs", "1", "--kd-epochs", "0", "--no-epoch-eval", *QUIET]
ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


TREE: list[Path] = []


def image_tree(root: Path, classes: int, per_class: int = 3) -> Path:
    rng = np.random.default_rng(classes)
    for c in range(classes):
        (root / f"c{c:02d}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / f"c{c:02d}" / f"{i}.png")
    return root


@pytest.fixture(scope="module", autouse=True)
def tree(tmp_path_factory) -> Path:
    TREE[:] = [image_tree(tmp_path_factory.mktemp("data") / "tree", classes=10, per_class=4)]
    return TREE[0]


@pytest.fixture(autouse=True)
def _own_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("BACKDOOR_ERASER_CACHE", str(tmp_path / "cache"))


def cli(capsys, *argv):
    code = main([str(a).replace("{tree}", str(TREE[0])) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_error(result, *needles, code=2):
    got, out, err = result
    assert "Traceback" not in err and "Traceback" not in out
    lines = [line for line in err.splitlines() if line.strip()]
    assert got == code, (got, err)
    assert lines and lines[-1].startswith("error: "), err
    assert all(n in lines[-1] for n in needles), (needles, lines[-1])
    return lines[-1]


def snapshot(folder: Path) -> dict:
    """What a reader sees of a folder: every file and its content hash (the lock file aside)."""
    return {str(p.relative_to(folder)): file_record(p)["sha256"] for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != LOCK_FILE}


def assert_complete(folder: Path):
    meta = runs.read_meta(folder)
    runs.load_model(folder)
    assert (folder / "metrics.json").is_file() and set(meta["files"]) <= {p.name for p in folder.iterdir()}
    assert not [p for p in folder.iterdir() if p.name.endswith(".partial")]


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_meta(folder: Path, change):
    meta = json.loads((folder / "meta.json").read_text())
    change(meta)
    (folder / "meta.json").write_text(json.dumps(meta))


def recommit(folder: Path, name: str):
    """Record ``name``'s new content in meta.json, so a test reaches the check behind the file list."""
    edit_meta(folder, lambda m: m["files"].__setitem__(name, file_record(folder / name)))


@pytest.fixture(scope="module")
def base(tmp_path_factory, tree) -> Path:
    out = tmp_path_factory.mktemp("fuzz") / "badnets"
    assert main([a.replace("{tree}", str(tree)) for a in ATTACK] + ["--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def blend(tmp_path_factory, tree) -> Path:
    out = tmp_path_factory.mktemp("fuzz") / "blend"
    assert main([a.replace("{tree}", str(tree)) for a in BLEND] + ["--out", str(out)]) == 0
    assert (out / "trigger.safetensors").is_file()
    return out


@pytest.fixture(scope="module")
def purified(tmp_path_factory, base) -> Path:
    out = tmp_path_factory.mktemp("fuzz") / "ft"
    assert main(["purify", "--model", str(base), *FINETUNE, "--out", str(out)]) == 0
    return out


def nan_model(base: Path, dst: Path, value=float("nan")) -> Path:
    run = copy_run(base, dst)
    state = load_file(str(run / "model.safetensors"))
    state["fc.weight"][0, 0] = value
    save_file(state, str(run / "model.safetensors"))
    recommit(run, "model.safetensors")
    return run


# ------------------------------------------------------------------------------ non-finite models

@pytest.mark.parametrize("command", ["evaluate", "detect", "purify"])
def test_a_model_with_a_nan_weight_is_refused_before_any_work(capsys, tmp_path, base, command, monkeypatch):
    run = nan_model(base, tmp_path / "nan")
    monkeypatch.setattr(workflows, "load_data", lambda *a, **k: pytest.fail("data loaded for a broken model"))
    extra = {"evaluate": [], "detect": ["--out", tmp_path / "o", *QUIET], "purify": ["--out", tmp_path / "o", *FINETUNE]}
    line = assert_error(cli(capsys, command, "--model", run, "--device", "cpu", *extra[command]),
                        str(run / "model.safetensors"), "non-finite", "fc.weight")
    assert "lower the lr" not in line
    assert not (tmp_path / "o").exists()


def test_a_bare_checkpoint_with_inf_is_refused(capsys, tmp_path, base):
    state = load_file(str(base / "model.safetensors"))
    state["block1.layer.0.conv1.weight"].view(-1)[3] = float("inf")
    torch.save(state, tmp_path / "m.pt")
    assert_error(cli(capsys, "evaluate", "--model", tmp_path / "m.pt", *ARCH, *DATA, "--device", "cpu"),
                 "m.pt", "non-finite", "block1.layer.0.conv1.weight")


def test_overflowing_logits_are_refused(capsys, tmp_path, base):
    run = copy_run(base, tmp_path / "big")
    state = load_file(str(run / "model.safetensors"))
    state["fc.weight"].fill_(3e38)  # finite weights whose products with the features overflow
    save_file(state, str(run / "model.safetensors"))
    recommit(run, "model.safetensors")
    assert_error(cli(capsys, "evaluate", "--model", run, "--device", "cpu"), f"model {run}", "NaN/inf logits")


@pytest.mark.parametrize("command", ["attack", "purify"])
def test_training_that_ends_with_nan_weights_saves_nothing(capsys, tmp_path, base, command, monkeypatch):
    from backdoor_eraser.training import trainer

    real_fit = trainer.Trainer.fit

    def fit(self, classifier, *args, **kwargs):
        res = real_fit(self, classifier, *args, **kwargs)
        with torch.no_grad():
            classifier.net.fc.weight[0, 0] = float("nan")
        return res
    monkeypatch.setattr(trainer.Trainer, "fit", fit)
    out = tmp_path / "o"
    argv = [*ATTACK, "--out", out] if command == "attack" else ["purify", "--model", base, *FINETUNE, "--out", out]
    assert_error(cli(capsys, *argv), str(out), "non-finite weights", "nothing was saved")
    assert not (out / "meta.json").exists() and not (out / "model.safetensors").exists()
    assert_error(cli(capsys, "evaluate", "--model", out, "--device", "cpu"), "unfinished job")


# ------------------------------------------------------------------------------ --resume checks

def test_resume_refuses_a_different_attack_job(capsys, tmp_path, base):
    run = copy_run(base, tmp_path / "run")
    before = snapshot(run)
    argv = [a if a != "badnets" else "blend" for a in ATTACK]
    line = assert_error(cli(capsys, *argv, "--seed", "5", "--out", run, "--resume"), "different job",
                        "attack.name 'badnets' → 'blend'", "seed 0 → 5")
    assert "train.batch_size" not in line
    assert snapshot(run) == before


@pytest.mark.parametrize("flag, value, needle", [("--arch", "wrn-16-1", "arch 'wrn-10-1' → 'wrn-16-1'"),
                                                 ("--epochs", "2", "train.epochs 1 → 2"),
                                                 ("--rate", "0.2", "attack.config.rate 0.1 → 0.2"),
                                                 ("--normalization", "cifar10", "normalization.mean")])
def test_resume_names_each_setting_that_differs(capsys, tmp_path, base, flag, value, needle):
    run = copy_run(base, tmp_path / "run")
    argv = list(ATTACK)
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]
    assert_error(cli(capsys, *argv, "--out", run, "--resume"), needle)


def test_resume_of_the_same_finished_job_keeps_its_model(capsys, tmp_path, base):
    run = copy_run(base, tmp_path / "run")
    code, _, err = cli(capsys, *ATTACK, "--out", run, "--resume")
    assert code == 0, err
    assert file_record(run / "model.safetensors") == file_record(base / "model.safetensors")
    assert_complete(run)


def test_resume_of_a_folder_without_job_record_checks_its_meta(capsys, tmp_path, base):
    run = copy_run(base, tmp_path / "run")
    (run / "job.json").unlink()
    edit_meta(run, lambda m: m.pop("files"))  # as written before either existed (zoo/fragile)
    assert_error(cli(capsys, *ATTACK, "--seed", "3", "--out", run, "--resume"), "different job", "seed 0 → 3")


@pytest.mark.parametrize("change, needle", [(["--lr", "0.01"], "defense.config.lr 0.1 → 0.01"),
                                            (["--seed", "4"], "seed 0 → 4"),
                                            (["--clean-count", "30"], "clean_subset"),
                                            (["--method", "fine-pruning"], "defense.name 'finetune' → 'fine-pruning'")])
def test_purify_resume_refuses_a_different_job(capsys, tmp_path, base, purified, change, needle):
    run = copy_run(purified, tmp_path / "ft")
    before = snapshot(run)
    argv = list(FINETUNE)
    if change[0] == "--method":   # fine-pruning has no recovery stage to turn off
        del argv[argv.index("--kd-epochs"):argv.index("--kd-epochs") + 2]
    if change[0] in argv:
        argv[argv.index(change[0]) + 1] = change[1]
    else:
        argv += change
    assert_error(cli(capsys, "purify", "--model", base, *argv, "--out", run, "--resume"), "different job", needle)
    assert snapshot(run) == before


def test_purify_resume_refuses_another_source_model(capsys, tmp_path, base, purified):
    run = copy_run(purified, tmp_path / "ft")
    other = copy_run(base, tmp_path / "other")
    assert_error(cli(capsys, "purify", "--model", other, *FINETUNE, "--out", run, "--resume"), "different job",
                 "model '")


def test_purify_resume_refuses_a_changed_source_model(capsys, tmp_path, base):
    src = copy_run(base, tmp_path / "src")
    out = tmp_path / "ft"
    assert cli(capsys, "purify", "--model", src, *FINETUNE, "--out", out)[0] == 0
    state = load_file(str(src / "model.safetensors"))
    state["fc.bias"] += 1
    save_file(state, str(src / "model.safetensors"))
    recommit(src, "model.safetensors")
    assert_error(cli(capsys, "purify", "--model", src, *FINETUNE, "--out", out, "--resume"), "model_sha256")


@pytest.mark.parametrize("damage", [b"not a zip file", None])
def test_resume_with_a_damaged_checkpoint_is_refused(capsys, tmp_path, base, damage):
    run = copy_run(base, tmp_path / "run")
    ckpt = run / "checkpoint.pt"
    ckpt.write_bytes(damage if damage is not None else ckpt.read_bytes()[:5000])
    before = snapshot(run)
    assert_error(cli(capsys, *ATTACK, "--out", run, "--resume"), str(ckpt), "unreadable", "--overwrite")
    assert snapshot(run) == before


def test_resume_with_a_damaged_job_record_is_refused(capsys, tmp_path, base):
    run = copy_run(base, tmp_path / "run")
    (run / "job.json").write_text("{half")
    assert_error(cli(capsys, *ATTACK, "--out", run, "--resume"), "job.json", "unreadable")


def test_resume_into_a_new_folder_starts_the_job(capsys, tmp_path):
    code, _, err = cli(capsys, *BLEND, "--out", tmp_path / "new", "--resume")
    assert code == 0, err
    assert_complete(tmp_path / "new")


def test_library_jobs_resume_into_their_own_folder_as_the_grid_does(tmp_path, tree):
    from backdoor_eraser.training import TrainConfig

    splits = workflows.load_data("folder", str(tree))
    for _ in range(2):
        workflows.run_attack(dataset="folder", data_dir=str(tree), arch="wrn-10-1", attack="badnets", splits=splits,
                             train=TrainConfig(epochs=1), out=tmp_path / "a", quiet=True, epoch_eval=False, resume=True)
        workflows.run_purify(model=tmp_path / "a", method="finetune", defense_params={"epochs": 1}, clean_count=20,
                             splits=splits, out=tmp_path / "p", quiet=True, epoch_eval=False, resume=True)
    assert_complete(tmp_path / "a")
    assert_complete(tmp_path / "p")


# ------------------------------------------------------------------------------ existing --out folders

@pytest.mark.parametrize("command", ["attack", "purify", "detect"])
def test_a_non_empty_out_is_refused_without_overwrite(capsys, tmp_path, base, command):
    run = copy_run(base, tmp_path / "run")
    before = snapshot(run)
    argv = {"attack": ATTACK, "purify": ["purify", "--model", base, *FINETUNE],
            "detect": ["detect", "--model", base, "--clean-count", "20", "--epochs", "1", *QUIET]}[command]
    assert_error(cli(capsys, *argv, "--out", run), str(run), "not empty", "--resume", "--overwrite")
    assert snapshot(run) == before


def test_overwrite_clears_the_old_files(capsys, tmp_path, blend):
    run = copy_run(blend, tmp_path / "run")
    (run / "teacher").mkdir()
    (run / "teacher" / "checkpoint.pt").write_bytes(b"old")
    code, _, err = cli(capsys, *[a if a != "blend" else "badnets" for a in BLEND], "--out", run, "--overwrite")
    assert code == 0, err
    assert not (run / "trigger.safetensors").exists() and not (run / "teacher").exists()
    assert runs.read_meta(run)["attack"]["name"] == "badnets"
    assert_complete(run)


def test_detect_overwrite_replaces_its_report(capsys, tmp_path, base):
    out = tmp_path / "nc"
    argv = ["detect", "--model", base, "--clean-count", "20", "--epochs", "1", "--targets", "0,1", *QUIET, "--out", out]
    assert cli(capsys, *argv)[0] == 0
    (out / "stale.txt").write_text("x")
    code, _, err = cli(capsys, *argv, "--overwrite")
    assert code == 0, err
    # the stale file is gone; what remains is the report, the job record and the per-class searches
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE, "detect.json", "job.json", "masks.png", "search"]
    assert sorted(p.name for p in (out / "search").iterdir()) == ["class-0", "class-1"]


@pytest.mark.parametrize("argv, needles", [
    (["--resume", "--overwrite"], ["--resume or --overwrite, not both"]),
])
def test_resume_and_overwrite_exclude_each_other(capsys, tmp_path, base, argv, needles):
    run = copy_run(base, tmp_path / "run")
    before = snapshot(run)
    assert_error(cli(capsys, *ATTACK, "--out", run, *argv), *needles)
    assert snapshot(run) == before


def test_overwrite_never_clears_a_folder_that_is_no_run_folder(capsys, tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("keep me")
    assert_error(cli(capsys, *BLEND, "--out", tmp_path / "docs", "--overwrite"), "notes.txt", "no run folder")
    assert (tmp_path / "docs" / "notes.txt").read_text() == "keep me"


def test_out_must_not_hold_the_model_being_read(capsys, tmp_path, base):
    run = copy_run(base, tmp_path / "run")
    before = snapshot(run)
    for out in (run, tmp_path):
        assert_error(cli(capsys, "purify", "--model", run, *FINETUNE, "--out", out, "--overwrite"),
                     "holds the model being read")
    assert snapshot(run) == before


def test_a_second_job_into_a_busy_folder_fails_at_once(capsys, tmp_path, base):
    out = tmp_path / "ft"
    with claim(out):
        line = assert_error(cli(capsys, "purify", "--model", base, *FINETUNE, "--out", out), "in use by another job",
                            f"pid {os.getpid()}")
        assert "choose another --out" in line
        # The lock is the kernel's: any other holder of the file is refused too.
        fd = os.open(out / LOCK_FILE, os.O_RDWR)
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(fd)
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]


# ------------------------------------------------------------------------------ atomic run folders

def inject_enospc(m: pytest.MonkeyPatch, name: str):
    """Make every write of a file called ``name`` (staged or not) fail as on a full disk."""
    def boom(path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    save, history, write_text = runs.save_file, runs.write_history, Path.write_text
    m.setattr(runs, "save_file", lambda t, p, **kw: boom(p) if name in str(p) else save(t, p, **kw))
    m.setattr(runs, "write_history", lambda p, h: boom(p) if name in str(p) else history(p, h))
    m.setattr(Path, "write_text", lambda self, *a, **kw: boom(self) if name in self.name else write_text(self, *a, **kw))


@pytest.mark.parametrize("name", ["model.safetensors", "meta.json", "metrics.json", "history.csv",
                                  "trigger.safetensors"])
def test_a_full_disk_while_writing_keeps_the_old_folder(capsys, tmp_path, blend, monkeypatch, name):
    run = copy_run(blend, tmp_path / "run")
    before = snapshot(run)
    with monkeypatch.context() as m:
        inject_enospc(m, name)
        assert_error(cli(capsys, *BLEND, "--out", run, "--resume"), name, "No space left on device", "--resume")
    assert snapshot(run) == before
    assert_complete(run)


@pytest.mark.parametrize("name", ["model.safetensors", "meta.json", "metrics.json"])
def test_a_failed_rename_leaves_a_folder_that_readers_refuse_and_resume_repairs(capsys, tmp_path, blend,
                                                                                monkeypatch, name):
    run = copy_run(blend, tmp_path / "run")
    real = os.replace

    def replace(src, dst):
        if Path(dst) == run / name:
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(dst))
        return real(src, dst)
    with monkeypatch.context() as m:
        m.setattr(os, "replace", replace)
        assert_error(cli(capsys, *BLEND, "--out", run, "--resume"), name, "Input/output error")
    assert_error(cli(capsys, "evaluate", "--model", run, "--device", "cpu"), str(run), "incomplete", "--resume")
    code, _, err = cli(capsys, *BLEND, "--out", run, "--resume")
    assert code == 0, err
    assert_complete(run)


def test_a_failed_checkpoint_write_is_one_line_and_leaves_no_folder(capsys, tmp_path, monkeypatch):
    def save(*a, **kw):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "run"
    assert_error(cli(capsys, *ATTACK, "--out", out), "cannot write a checkpoint", str(out), "disk may be full")
    assert not out.exists()


@pytest.mark.parametrize("damage, needles", [
    (lambda r: (r / "meta.json").unlink(), ["incomplete", "before meta.json"]),
    (lambda r: (r / "metrics.json").unlink(), ["incomplete", "metrics.json is missing"]),
    (lambda r: (r / "metrics.json").write_text('{"acc": 1.0}'), ["inconsistent", "metrics.json"]),
    (lambda r: (r / "history.csv").write_text("epoch\n7\n"), ["inconsistent", "history.csv"]),
    (lambda r: (r / "model.safetensors").write_bytes(b"\0" * 64), ["inconsistent", "model.safetensors"]),
    (lambda r: (r / "trigger.safetensors").write_bytes(b"junk"), ["inconsistent", "trigger.safetensors"]),
])
def test_damaged_or_mixed_run_folders_are_refused(capsys, tmp_path, blend, damage, needles):
    run = copy_run(blend, tmp_path / "run")
    damage(run)
    assert_error(cli(capsys, "evaluate", "--model", run, "--device", "cpu"), str(run), *needles)
    assert_error(cli(capsys, "show-trigger", "--run", run, "--out", tmp_path / "t.png"), *needles)


def test_new_weights_beside_old_metadata_are_refused(capsys, tmp_path, base, blend):
    run = copy_run(blend, tmp_path / "run")
    shutil.copy(base / "model.safetensors", run / "model.safetensors")
    assert_error(cli(capsys, "evaluate", "--model", run, "--device", "cpu", *ARCH), "inconsistent",
                 "model.safetensors")


def test_folders_without_a_file_list_are_read_as_before(capsys, tmp_path, blend):
    run = copy_run(blend, tmp_path / "run")
    edit_meta(run, lambda m: m.pop("files"))
    (run / "metrics.json").write_text("not read by the toolkit")
    code, out, err = cli(capsys, "evaluate", "--model", run, "--json", "--device", "cpu")
    assert code == 0, err
    assert json.loads(out)["attack"]["name"] == "blend"


@pytest.mark.parametrize("legacy", [True, False])
@pytest.mark.parametrize("name, needle", [("model.safetensors", "cannot read"), ("trigger.safetensors", "cannot read")])
def test_corrupt_safetensors_in_a_run_folder(capsys, tmp_path, blend, legacy, name, needle):
    run = copy_run(blend, tmp_path / "run")
    (run / name).write_bytes(b"\x08\0\0\0\0\0\0\0{\"a\":1}" + b"x" * 40)
    if legacy:
        edit_meta(run, lambda m: m.pop("files"))
    else:
        recommit(run, name)
    assert_error(cli(capsys, "evaluate", "--model", run, "--device", "cpu"), name, needle)


# ------------------------------------------------------------------------------ meta.json and other files

@pytest.mark.parametrize("key, value", [("num_classes", "ten"), ("input_shape", 5), ("classes", 3),
                                        ("dataset", "synthetic"), ("attack", []), ("seed", "0"), ("files", []),
                                        ("normalization", {"mean": "x", "std": None}), ("sites", "block1"),
                                        ("arch", 16), ("source", {"model": 3})])
def test_meta_json_with_wrong_types_is_one_line(capsys, tmp_path, base, key, value):
    run = copy_run(base, tmp_path / "run")
    edit_meta(run, lambda m: m.__setitem__(key, value))
    assert_error(cli(capsys, "evaluate", "--model", run, "--device", "cpu"), "meta.json", key.split(".")[0])


@pytest.mark.parametrize("content, needle", [(b"{not json", "not valid JSON"), (b"\xff\xfe\x00", "not valid JSON"),
                                             (b"[1, 2]", "holds no mapping")])
def test_unreadable_meta_json(capsys, tmp_path, base, content, needle):
    run = copy_run(base, tmp_path / "run")
    (run / "meta.json").write_bytes(content)
    assert_error(cli(capsys, "evaluate", "--model", run, "--device", "cpu"), "meta.json", needle)
    assert_error(cli(capsys, "show-trigger", "--run", run, "--out", tmp_path / "t.png"), "meta.json", needle)


def test_a_recorded_attack_with_a_wrong_config_type(capsys, tmp_path, base):
    run = copy_run(base, tmp_path / "run")
    edit_meta(run, lambda m: m["attack"]["config"].__setitem__("target", "zero"))
    assert_error(cli(capsys, "evaluate", "--model", run, "--device", "cpu"), "target")


@pytest.mark.parametrize("write, needle", [
    (lambda p: p.write_bytes(os.urandom(300)), "cannot read checkpoint"),
    (lambda p: torch.save([1, 2, 3], p), "holds no state dict"),
    (lambda p: torch.save({"fc.weight": torch.zeros(2, 2)}, p), "does not fit the architecture"),
])
def test_bad_bare_checkpoints(capsys, tmp_path, write, needle):
    path = tmp_path / "m.pt"
    write(path)
    assert_error(cli(capsys, "evaluate", "--model", path, *ARCH, *DATA, "--device", "cpu"),
                 "m.pt", needle)


@pytest.mark.parametrize("text, needle", [("target: [1", "cannot parse"), ("- 1\n- 2\n", "must hold a mapping"),
                                          ("target: abc\n", "target"), ("nope: 1\n", "nope"),
                                          ("rate: 3\n", "poisoning rate")])
def test_bad_yaml_params(capsys, tmp_path, text, needle):
    (tmp_path / "p.yaml").write_text(text)
    out = tmp_path / "o"
    assert_error(cli(capsys, *BLEND, "--params", tmp_path / "p.yaml", "--out", out), needle)
    assert not out.exists()


# ------------------------------------------------------------------------------ impossible inputs

BAD_INPUTS = [
    # (argv, needles): "{base}" is the module's run folder, "{tmp}" the test's tmp_path
    (["evaluate", "--model", "{tmp}/none", "--device", "cpu"], ["does not exist"]),
    (["evaluate", "--model", "{tmp}", "--device", "cpu"], ["not a run folder"]),
    (["evaluate", "--model", "{tmp}/p.txt", *ARCH, "--device", "cpu"], ["unknown model file type"]),
    (["evaluate", "--model", "{base}", "--attack", "nope", "--device", "cpu"], ["unknown attack 'nope'"]),
    (["evaluate", "--model", "{base}", "--attack", "badnets", "--target", "12", "--device", "cpu"], ["target class 12"]),
    ([*BLEND, "--target", "12", "--out", "{tmp}/o"], ["target class 12"]),
    ([*BLEND, "--target", "-1", "--out", "{tmp}/o"], ["target class -1"]),
    ([*BLEND, "--rate", "1.5", "--out", "{tmp}/o"], ["poisoning rate"]),
    ([*BLEND, "--batch-size", "0", "--out", "{tmp}/o"], ["batch size"]),
    ([*BLEND, "--epochs", "-1", "--out", "{tmp}/o"], ["epochs must be"]),
    ([*BLEND, "--params", "{tmp}/missing.yaml", "--out", "{tmp}/o"], ["does not exist"]),
    (["attack", "--dataset", "folder", "--data-dir", "{tmp}/none", "--attack", "badnets", "--out", "{tmp}/o"],
     ["does not exist"]),
    (["attack", "--dataset", "folder", "--data-dir", "{tmp}/p.txt", "--attack", "badnets", "--out", "{tmp}/o"],
     ["not a folder"]),
    (["purify", "--model", "{base}", *FINETUNE, "--clean-count", "0", "--out", "{tmp}/o"], ["clean count"]),
    (["purify", "--model", "{base}", *FINETUNE, "--clean-count", "999999", "--out", "{tmp}/o"], ["clean count"]),
    (["purify", "--model", "{base}", "--method", "finetune", "--clean-fraction", "0", "--out", "{tmp}/o"],
     ["--clean-fraction"]),
    (["purify", "--model", "{base}", "--method", "finetune", "--epochs-budget", "0", "--out", "{tmp}/o"], ["≥ 1"]),
    (["purify", "--model", "{base}", "--method", "finetune", "--epochs", "x", "--out", "{tmp}/o"], ["cannot read 'x'"]),
    (["detect", "--model", "{base}", "--clean-count", "0", "--out", "{tmp}/o", *QUIET], ["clean count"]),
    (["show-trigger", "--attack", "badnets", "--count", "0", "--out", "{tmp}/t.png"], ["--count"]),
    (["show-trigger", "--attack", "badnets", "--count", "-3", "--out", "{tmp}/t.png"], ["--count"]),
    (["show-trigger", "--attack", "badnets", "--amplify", "nan", "--out", "{tmp}/t.png"], ["--amplify"]),
    (["show-trigger", "--attack", "badnets", "--amplify", "0", "--out", "{tmp}/t.png"], ["--amplify"]),
    (["show-trigger", "--run", "{tmp}/none", "--out", "{tmp}/t.png"], ["not a run folder"]),
]


@pytest.mark.parametrize("argv, needles", BAD_INPUTS)
def test_bad_inputs(capsys, tmp_path, base, argv, needles):
    (tmp_path / "p.txt").write_text("x")
    argv = [a.replace("{base}", str(base)).replace("{tmp}", str(tmp_path)) for a in argv]
    before = snapshot(base)
    assert_error(cli(capsys, *argv), *needles)
    assert not (tmp_path / "o").exists() and not (tmp_path / "t.png").exists()
    assert snapshot(base) == before


@pytest.mark.parametrize("device, needle", [("mps", "MPS"), ("cuda:7", "cuda"), ("xla", "not supported"),
                                            ("nonsense", "unknown device")])
@pytest.mark.parametrize("command", ["attack", "purify", "evaluate", "detect", "show-trigger"])
def test_unavailable_devices_are_refused(capsys, tmp_path, base, command, device, needle):
    argv = {"attack": [*BLEND, "--out", tmp_path / "o"],
            "purify": ["purify", "--model", base, *FINETUNE, "--out", tmp_path / "o"],
            "evaluate": ["evaluate", "--model", base],
            "detect": ["detect", "--model", base, "--out", tmp_path / "o"],
            "show-trigger": ["show-trigger", "--attack", "badnets", "--out", tmp_path / "t.png"]}[command]
    if torch.cuda.is_available() and device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this host has a cuda:7")
    assert_error(cli(capsys, *argv, "--device", device), f"--device {device}" if device != "nonsense" else device,
                 needle)
    assert not (tmp_path / "o").exists() and not (tmp_path / "t.png").exists()


@pytest.mark.parametrize("command", ["attack", "detect"])
def test_an_unwritable_out_fails_before_any_work(capsys, tmp_path, base, command, monkeypatch):
    (tmp_path / "file").write_text("x")
    monkeypatch.setattr(workflows, "load_data", lambda *a, **k: pytest.fail("work started"))
    monkeypatch.setattr(runs, "read_state_dict", lambda *a, **k: pytest.fail("work started"))
    argv = [*ATTACK] if command == "attack" else ["detect", "--model", base, *QUIET]
    assert_error(cli(capsys, *argv, "--out", tmp_path / "file" / "run"), "cannot write the run folder",
                 str(tmp_path / "file" / "run"))
    assert_error(cli(capsys, *argv, "--out", tmp_path / "file"), "is a file")

    real = os.open

    def denied(path, *a, **kw):
        if str(path).endswith(LOCK_FILE):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real(path, *a, **kw)
    monkeypatch.setattr(os, "open", denied)
    assert_error(cli(capsys, *argv, "--out", tmp_path / "ro"), "cannot write the run folder", "Permission denied")


def test_show_trigger_honours_device_and_reports_unwritable_png(capsys, tmp_path, monkeypatch):
    from backdoor_eraser.attacks.base import Attack

    seen = []
    real = Attack.fit_trigger

    def fit_trigger(self, train, *, seed=0, device="cpu", quiet=False):
        seen.append(str(device))
        return real(self, train, seed=seed, device=device, quiet=quiet)
    monkeypatch.setattr(Attack, "fit_trigger", fit_trigger)
    code, _, err = cli(capsys, "show-trigger", "--attack", "blend", "--count", "2", "--device", "cpu",
                       "--out", tmp_path / "t.png")
    assert code == 0 and seen == ["cpu"], err
    (tmp_path / "file").write_text("x")
    assert_error(cli(capsys, "show-trigger", "--attack", "badnets", "--out", tmp_path / "file" / "t.png"),
                 str(tmp_path / "file"), code=1)


# ------------------------------------------------------------------------------ data sets

def test_a_one_class_folder_data_set_is_refused(capsys, tmp_path):
    data = image_tree(tmp_path / "one", classes=1)
    assert_error(cli(capsys, "attack", "--dataset", "folder", "--data-dir", data, *ARCH, "--attack", "badnets",
                     "--epochs", "0", *QUIET, "--out", tmp_path / "o"), "1 class", "at least 2 classes")
    assert not (tmp_path / "o").exists()


def test_a_corrupt_image_in_a_folder_data_set(capsys, tmp_path):
    data = image_tree(tmp_path / "two", classes=2)
    (data / "c01" / "1.png").write_bytes(b"\x89PNG broken")
    assert_error(cli(capsys, "attack", "--dataset", "folder", "--data-dir", data, *ARCH, "--attack", "badnets",
                     "--epochs", "0", *QUIET, "--out", tmp_path / "o"), "cannot decode image", "1.png")


def test_a_model_and_a_data_set_with_other_classes(capsys, tmp_path, base):
    few = image_tree(tmp_path / "few", classes=2)
    code, out, err = cli(capsys, "evaluate", "--model", base, "--dataset", "folder", "--data-dir", few, "--device", "cpu")
    assert code == 0 and "Traceback" not in err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "10 classes" in warnings[0] and "data set 2" in warnings[0]
    many = image_tree(tmp_path / "many", classes=12)
    assert_error(cli(capsys, "evaluate", "--model", base, "--dataset", "folder", "--data-dir", many, "--device", "cpu"),
                 "labels up to 11", "only 10 outputs")
    assert_error(cli(capsys, "purify", "--model", base, *FINETUNE, "--dataset", "folder", "--data-dir", many,
                     "--out", tmp_path / "o"), "labels up to 11")
    assert not (tmp_path / "o").exists()


def test_the_image_cache_sees_a_file_replaced_by_an_older_one(tmp_path):
    from backdoor_eraser.data import load_dataset

    data = image_tree(tmp_path / "tree", classes=2)
    target = data / "c00" / "0.png"
    first = load_dataset("folder", data, cache_dir=tmp_path / "c")
    stamp = target.stat().st_mtime_ns
    # Rewritten in place (same inode, same directory mtime) and dated back, as `cp -p` of an older
    # file does: neither the file count nor the newest mtime in the tree changes.
    Image.fromarray(np.full((32, 32, 3), 7, np.uint8)).save(target)
    os.utime(target, ns=(stamp - 10**12, stamp - 10**12))
    second = load_dataset("folder", data, cache_dir=tmp_path / "c")
    assert not torch.equal(first.train.images, second.train.images) or \
        not torch.equal(first.test.images, second.test.images)
    assert (second.train.images == 7).all(dim=(1, 2, 3)).any() or (second.test.images == 7).all(dim=(1, 2, 3)).any()



@pytest.mark.parametrize("method, params, needle", [
    ("nad", ["--beta", "1,2"], "beta has 2 weights but there are 3 attention sites"),
    ("nad", ["--sites", "block1;nope;block3"], "nope"),
    ("argd", ["--node-beta", "1,2,3,4"], "beta has 4 weights but there are 3 attention sites"),
    ("sage", ["--beta", "1,2,3"], "beta has 3 weights but there are 2 paths"),
    ("sage", ["--paths", "0-5"], "SAGE path"),
])
def test_distillation_settings_that_cannot_fit_the_model_fail_before_the_teacher(capsys, tmp_path, base, monkeypatch,
                                                                                 method, params, needle):
    from backdoor_eraser.training import Trainer

    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(Trainer, "fit", no_training)
    out = tmp_path / "o"
    assert_error(cli(capsys, "purify", "--model", base, "--method", method, "--clean-count", "20", *params,
                     "--out", out, *QUIET), needle)
    assert not out.exists()
