"""The one trainer: determinism, resume, schedules, NaN handling."""
import math

import pytest
import torch
from torch import nn

from backdoor_eraser.classifier import Classifier
from backdoor_eraser.data.dataset import ImageDataset
from backdoor_eraser.errors import UserError
from backdoor_eraser.training import Callback, Schedule, Task, Trainer, TrainConfig, TrainingDiverged


def tiny_model(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    return Classifier(net, "tiny", ["a", "b", "c"], input_shape=(3, 8, 8))


def tiny_data(n=48):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.int64).to(torch.uint8)
    return ImageDataset(x, torch.arange(n) % 3, ["a", "b", "c"])


def weights(m):
    return torch.cat([p.detach().flatten() for p in m.net.parameters()])


def test_same_seed_same_weights_other_seed_different():
    cfg = TrainConfig(epochs=2, batch_size=8, lr=0.05, augment="crop-flip", crop_padding=2)
    runs = []
    for seed in (0, 0, 1):
        m = tiny_model()
        Trainer(TrainConfig(**{**cfg.__dict__, "seed": seed}), quiet=True).fit(m, tiny_data())
        runs.append(weights(m))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_resume_continues_exactly(tmp_path):
    cfg = TrainConfig(epochs=3, batch_size=8, lr=0.05, schedule="cosine", crop_padding=2)
    straight = tiny_model()
    res = Trainer(cfg, quiet=True).fit(straight, tiny_data())
    assert [r["epoch"] for r in res.history] == [1, 2, 3] and res.steps == 18

    # writing checkpoints does not change the result
    part = tiny_model()
    Trainer(cfg, quiet=True).fit(part, tiny_data(), run_dir=tmp_path / "full")
    assert torch.equal(weights(part), weights(straight))

    interrupted = tmp_path / "interrupted"
    first = tiny_model()
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, quiet=True).fit(first, tiny_data(), run_dir=interrupted, callbacks=[Counter(fail_at=2)])
    # the callback fires before the epoch-2 checkpoint, so the checkpoint holds epoch 1; resume from it
    ckpt = torch.load(interrupted / "checkpoint.pt", weights_only=True)
    ckpt["history"][0]["seconds"] = 1000.0   # as if epoch 1 had taken long: the run's time must include it
    torch.save(ckpt, interrupted / "checkpoint.pt")
    part2 = tiny_model(seed=5)  # different init: everything must come from the checkpoint
    res2 = Trainer(cfg, quiet=True).fit(part2, tiny_data(), run_dir=interrupted, resume=True)
    assert res2.resumed_from == 1
    assert [r["epoch"] for r in res2.history] == [1, 2, 3] and res2.steps == 18
    assert 1000.0 < res2.seconds < 1000.0 + 60
    assert torch.equal(weights(part2), weights(straight))


def test_nan_loss_stops_with_clear_error(tmp_path):
    m = tiny_model()

    def objective(logits, inputs, labels):
        loss = nn.functional.cross_entropy(logits, labels)
        return loss * float("nan") if objective.calls > 6 else loss, {}

    objective.calls = 0

    def counting(logits, inputs, labels):
        objective.calls += 1
        return objective(logits, inputs, labels)

    with pytest.raises(TrainingDiverged, match=r"NaN.*epoch 2.*last good checkpoint \(end of epoch 1\)"):
        Trainer(TrainConfig(epochs=3, batch_size=8, lr=0.01), quiet=True).fit(
            m, tiny_data(), task=Task(counting), run_dir=tmp_path)
    assert (tmp_path / "checkpoint.pt").exists()
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 0 and all(torch.isfinite(v).all() for v in state["model"].values())


def test_schedules():
    assert Schedule("step", step_size=2, gamma=0.1).factor(3.9, 10) == pytest.approx(0.1)
    assert Schedule("step", step_size=2, gamma=0.1).factor(4.0, 10) == pytest.approx(0.01)
    assert Schedule("multistep", milestones=(3, 6), gamma=0.5).factor(6.5, 10) == pytest.approx(0.25)
    assert Schedule("cosine").factor(5, 10) == pytest.approx(0.5)
    assert Schedule("onecycle", warmup=0.2).factor(1, 10) == pytest.approx(0.5)
    assert Schedule("onecycle", warmup=0.2).factor(6, 10) == pytest.approx(0.5)
    assert Schedule("constant").factor(9, 10) == 1.0


def test_lr_is_applied_per_step_and_recorded():
    m = tiny_model()
    res = Trainer(TrainConfig(epochs=4, batch_size=16, lr=0.1, schedule="step", step_size=2, gamma=0.1),
                  quiet=True).fit(m, tiny_data())
    assert [round(r["lr"], 6) for r in res.history] == [0.1, 0.1, 0.01, 0.01]
    assert all(math.isfinite(r["loss"]) and r["images_per_s"] > 0 for r in res.history)


def test_batch_hook_sees_every_batch():
    seen = []

    def hook(x, y, gen):
        seen.append(len(y))
        return x, torch.zeros_like(y)

    m = tiny_model()
    res = Trainer(TrainConfig(epochs=1, batch_size=10, lr=0.1), quiet=True).fit(m, tiny_data(),
                                                                              task=Task(before_augment=hook))
    assert seen == [10, 10, 10, 10, 8]
    assert res.history[0]["train_acc"] >= 0


class StepLog(Callback):
    wants_steps = True

    def __init__(self, stop_at=None):
        self.seen, self.stop_at = [], stop_at

    def on_step(self, loop, info):
        self.seen.append(info)
        if info["step"] == self.stop_at:
            loop.request_stop(f"step {self.stop_at}")


def test_step_callbacks_report_every_step_and_can_stop_training_mid_epoch(tmp_path):
    log = StepLog()
    m = tiny_model()
    res = Trainer(TrainConfig(epochs=2, batch_size=10, lr=0.1, augment="none"), quiet=True).fit(
        m, tiny_data(), callbacks=[log])
    seen = log.seen
    assert [s["step"] for s in seen] == list(range(1, 11))
    assert [s["batch_size"] for s in seen[:5]] == [10, 10, 10, 10, 8]
    for epoch in (1, 2):
        correct = sum(s["correct"] for s in seen if s["epoch"] == epoch)
        assert correct == round(res.history[epoch - 1]["train_acc"] * 48)

    cfg = TrainConfig(epochs=2, batch_size=10, lr=0.1, augment="none", shuffle=False)
    m, ref = tiny_model(), tiny_model()
    res = Trainer(cfg, quiet=True).fit(m, tiny_data(), callbacks=[StepLog(stop_at=3)], run_dir=tmp_path)
    assert res.stopped == "step 3" and res.steps == 3 and res.epochs == 1
    assert res.history[0]["stopped_after_step"] == 3
    # The stopped model holds exactly three steps: the same as one epoch over the first 30 images.
    Trainer(cfg.train_config(epochs=1), quiet=True).fit(ref, tiny_data().subset(torch.arange(30)))
    assert torch.equal(weights(m), weights(ref))
    # A resumed run does not train past the stop.
    again = tiny_model(seed=4)
    res2 = Trainer(cfg, quiet=True).fit(again, tiny_data(), callbacks=[StepLog(stop_at=3)], run_dir=tmp_path,
                                        resume=True)
    assert res2.stopped == "step 3" and res2.steps == 3 and torch.equal(weights(again), weights(m))


class Counter(Callback):
    """Counts epochs; its count must survive a checkpoint round trip."""

    def __init__(self, fail_at=None):
        self.count, self.fail_at = 0, fail_at

    def on_epoch_end(self, loop, record):
        self.count += 1
        record["count"] = float(self.count)
        if self.count == self.fail_at:
            raise KeyboardInterrupt  # a kill before this epoch's checkpoint

    def state_dict(self):
        return {"count": self.count}

    def load_state_dict(self, state):
        self.count = state["count"]


def test_callback_state_survives_a_checkpoint_round_trip(tmp_path):
    cfg = TrainConfig(epochs=4, batch_size=16, lr=0.05)
    straight = tiny_model()
    Trainer(cfg, quiet=True).fit(straight, tiny_data(), callbacks=[Counter()])
    first = tiny_model()
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, quiet=True).fit(first, tiny_data(), callbacks=[Counter(fail_at=3)], run_dir=tmp_path)
    counter = Counter()
    resumed = tiny_model(seed=3)
    res = Trainer(cfg, quiet=True).fit(resumed, tiny_data(), callbacks=[counter], run_dir=tmp_path, resume=True)
    assert counter.count == 4 and [r["count"] for r in res.history] == [1.0, 2.0, 3.0, 4.0]
    assert res.resumed_from == 2 and torch.equal(weights(resumed), weights(straight))
    with pytest.raises(UserError, match="state of 1 callbacks, this run has 2"):
        Trainer(cfg, quiet=True).fit(tiny_model(), tiny_data(), callbacks=[Counter(), Counter()], run_dir=tmp_path,
                                     resume=True)


def test_bf16_autocast_trains_and_bad_amp_is_rejected():
    m = tiny_model()
    before = weights(m).clone()
    res = Trainer(TrainConfig(epochs=1, batch_size=16, lr=0.1, amp="bf16"), quiet=True).fit(m, tiny_data())
    assert math.isfinite(res.history[0]["loss"]) and not torch.equal(weights(m), before)
    assert weights(m).dtype == torch.float32
    with pytest.raises(UserError, match="amp"):
        TrainConfig(amp="fp8").check()


def test_task_with_its_own_optimizer_is_stepped_and_resumes_exactly(tmp_path):
    """A logit bias trained by its own Adam (as input-aware's generator): stepped every step, and its
    values and Adam moments survive an interruption."""

    def make():
        bias = nn.Parameter(torch.zeros(3))
        return bias, torch.optim.Adam([bias], lr=0.05, betas=(0.5, 0.9))

    def task_for(bias, adam):
        return Task(lambda logits, inputs, labels: (nn.functional.cross_entropy(logits + bias, labels), {}),
                    optimizers=[adam])

    cfg = TrainConfig(epochs=3, batch_size=8, lr=0.05, crop_padding=2)
    straight, (bias, adam) = tiny_model(), make()
    Trainer(cfg, quiet=True).fit(straight, tiny_data(), task=task_for(bias, adam))
    assert adam.state[bias]["step"] == 18 and not torch.equal(bias.detach(), torch.zeros(3))

    run = tmp_path / "run"
    first, (b1, a1) = tiny_model(), make()
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, quiet=True).fit(first, tiny_data(), task=task_for(b1, a1), run_dir=run,
                                     callbacks=[Counter(fail_at=2)])
    resumed, (b2, a2) = tiny_model(seed=5), make()
    Trainer(cfg, quiet=True).fit(resumed, tiny_data(), task=task_for(b2, a2), run_dir=run, resume=True)
    assert torch.equal(weights(resumed), weights(straight)) and torch.equal(b2.detach(), bias.detach())


# --- every defense's stage table matches what its run records ------------------------------------------

STAGE_CASES = {
    "finetune": dict(epochs=2, kd_epochs=1),
    "nad": dict(epochs=2, teacher_epochs=1),
    "argd": dict(epochs=1, teacher_epochs=2),
    "sage": dict(epochs=2),
    "fine-pruning": dict(epochs=1),
    "mcr": dict(epochs=1, curve_epochs=2, curve_batch_size=16),
    "rnp": dict(unlearn_epochs=2, recover_epochs=1),
}


@pytest.mark.parametrize("name", sorted(STAGE_CASES))
def test_stage_table_matches_the_run(name, tmp_path):
    from backdoor_eraser import defenses
    from backdoor_eraser.classifier import Normalization
    from backdoor_eraser.runs import new_model

    data = tiny_data(40)
    model = new_model("wrn-10-1", data.classes, (3, 8, 8), Normalization(), "cpu", 0)
    defense = defenses.create(name, batch_size=16, **STAGE_CASES[name])
    res = defense.purify(model, data, run_dir=tmp_path, quiet=True)
    stages = type(defense).stages
    assert stages and all(s.unit == "epochs" for s in stages)
    total = 0
    for stage in stages:
        want = getattr(defense.config, stage.length_field)
        if stage.optional and not want:
            assert not (tmp_path / stage.folder).exists(), stage
            continue
        ckpt = torch.load(tmp_path / stage.folder / "checkpoint.pt", weights_only=True)
        stopped = ckpt["stopped"] is not None
        assert len(ckpt["history"]) == want or (stopped and len(ckpt["history"]) < want), (stage, ckpt["history"])
        batch = getattr(defense.config, "curve_batch_size", 16) if stage.name == "curve" else 16
        if not stopped:
            assert ckpt["steps"] == want * math.ceil(len(data) / batch), stage
        total += len(ckpt["history"])
    if "total_epochs" in res.info:
        assert res.info["total_epochs"] == total
    assert defenses.epoch_budget_params(name, 3, 40) == {s.length_field: 0 if s.optional else 3 for s in stages}
