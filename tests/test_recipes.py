"""Training recipes: augmentation steps (Cutout), defense presets, and the precision choice."""
import dataclasses
import json

import pytest
import torch

from backdoor_eraser import defenses
from backdoor_eraser.cli import main
from backdoor_eraser.data.augment import Augment, cutout, make_augment, parse_augment
from backdoor_eraser.errors import UserError
from backdoor_eraser.grid.spec import SpecError, expand, parse_spec
from backdoor_eraser.training import ATTACK_TRAINING, TrainConfig, precision
from backdoor_eraser.training.precision import resolve_amp

CPU = torch.device("cpu")


# --- Cutout ------------------------------------------------------------------------------------------

def fixed_randint(monkeypatch, draws):
    """Make torch.randint return the given centre rows/columns in turn (one tensor per call)."""
    seq = iter(draws)

    def fake(low, high, size, generator=None, device=None):
        values = torch.tensor(next(seq), dtype=torch.int64)
        assert values.shape == tuple(size) and bool((values >= low).all()) and bool((values < high).all())
        return values

    monkeypatch.setattr(torch, "randint", fake)


def test_cutout_zeroes_the_releases_2x2_square(monkeypatch):
    x = torch.full((3, 3, 8, 8), 200, dtype=torch.uint8)
    # centres (row, col): (4, 5) and (7, 3) give rows/cols c-1 and c; (0, 0) is clipped to one pixel
    fixed_randint(monkeypatch, [[4, 0, 7], [5, 0, 3]])
    out = cutout(x, holes=1, length=3)
    zero = (out == 0).all(dim=1)  # a hole covers every channel
    assert (out.sum(dim=1) == 0).equal(zero)
    assert sorted(map(tuple, zero[0].nonzero().tolist())) == [(3, 4), (3, 5), (4, 4), (4, 5)]
    assert zero[1].nonzero().tolist() == [[0, 0]]
    assert sorted(map(tuple, zero[2].nonzero().tolist())) == [(6, 2), (6, 3), (7, 2), (7, 3)]
    assert (out[~zero.unsqueeze(1).expand_as(out)] == 200).all()
    assert out.dtype == torch.uint8 and x.eq(200).all()  # the input is not modified


def test_cutout_length_5_and_two_holes(monkeypatch):
    x = torch.ones(1, 1, 10, 10, dtype=torch.uint8)
    fixed_randint(monkeypatch, [[5], [5], [0], [9]])
    out = cutout(x, holes=2, length=5)
    holes = (out[0, 0] == 0).nonzero().tolist()
    first = [[r, c] for r in range(3, 7) for c in range(3, 7)]   # rows/cols 5-2 .. 5+2 (half-open)
    second = [[r, c] for r in range(0, 2) for c in range(7, 10)]  # centre (0, 9) clipped
    assert sorted(holes) == sorted(first + second)


def test_augment_steps_parse_in_release_order():
    assert parse_augment("crop-flip") == ("crop", "flip")
    assert parse_augment("none") == ()
    assert parse_augment("cutout+flip+crop") == ("crop", "flip", "cutout")
    for bad in ("crop+blur", "crop+crop"):
        with pytest.raises(ValueError):
            parse_augment(bad)
    with pytest.raises(UserError, match="unknown augmentation step 'blur'"):
        TrainConfig(augment="crop+blur").check()
    assert make_augment(TrainConfig(augment="none")) is None


def test_crop_flip_draws_are_unchanged_by_the_step_list():
    """The generator sequence of crop + flip is the one CropFlip used, so old recipes give old numbers."""
    from backdoor_eraser.data.augment import CropFlip

    x = torch.randint(0, 256, (16, 3, 12, 12), generator=torch.Generator().manual_seed(1)).to(torch.uint8)
    a = CropFlip(4)(x, torch.Generator().manual_seed(7))
    b = make_augment(TrainConfig(augment="crop-flip"))(x, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    c = make_augment(TrainConfig(augment="crop+flip+cutout"))(x, torch.Generator().manual_seed(7))
    changed = (c != a).any(1)  # N×H×W: pixels Cutout zeroed (that were not already black)
    assert (c.permute(0, 2, 3, 1)[changed] == 0).all()
    assert changed.flatten(1).sum(1).max() <= 4 and changed.any()


def test_augment_is_seeded():
    aug = Augment(("crop", "flip", "cutout"))
    x = torch.randint(0, 256, (8, 3, 16, 16), generator=torch.Generator().manual_seed(2)).to(torch.uint8)
    assert torch.equal(aug(x, torch.Generator().manual_seed(3)), aug(x, torch.Generator().manual_seed(3)))


# --- presets ----------------------------------------------------------------------------------------

def factors(cfg, epochs):
    sched = cfg.make_schedule()
    return [round(sched.factor(e, epochs), 10) for e in range(epochs)]


def test_nad_release_preset_is_the_release_recipe():
    nad = defenses.create("nad", preset="release")
    cfg = nad.config
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.momentum, cfg.nesterov, cfg.weight_decay) == (20, 64, 0.1, 0.9, True, 1e-4)
    assert factors(cfg, 20) == [1.0, 1.0] + [0.1] * 18
    assert cfg.beta == (500.0, 1000.0, 1000.0) and cfg.teacher_epochs == 10
    assert make_augment(cfg).steps == ("crop", "flip", "cutout")
    assert (cfg.cutout_holes, cfg.cutout_length) == (1, 3)
    paper = defenses.create("nad", preset="paper").config
    assert paper.epochs == 10 and factors(paper, 10) == [1, 1, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001, 0.0001, 0.0001]
    assert paper.beta == (5000.0,) * 3
    fast, short = defenses.create("nad", preset="fast").config, defenses.create("nad", preset="short").config
    assert (fast.epochs, fast.teacher_epochs) == (5, 4) and factors(fast, 5) == [1, 1, 0.1, 0.1, 0.01]
    # apart from the epochs, fast is the short recipe: the paper's schedule with the release's β, no recovery
    assert dataclasses.replace(fast, epochs=10, teacher_epochs=10) == short
    assert factors(short, 10) == factors(paper, 10) and short.beta == (500.0, 1000.0, 1000.0)
    assert short.kd_epochs == 0 and paper.kd_epochs == 0 and cfg.kd_epochs == 0


def test_the_defaults_of_finetune_nad_and_argd_are_erase_recover():
    """Constant lr 0.1 for 10 epochs (teacher alike), then 40 epochs distilling the input model back."""
    for name in ("finetune", "nad", "argd"):
        default = defenses.create(name).config
        assert default == defenses.create(name, preset="erase-recover").config, name
        assert factors(default, 10) == [1.0] * 10 and default.epochs == 10 and default.lr == 0.1
        assert (default.kd_epochs, default.kd_lr, default.kd_schedule, default.kd_alpha) == (40, 0.05, "cosine", 0.9)
        assert default.kd_train_config().augment == "crop+flip" and default.augment == "crop+flip+cutout"
        short = defenses.create(name, preset="short").config
        assert short.kd_epochs == 0 and short.epochs == 10, name
    assert factors(defenses.create("finetune", preset="short").config, 10) == [1, 1, 0.1, 0.1, 0.01, 0.01, 0.001,
                                                                                0.001, 0.0001, 0.0001]
    # ARGD's short recipe is its paper preset: the release's steps at epochs 3 and 6
    argd_short = defenses.create("argd", preset="short").config
    assert argd_short == defenses.create("argd", preset="paper").config
    assert factors(argd_short, 10) == [1, 1, 1, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01, 0.01]
    # SAGE keeps its own schedule and no recovery
    assert defenses.create("sage").config.kd_epochs == 0


def test_other_presets():
    ft = defenses.create("finetune", preset="release").config
    assert ft.epochs == 20 and factors(ft, 20) == [1.0, 1.0] + [0.1] * 18 and ft.augment == "crop+flip+cutout"
    er = defenses.create("finetune", preset="erase-recover").config
    assert er.epochs == 10 and factors(er, 10) == [1.0] * 10 and er.augment == "crop+flip+cutout"
    assert (er.kd_epochs, er.kd_lr, er.kd_schedule, er.kd_augment) == (40, 0.05, "cosine", "crop+flip")
    # the explored recipe's values, written as flags over the defaults, are the preset
    assert er == defenses.create("finetune", schedule="constant", epochs=10, kd_epochs=40).config
    for name in ("nad", "argd"):  # the same structure for the distillations, teacher included
        er = defenses.create(name, preset="erase-recover").config
        assert factors(er, 10) == [1.0] * 10 and er.teacher_epochs == 10 and er.augment == "crop+flip+cutout"
        assert factors(er.train_config(epochs=er.teacher_epochs), 10) == [1.0] * 10
        assert er == defenses.create(name, schedule="constant", milestones=(), epochs=10, kd_epochs=40).config
    argd = defenses.create("argd", preset="release").config
    assert argd.release_compat and factors(argd, 10) == [1, 1, 1, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01, 0.01]
    assert not defenses.create("argd", preset="paper").config.release_compat
    sage = defenses.create("sage", preset="release").config
    assert not sage.dynamic_lr and sage.select == "last" and sage.lr == 0.05 and sage.epochs == 100
    assert defenses.create("sage", preset="paper").config.dynamic_lr


def test_explicit_values_win_over_a_preset_and_both_are_recorded():
    nad = defenses.create("nad", preset="release", lr=0.03, epochs=4)
    assert nad.config.lr == 0.03 and nad.config.epochs == 4 and nad.config.milestones == (2,)
    desc = nad.describe()
    assert desc["preset"] == "release" and desc["explicit"] == {"lr": 0.03, "epochs": 4}
    assert desc["config"]["lr"] == 0.03 and json.dumps(desc)
    plain = defenses.create("nad").describe()
    assert plain["preset"] is None and plain["explicit"] == {}


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(UserError, match=r"defense 'nad' has no preset 'quick'; its presets: erase-recover, fast, paper, release, short"):
        defenses.create("nad", preset="quick")
    with pytest.raises(UserError, match="its presets: none"):
        defenses.create("anp", preset="paper")


def test_defense_defaults_include_cutout_and_auto_precision():
    for name in ("finetune", "nad", "argd", "sage", "fine-pruning", "mcr"):
        cfg = defenses.create(name).config
        assert cfg.augment == "crop+flip+cutout" and cfg.amp == "auto", name
        assert isinstance(cfg.train_config(), TrainConfig) and type(cfg.train_config()) is TrainConfig


def test_grid_spec_takes_a_preset():
    text = """
name: t
datasets: [synthetic]
archs: [wrn-16-1]
attacks: [badnets]
defenses: [{name: nad, label: nad-release, preset: release, params: {lr: 0.05}}]
seeds: [0]
clean_fractions: [0.1]
"""
    spec = parse_spec(text, source="t.yaml")
    cell = [c for c in expand(spec) if c.kind == "defense"][0]
    d = cell.config["defense"]
    assert d["preset"] == "release" and d["params"]["lr"] == 0.05
    assert d["config"]["epochs"] == 20 and d["config"]["milestones"] == [2] and d["config"]["lr"] == 0.05
    with pytest.raises(SpecError, match=r"t.yaml: defenses\[0\]: defense 'nad' has no preset 'x'"):
        parse_spec(text.replace("preset: release", "preset: x"), source="t.yaml")


def test_grid_attack_cells_start_from_the_attack_training_defaults():
    spec = parse_spec("name: t\ndatasets: [synthetic]\narchs: [wrn-16-1]\nattacks: [badnets]\n"
                      "attack_train: {epochs: 3}\n", source="t.yaml")
    train = [c for c in expand(spec) if c.kind == "attack"][0].config["train"]
    assert train["epochs"] == 3 and train["weight_decay"] == ATTACK_TRAINING["weight_decay"]
    assert train["milestones"] == list(ATTACK_TRAINING["milestones"]) and train["batch_size"] == 128


# --- precision ----------------------------------------------------------------------------------------

@pytest.fixture
def no_fp32_override(monkeypatch):
    monkeypatch.delenv(precision.FP32_ENV, raising=False)


def mock_cpu(monkeypatch, capability, bf16, amx=False):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)


def test_auto_picks_fp32_without_native_bf16(monkeypatch, no_fp32_override):
    mock_cpu(monkeypatch, "AVX2", bf16=True)  # the instructions exist but ATen runs its AVX2 kernels
    assert resolve_amp("auto", CPU) == "none"
    mock_cpu(monkeypatch, "AVX512", bf16=False)
    assert resolve_amp("auto", CPU) == "none"
    mock_cpu(monkeypatch, "AVX512", bf16=True)
    assert resolve_amp("auto", CPU) == "bf16"
    mock_cpu(monkeypatch, "AVX512", bf16=False, amx=True)
    assert resolve_amp("auto", CPU) == "bf16"
    assert resolve_amp("none", CPU) == "none"


def test_fp32_override_keeps_auto_in_fp32(monkeypatch):
    mock_cpu(monkeypatch, "AVX512", bf16=True)
    monkeypatch.setenv(precision.FP32_ENV, "1")
    assert resolve_amp("auto", CPU) == "none" and resolve_amp("bf16", CPU) == "bf16"


def test_forced_bf16_falls_back_with_one_warning_or_fails_when_strict(monkeypatch, no_fp32_override):
    mock_cpu(monkeypatch, "AVX2", bf16=False)
    monkeypatch.setattr(precision, "_warned", set())
    lines = []
    assert resolve_amp("bf16", CPU, say=lines.append) == "none"
    assert resolve_amp("bf16", CPU, say=lines.append) == "none"
    assert len(lines) == 1 and lines[0].startswith("warning: --amp bf16 falls back to fp32: ") and "AVX2" in lines[0]
    with pytest.raises(UserError, match="--amp bf16 with --amp-strict: the CPU's kernel level is AVX2"):
        resolve_amp("bf16", CPU, strict=True)
    mock_cpu(monkeypatch, "AVX512", bf16=True)
    assert resolve_amp("bf16", CPU, strict=True) == "bf16"


def test_trainer_records_the_precision_it_used(monkeypatch, no_fp32_override):
    from backdoor_eraser.classifier import Classifier
    from backdoor_eraser.data.dataset import ImageDataset
    from backdoor_eraser.training import Trainer

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(4, 2))
    model = Classifier(net, "tiny", ["a", "b"], input_shape=(3, 8, 8))
    data = ImageDataset(torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8), torch.tensor([0, 1] * 4),
                        classes=["a", "b"])
    mock_cpu(monkeypatch, "AVX2", bf16=False)
    res = Trainer(TrainConfig(epochs=1, batch_size=4, augment="none"), quiet=True).fit(model, data)
    assert res.precision == "none"
    mock_cpu(monkeypatch, "AVX512", bf16=True)
    res = Trainer(TrainConfig(epochs=1, batch_size=4, augment="none"), quiet=True).fit(model, data)
    assert res.precision == "bf16"


def test_cli_strict_bf16_fails_before_any_work(monkeypatch, tmp_path, capsys, no_fp32_override):
    mock_cpu(monkeypatch, "AVX2", bf16=False)
    out = tmp_path / "run"
    rc = main(["attack", "--dataset", "synthetic", "--attack", "badnets", "--epochs", "1", "--amp", "bf16",
               "--amp-strict", "--out", str(out), "--quiet", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "--amp-strict" in err and "AVX2" in err and "Traceback" not in err
    assert not (out / "model.safetensors").exists()


def test_cli_training_flags_cover_every_train_config_field():
    from backdoor_eraser.cli import _train_config, build_parser
    from backdoor_eraser.registry import config_fields

    args, rest = build_parser().parse_known_args(
        ["attack", "--dataset", "synthetic", "--attack", "badnets", "--out", "x", "--augment", "crop+flip+cutout",
         "--cutout-length", "5", "--milestones", "10,20", "--nesterov", "false", "--drop-last", "--seed", "3"])
    assert rest == []
    cfg = _train_config(args)
    assert cfg.augment == "crop+flip+cutout" and cfg.cutout_length == 5 and cfg.milestones == (10, 20)
    assert cfg.nesterov is False and cfg.drop_last is True and cfg.seed == 3
    assert cfg.epochs == ATTACK_TRAINING["epochs"] and cfg.schedule == ATTACK_TRAINING["schedule"]
    for name, _, _ in config_fields(TrainConfig):
        if name != "seed":
            assert hasattr(args, f"train_{name}"), name


def test_run_purify_seed_reaches_the_defense_training_and_preset_is_recorded(demo_run, tmp_path):
    from backdoor_eraser import workflows

    out = tmp_path / "ft"
    workflows.run_purify(model=demo_run / "backdoored", method="finetune", out=out, seed=3, clean_count=64,
                         preset="release", defense_params={"epochs": 1, "amp": "none"}, quiet=True,
                         epoch_eval=False)
    meta = json.loads((out / "meta.json").read_text())
    d = meta["defense"]
    assert d["config"]["seed"] == 3 and meta["clean_subset"]["seed"] == 3
    assert d["preset"] == "release" and d["explicit"] == {"epochs": 1, "amp": "none", "seed": 3}
    assert d["config"]["milestones"] == [2] and d["config"]["epochs"] == 1 and meta["precision"] == "none"


def test_val_curves_record_the_validation_metrics_of_every_epoch(demo_run, tmp_path):
    """--val-curves: each history row carries the validation images' ACC/ASR/RA (no test columns without
    epoch_eval), and the last row's equal the run's final validation metrics (fine-tuning keeps its last epoch)."""
    import csv

    from backdoor_eraser import workflows

    out = tmp_path / "ft"
    metrics = workflows.run_purify(model=demo_run / "backdoored", method="finetune", out=out, clean_count=64,
                                   defense_params={"epochs": 2, "kd_epochs": 0, "amp": "none"}, quiet=True,
                                   epoch_eval=False, val_curves=True)
    rows = list(csv.DictReader((out / "history.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert {"val_acc", "val_asr", "val_ra"} <= set(rows[0]) and "acc" not in rows[0] and "asr" not in rows[0]
    for key in ("acc", "asr", "ra"):
        assert float(rows[-1][f"val_{key}"]) == pytest.approx(metrics["val"][key])
    assert rows[0]["val_acc"] != rows[1]["val_acc"] or rows[0]["val_asr"] != rows[1]["val_asr"]


def test_the_input_model_is_evaluated_on_test_once_per_model_and_split(demo_run, tmp_path, monkeypatch):
    """A grid worker runs every defense of one model in a row: the second run reuses the input model's
    test metrics and triggered test set, which equal a fresh evaluation; another split object does not."""
    from backdoor_eraser import workflows
    from backdoor_eraser.metrics import evaluate
    from backdoor_eraser.runs import read_meta

    model = demo_run / "backdoored"
    splits, _ = workflows.data_for(read_meta(model), None, None, None)
    calls = []
    monkeypatch.setattr(workflows, "evaluate", lambda *a, **k: calls.append(k["name"]) or evaluate(*a, **k))
    monkeypatch.setattr(workflows, "_ON_TEST", {})
    runs = [workflows.run_purify(model=model, method="finetune", out=tmp_path / f"ft{i}", seed=i, clean_count=64,
                                 defense_params={"epochs": 1, "amp": "none"}, quiet=True, epoch_eval=False,
                                 splits=splits) for i in range(2)]
    assert calls.count(f"model {model}") == 1
    before = [{k: v for k, v in r["before"].items() if k != "val"} for r in runs]
    assert before[0] == before[1] and before[0]["asr"] > 0.5
    other, _ = workflows.data_for(read_meta(model), None, None, None)
    workflows.run_purify(model=model, method="finetune", out=tmp_path / "ft2", clean_count=64, quiet=True,
                         defense_params={"epochs": 1, "amp": "none"}, epoch_eval=False, splits=other)
    assert calls.count(f"model {model}") == 2
