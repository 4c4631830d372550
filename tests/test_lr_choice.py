"""The automatic lr (defenses/lr_choice.py) and the developers' validation images (data/subset.py)."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from backdoor_eraser import defenses, workflows
from backdoor_eraser.data.subset import select_clean_subset, select_validation
from backdoor_eraser.defenses.lr_choice import PROBE_FILE, LrChoice, probe_lr, split_for_probe
from backdoor_eraser.errors import UserError
from backdoor_eraser.grid.aggregate import cell_values
from backdoor_eraser.metrics import accuracy
from backdoor_eraser.runs import read_meta


def shrunk(model, k: float):
    """The same function with every conv weight × k (BatchNorm running stats follow): BatchNorm makes
    the predictions unchanged, while an lr restart takes steps 1/k² times larger relative to the
    weights: a stand-in for a model trained with a stronger weight decay."""
    m = model.copy()
    with torch.no_grad():
        for mod in m.net.modules():
            if isinstance(mod, torch.nn.Conv2d):
                mod.weight.mul_(k)
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.mul_(k)
                mod.running_var.mul_(k * k)
    return m


FT = defenses.create("finetune").config.train_config()


def test_probe_gives_the_fragile_copy_a_smaller_lr(synthetic_backdoor):
    sb = synthetic_backdoor
    small = shrunk(sb.model, 0.1)
    test = sb.splits.test
    assert accuracy(small, test.images, test.labels) == pytest.approx(accuracy(sb.model, test.images, test.labels),
                                                                      abs=0.002)
    before = {k: v.clone() for k, v in sb.model.net.state_dict().items()}
    normal = probe_lr(sb.model, sb.clean, FT)
    fragile = probe_lr(small, sb.clean, FT)
    assert all(torch.equal(v, sb.model.net.state_dict()[k]) for k, v in before.items())  # input untouched
    # Measured: lr 0.1 leaves the demo model 0.83 held-out accuracy (base 1.0), lr 0.05 1.0, so 0.5 is
    # kept; the shrunk copy stays below 0.2 at every lr and gets the smallest factor.
    assert normal.factor > fragile.factor
    assert fragile.factor == 0.05 and [t["factor"] for t in fragile.tried] == [1.0, 0.5, 0.2, 0.1, 0.05]
    assert normal.tried[-1]["acc"] >= normal.base - 0.05
    assert all(t["acc"] < fragile.base - 0.05 for t in fragile.tried) and fragile.saturated
    assert not normal.saturated
    assert normal.lr == pytest.approx(0.1 * normal.factor) and normal.held_out == 100


def test_probe_is_deterministic(synthetic_backdoor):
    sb = synthetic_backdoor
    a = probe_lr(sb.model, sb.clean, FT, factors=(1.0, 0.1))
    b = probe_lr(sb.model, sb.clean, FT, factors=(1.0, 0.1))
    assert a.tried == b.tried and a.factor == b.factor


def test_probe_split_is_seeded_and_disjoint(synthetic_backdoor):
    clean = synthetic_backdoor.clean
    fit, val = split_for_probe(clean, 0.2, seed=3)
    fit2, val2 = split_for_probe(clean, 0.2, seed=3)
    assert torch.equal(val.index, val2.index) and len(val) == 100 and len(fit) == 400
    assert not set(fit.index.tolist()) & set(val.index.tolist())
    assert set(fit.index.tolist()) | set(val.index.tolist()) == set(clean.index.tolist())
    assert not torch.equal(split_for_probe(clean, 0.2, seed=4)[1].index, val.index)


@pytest.mark.parametrize("bad", [dict(lr_factors=()), dict(lr_factors=(1.5,)), dict(lr_tolerance=1.0)])
def test_bad_probe_settings_are_refused(synthetic_backdoor, bad):
    d = defenses.create("finetune", auto_lr=True, **bad)
    with pytest.raises(UserError, match="lr factors|lr tolerance"):
        d.fitted_config(synthetic_backdoor.model, synthetic_backdoor.clean)


def test_a_resumed_run_keeps_the_recorded_choice(synthetic_backdoor, tmp_path):
    recorded = LrChoice(factor=0.2, lr=0.02, base=0.9, tried=[{"factor": 0.2, "lr": 0.02, "acc": 0.88}])
    (tmp_path / PROBE_FILE).write_text(json.dumps(recorded.to_dict()))
    cfg, probe = defenses.create("nad", auto_lr=True).fitted_config(synthetic_backdoor.model, synthetic_backdoor.clean,
                                                                   tmp_path, quiet=True)
    assert cfg.lr == 0.02 and probe["factor"] == 0.2
    plain, none = defenses.create("nad").fitted_config(synthetic_backdoor.model, synthetic_backdoor.clean)
    assert plain.lr == 0.1 and none is None


def test_the_choice_reads_only_the_clean_subset(demo_run, synthetic_backdoor, tmp_path):
    """Replacing every test image by noise with random labels changes the reported metrics, not the lr
    chosen nor the purified weights."""
    sb = synthetic_backdoor
    g = torch.Generator().manual_seed(0)
    test = sb.splits.test
    noisy = dataclasses.replace(test, images=torch.randint(0, 256, test.images.shape, generator=g, dtype=torch.uint8),
                                labels=torch.randint(0, test.num_classes, test.labels.shape, generator=g))
    runs = {}
    for name, splits in (("real", sb.splits), ("noisy", dataclasses.replace(sb.splits, test=noisy))):
        out = tmp_path / name
        metrics = workflows.run_purify(model=sb.run_dir, method="finetune", out=out, clean_fraction=0.1,
                                       defense_params={"auto_lr": True, "epochs": 1, "kd_epochs": 0,
                                                       "lr_factors": [1.0, 0.5, 0.1]},
                                       splits=splits, quiet=True, epoch_eval=False)
        probe = read_meta(out)["defense_info"]["lr_probe"]
        probe.pop("seconds")
        runs[name] = (probe, metrics, (out / "model.safetensors").read_bytes())
    assert runs["real"][0] == runs["noisy"][0]
    # Which factor wins depends on the subset's trajectory on this host; what matters is that it was probed.
    tried = runs["real"][0]["tried"]
    assert tried and [t["factor"] for t in tried] == [1.0, 0.5, 0.1][:len(tried)]
    assert runs["real"][0]["factor"] in [t["factor"] for t in tried]
    assert runs["real"][2] == runs["noisy"][2]
    assert runs["real"][1]["acc"] != runs["noisy"][1]["acc"]
    assert runs["real"][1]["val"] == runs["noisy"][1]["val"]  # validation images come from the training split


def test_validation_images_avoid_the_clean_subset_and_the_poisoned():
    labels = torch.arange(1000) % 10
    clean = select_clean_subset(labels, fraction=0.1, seed=0)
    poisoned = torch.arange(0, 1000, 7)
    val = select_validation(1000, torch.cat([clean, poisoned]), count=300)
    assert len(val) == 300 and torch.equal(val, torch.sort(val).values)
    assert not set(val.tolist()) & (set(clean.tolist()) | set(poisoned.tolist()))
    assert torch.equal(val, select_validation(1000, torch.cat([clean, poisoned]), count=300))
    assert len(select_validation(20, torch.arange(15), count=300)) == 5  # the pool is all there is


def test_purify_reports_validation_metrics_and_the_grid_aggregates_them(demo_run):
    m = json.loads((demo_run / "finetune" / "metrics.json").read_text())
    if "val" not in m:
        pytest.skip("the kept demo run predates the validation metrics")
    assert m["val"]["n_test"] == 2000 and m["before"]["val"]["n_test"] == 2000
    v = cell_values(m)
    assert v["val_acc_drop"] == pytest.approx(m["before"]["val"]["acc"] - m["val"]["acc"])
    assert v["val_asr"] == m["val"]["asr"]
    assert m["before"]["val"]["asr"] > 0.9 > m["val"]["asr"]  # the demo's fine-tuning erases the backdoor


def test_cell_values_without_validation_metrics():
    v = cell_values({"acc": 0.8, "asr": 0.1, "before": {"acc": 0.9, "asr": 1.0}})
    assert v["val_acc_drop"] is None and v["val_asr"] is None
    assert v["acc_drop"] == pytest.approx(0.1)
