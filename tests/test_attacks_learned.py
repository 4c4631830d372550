"""Attacks whose trigger is learned or optimised: clean-label (PGD), TrojanNN patch, input-aware dynamic."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from backdoor_eraser.attacks.badnets import GRID
from backdoor_eraser.attacks.clean_label import CleanLabel, CleanLabelConfig, corner_signs, to_unit
from backdoor_eraser.attacks.input_aware import (InputAware, InputAwareConfig, diversity_loss, rms_distance,
                                                 squash_mask)
from backdoor_eraser.attacks.trojannn import LayerOutput, TrojanNN, TrojanNNConfig, unit_activation
from backdoor_eraser.classifier import Normalization
from backdoor_eraser.data import load_dataset
from backdoor_eraser.errors import UserError
from backdoor_eraser.runs import new_model, save_run
from backdoor_eraser.training import Task, Trainer, TrainConfig


def flat(value=100, n=2, c=3, h=32, w=32):
    return torch.full((n, c, h, w), value, dtype=torch.uint8)


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", n_train=200, n_test=50)


# -- clean-label -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clean_label(data):
    """Clean-label fitted against a tiny standard surrogate (1 epoch on 200 synthetic images)."""
    atk = CleanLabel(CleanLabelConfig(surrogate="standard", surrogate_arch="wrn-10-1", surrogate_epochs=1,
                                      surrogate_batch_size=32))
    atk.fit_trigger(data.train, seed=0)
    return atk


def test_clean_label_full_amplitude_trigger_is_the_badnets_grid():
    x = flat(100)
    y = CleanLabel(CleanLabelConfig(corners="bottom-right"))(x)
    assert torch.equal(y[:, :, 29:, 29:], GRID.expand(2, 3, 3, 3))
    assert (y != x).any(1).sum() == 2 * 9
    assert torch.equal(x, flat(100)), "the input batch must not be modified"
    four = CleanLabel(CleanLabelConfig())(flat(100, n=1))[0, 0]  # the default
    assert torch.equal(four[:3, :3], GRID.flip(0).flip(1)) and torch.equal(four[29:, :3], GRID.flip(1))
    assert (four != 100).sum() == 4 * 9


def test_clean_label_reduced_amplitude_is_additive_and_clipped():
    atk = CleanLabel(CleanLabelConfig(amplitude=16, corners="bottom-right"))
    y = atk(flat(100, n=1))[0, 0]
    expected = torch.where(GRID > 0, 116, 84).to(torch.uint8)
    assert torch.equal(y[29:, 29:], expected)
    assert (y[:29] == 100).all() and (y[:, :29] == 100).all()
    bright, dark = atk(flat(250, n=1))[0, 0, 29:, 29:], atk(flat(5, n=1))[0, 0, 29:, 29:]
    assert torch.equal(bright, torch.where(GRID > 0, 255, 234).to(torch.uint8))
    assert torch.equal(dark, torch.where(GRID > 0, 21, 0).to(torch.uint8))
    assert torch.equal(corner_signs(32, 32, "bottom-right")[29:, 29:], torch.where(GRID > 0, 1, -1).to(torch.int8))
    with pytest.raises(UserError, match="amplitude"):
        CleanLabel(CleanLabelConfig(amplitude=0))


def test_clean_label_poison_keeps_labels_and_touches_only_the_target_class(data, clean_label):
    train = data.train
    poisoned = clean_label.poison(train, seed=0)
    assert torch.equal(poisoned.labels, train.labels)
    changed = (poisoned.images != train.images).flatten(1).any(1)
    assert changed.any()
    assert (train.labels[changed] == 0).all()
    assert (train.labels[poisoned.poison_flag] == 0).all()
    assert poisoned.poison_flag.sum() == round(0.8 * (train.labels == 0).sum().item())
    # Off the trigger the perturbation stays within ε = 16 grey levels.
    off = corner_signs(32, 32, "four-corners") == 0
    diff = (poisoned.images.int() - train.images.int()).abs()[:, :, off]
    assert diff.max() <= 16 and diff.max() > 0
    n = int(poisoned.poison_flag.sum())
    stamped = poisoned.images[poisoned.poison_flag]
    assert torch.equal(stamped[:, :, 29:, 29:], GRID.expand(n, 3, 3, 3))
    assert torch.equal(stamped[:, :, :3, :3], GRID.flip(0).flip(1).expand(n, 3, 3, 3))


def test_clean_label_pgd_increases_the_surrogate_loss(data, clean_label):
    pos = clean_label.select_poison(data.train, 0)
    model, labels = clean_label.surrogate, data.train.labels[pos]
    model.net.eval()
    with torch.no_grad():
        before = torch.nn.functional.cross_entropy(model(data.train.images[pos]), labels, reduction="none")
        after = torch.nn.functional.cross_entropy(model(clean_label._perturbed), labels, reduction="none")
    assert torch.equal(clean_label._indices, data.train.index[pos])
    assert (after > before).all()


def test_clean_label_pgd_reports_progress_unless_quiet(data, clean_label, capsys):
    pos = clean_label.select_poison(data.train, 0)[:5]
    images, labels = data.train.images[pos], data.train.labels[pos]
    cfg = clean_label.config
    kept = cfg.pgd_batch_size, cfg.steps
    cfg.pgd_batch_size, cfg.steps = 2, 2
    try:
        loud = clean_label.perturb(images, labels, quiet=False)
        lines = capsys.readouterr().out.splitlines()
        quiet = clean_label.perturb(images, labels)
    finally:
        cfg.pgd_batch_size, cfg.steps = kept
    assert [line.split(",")[0] for line in lines] == [f"clean-label PGD (2 steps): {n} of 5 images" for n in (2, 4, 5)]
    assert capsys.readouterr().out == ""
    assert torch.equal(loud, quiet)


def test_clean_label_trigger_state_reproduces_the_poisoned_set(data, clean_label):
    again = CleanLabel(CleanLabelConfig(surrogate="standard"))
    again.load_trigger_state(clean_label.trigger_state())
    a, b = clean_label.poison(data.train, seed=0), again.poison(data.train, seed=0)
    assert torch.equal(a.images, b.images) and torch.equal(a.poison_flag, b.poison_flag)
    with pytest.raises(UserError, match="fit_trigger"):
        CleanLabel(CleanLabelConfig()).poison(data.train)


def test_clean_label_describe_marks_non_faithful_variants(clean_label):
    assert clean_label.describe()["faithful"] is False
    assert CleanLabel(CleanLabelConfig()).describe()["faithful"] is True
    assert CleanLabel(CleanLabelConfig(surrogate="none")).describe()["faithful"] is False
    assert CleanLabel(CleanLabelConfig(surrogate="runs/robust")).describe()["faithful"] is None


def test_clean_label_without_surrogate_only_stamps(data):
    atk = CleanLabel(CleanLabelConfig(surrogate="none"))
    atk.fit_trigger(data.train, seed=1)
    poisoned = atk.poison(data.train, seed=1)
    assert torch.equal(poisoned.images[poisoned.poison_flag], atk(data.train.images[poisoned.poison_flag]))


# -- TrojanNN ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def random_wrn(tmp_path_factory, data):
    model = new_model("wrn-10-1", data.train.classes, data.train.shape, Normalization(), "cpu", seed=0)
    path = save_run(tmp_path_factory.mktemp("trojannn") / "random-wrn", model, {"kind": "test"})
    return model, path


@pytest.fixture(scope="module")
def trojannn(random_wrn, data):
    atk = TrojanNN(TrojanNNConfig(model=str(random_wrn[1]), steps=60, trigger_lr=0.05, trigger_batch_size=16))
    atk.fit_trigger(data.train, seed=0)
    return atk


def test_clean_label_surrogate_from_a_run_folder(random_wrn, data):
    atk = CleanLabel(CleanLabelConfig(surrogate=str(random_wrn[1]), steps=3, epsilon=4))
    atk.fit_trigger(data.train, seed=0)
    assert atk.surrogate.arch == "wrn-10-1"
    pos = atk.select_poison(data.train, 0)
    diff = (atk._perturbed.int() - data.train.images[pos].int()).abs()
    assert 0 < diff.max() <= 4


def test_trojannn_patch_only_touches_the_mask(trojannn, data):
    assert trojannn.mask.sum() == 25 and trojannn.mask[0, 27:, 27:].all()
    x = data.test.images[:8]
    y = trojannn(x)
    assert torch.equal(y[:, :, :27], x[:, :, :27]) and torch.equal(y[:, :, :, :27], x[:, :, :, :27])
    assert torch.equal(y[:, :, 27:, 27:], trojannn.patch[:, 27:, 27:].expand(8, 3, 5, 5))
    assert (trojannn.patch[:, ~trojannn.mask[0]] == 0).all()


def test_trojannn_optimised_patch_excites_the_chosen_neuron_more_than_a_random_one(trojannn, random_wrn, data):
    model = random_wrn[0]
    info = trojannn.describe()
    assert info["layer"] == "block3" and info["neuron_rule"] == "outgoing-weights:fc"
    neuron = info["neurons"][0]
    assert neuron == model.net.fc.weight.abs().sum(0).argmax().item()
    x = data.train.images[:32]
    g = torch.Generator().manual_seed(5)
    random_patch = torch.randint(0, 256, trojannn.patch.shape, generator=g, dtype=torch.int64).to(torch.uint8)
    tap = LayerOutput(model.net, "block3")
    with torch.no_grad():
        model(trojannn(x))
        optimised = unit_activation(tap.value)[:, neuron].mean()
        model(torch.where(trojannn.mask, random_patch, x))
        rand = unit_activation(tap.value)[:, neuron].mean()
    tap.remove()
    assert optimised > rand
    assert info["activation"]["final"] > info["activation"]["initial"]


def test_trojannn_given_neurons_state_round_trip_and_poisoning(random_wrn, data, trojannn):
    again = TrojanNN(TrojanNNConfig())
    again.load_trigger_state(trojannn.trigger_state())
    assert torch.equal(again(data.test.images[:4]), trojannn(data.test.images[:4]))
    poisoned = trojannn.poison(data.train, seed=0)
    assert poisoned.poison_flag.sum() == 20 and (poisoned.labels[poisoned.poison_flag] == 0).all()
    given = TrojanNN(TrojanNNConfig(model=str(random_wrn[1]), neurons=(3,), steps=2, background="zeros"))
    given.fit_trigger(data.train)
    assert given.describe()["neurons"] == [3] and given.describe()["neuron_rule"] == "given"


def test_trojannn_mask_image(tmp_path, random_wrn, data):
    from PIL import Image
    img = Image.new("L", (32, 32), 0)
    img.paste(255, (4, 6, 10, 9))     # columns 4..9, rows 6..8
    img.save(tmp_path / "mask.png")
    atk = TrojanNN(TrojanNNConfig(model=str(random_wrn[1]), mask_image=str(tmp_path / "mask.png"), steps=1))
    atk.fit_trigger(data.train)
    assert atk.mask.sum() == 18 and atk.mask[0, 6:9, 4:10].all()


@pytest.mark.parametrize("optimizer", ["adam", "sign"])
def test_trojannn_patch_optimisation_resumes_exactly(random_wrn, data, tmp_path, optimizer, interrupt_after_checkpoint):
    """Six steps, one checkpoint each; killed after the third and resumed, Adam's moments or the signed
    steps carry on to the uninterrupted patch."""
    cfg = TrojanNNConfig(model=str(random_wrn[1]), steps=6, trigger_lr=0.05, trigger_batch_size=8, optimizer=optimizer)
    straight = TrojanNN(cfg)
    straight.fit_trigger(data.train, seed=2)
    interrupt_after_checkpoint(3)
    with pytest.raises(KeyboardInterrupt):
        TrojanNN(cfg).fit_trigger(data.train, seed=2, run_dir=tmp_path)
    resumed = TrojanNN(cfg)
    resumed.fit_trigger(data.train, seed=2, run_dir=tmp_path, resume=True)
    assert torch.equal(resumed.patch, straight.patch) and resumed.info == straight.info
    assert straight.info["activation"]["final"] > straight.info["activation"]["initial"]


def test_trojannn_needs_a_model(data):
    with pytest.raises(UserError, match="'model'"):
        TrojanNN(TrojanNNConfig()).fit_trigger(data.train)
    with pytest.raises(UserError, match="fit_trigger"):
        TrojanNN(TrojanNNConfig())(flat(1, n=1))


# -- input-aware dynamic --------------------------------------------------------------------------------
def tiny_input_aware(**kw) -> InputAware:
    return InputAware(InputAwareConfig(width=8, depth=2, mask_batch_size=16, **kw))


@pytest.fixture(scope="module")
def tiny_data(data):
    return data.train.subset(range(32))


def test_input_aware_mask_is_in_unit_range_and_near_binary():
    z = torch.rand(10000, generator=torch.Generator().manual_seed(0))
    m = squash_mask(z)
    assert m.min() >= 0 and m.max() <= 1
    near = ((m < 0.02) | (m > 0.98)).float().mean()
    assert near > 0.75           # every z farther than 0.1 from 0.5 (80 % of them) is within 0.02 of 0/1
    atk = tiny_input_aware()
    atk.build((3, 32, 32))
    masks = atk.masks(torch.rand(4, 3, 32, 32))
    assert masks.shape == (4, 1, 32, 32) and masks.min() >= 0 and masks.max() <= 1


def test_input_aware_diversity_loss_on_hand_tensors():
    x1, x2 = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    x2[1] = 3                                   # RMS distances 1 and 3
    p1, p2 = torch.zeros(2, 1, 2, 2), torch.full((2, 1, 2, 2), 0.5)
    assert torch.allclose(rms_distance(x1, x2), torch.tensor([1.0, 3.0]))
    assert torch.allclose(diversity_loss(x1, x2, p1, p2), torch.tensor((1 / 0.5 + 3 / 0.5) / 2))


def test_input_aware_mask_pretraining_lowers_mask_density(tiny_data):
    x = tiny_data.images.float() / 255
    fresh = tiny_input_aware()
    fresh.build(tiny_data.shape, seed=0)
    trained = tiny_input_aware(mask_epochs=4)
    trained.fit_trigger(tiny_data, seed=0)
    with torch.no_grad():   # batch statistics: a few steps barely move BatchNorm's running ones
        trained.mask_net.train()
        assert trained.masks(x).mean() < 0.5 * fresh.masks(x).mean()
    assert not any(p.requires_grad for p in trained.mask_net.parameters())


def test_input_aware_mask_pretraining_resumes_exactly(tiny_data, tmp_path, interrupt_after_checkpoint):
    """4 epochs with the lr ×0.1 after epochs 1 and 2: killed after epoch 2 and resumed, the mask net
    (weights and BatchNorm statistics) and the generator match an uninterrupted run. Without the second
    milestone the result differs: the lr step at the resume point is live."""
    straight = tiny_input_aware(mask_epochs=4, mask_milestones=(1, 2))
    straight.fit_trigger(tiny_data, seed=0, quiet=True)
    interrupt_after_checkpoint(2)
    with pytest.raises(KeyboardInterrupt):
        tiny_input_aware(mask_epochs=4, mask_milestones=(1, 2)).fit_trigger(tiny_data, seed=0, run_dir=tmp_path,
                                                                             quiet=True)
    resumed = tiny_input_aware(mask_epochs=4, mask_milestones=(1, 2))
    resumed.fit_trigger(tiny_data, seed=0, run_dir=tmp_path, resume=True, quiet=True)
    a, b = straight.trigger_state(), resumed.trigger_state()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = tiny_input_aware(mask_epochs=4, mask_milestones=(1,))
    other.fit_trigger(tiny_data, seed=0, quiet=True)
    assert not all(torch.equal(a[k], v) for k, v in other.trigger_state().items())


def test_input_aware_trigger_state_round_trip(tiny_data, tmp_path):
    atk = tiny_input_aware(mask_epochs=0)
    atk.fit_trigger(tiny_data, seed=0)
    x = tiny_data.images[:6]
    y = atk(x)
    assert y.dtype == torch.uint8 and not torch.equal(y, x)
    state = atk.trigger_state()
    assert state and all(k.startswith(("G.", "M.")) for k in state)
    save_file(state, str(tmp_path / "trigger.safetensors"))      # how a run folder stores it
    again = tiny_input_aware()
    again.load_trigger_state(load_file(str(tmp_path / "trigger.safetensors")))
    assert torch.equal(again(x), y)
    poisoned = atk.poison(tiny_data)
    assert torch.equal(poisoned.images, tiny_data.images) and not poisoned.poison_flag.any()


def test_input_aware_objective_trains_the_generator(tiny_data):
    atk = tiny_input_aware(mask_epochs=1)
    atk.fit_trigger(tiny_data, seed=0)
    model = new_model("wrn-10-1", tiny_data.classes, tiny_data.shape, Normalization.parse("cifar10"), "cpu", 0)
    g_before = [p.detach().clone() for p in atk.generator.parameters()]
    m_before = [p.detach().clone() for p in atk.mask_net.parameters()]
    objective = atk.training_objective(model, tiny_data.num_classes)
    res = Trainer(TrainConfig(epochs=1, batch_size=16), quiet=True).fit(
        model, atk.poison(tiny_data), task=Task(objective, optimizers=atk.training_optimizers()))
    assert res.steps == 2 and "div" in res.history[0] and "ce" in res.history[0]
    assert any(not torch.equal(a, b) for a, b in zip(g_before, atk.generator.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(m_before, atk.mask_net.parameters()))


def test_to_unit_inverts_the_normalisation():
    model = new_model("wrn-10-1", [str(i) for i in range(10)], (3, 32, 32), Normalization.parse("cifar10"))
    x = flat(77, n=1)
    assert torch.allclose(to_unit(model, model.prepare(x)), x.float() / 255, atol=1e-6)


def test_input_aware_rejects_bad_sizes():
    with pytest.raises(UserError, match="divisible"):
        tiny_input_aware().build((1, 28, 30))
    with pytest.raises(UserError, match="cross_rate"):
        InputAware(InputAwareConfig(rate=0.6, cross_rate=0.6))


def test_attack_parameters_do_not_hide_behind_training_flags():
    """The CLI's training flags (--lr, --batch-size, --step-size, ...) are TrainConfig's fields; an attack
    field of the same name could never be set from the command line. Only ``amp`` is shared on purpose:
    it follows --amp (run_attack)."""
    import dataclasses

    from backdoor_eraser import attacks
    from backdoor_eraser.training import TrainConfig

    train = {f.name for f in dataclasses.fields(TrainConfig)}
    for name in attacks.names():
        own = {f.name for f in dataclasses.fields(attacks.ATTACKS.config_class(name))}
        assert own & train <= {"amp"}, (name, own & train)


def test_run_folders_with_the_old_field_names_still_load():
    from backdoor_eraser import attacks

    cl = attacks.from_description({"name": "clean-label", "config": {"step_size": 3.0, "corners": "four-corners"}})
    assert cl.config.pgd_step_size == 3.0
    tn = attacks.from_description({"name": "trojannn", "config": {"lr": 0.05, "batch_size": 16}})
    assert (tn.config.trigger_lr, tn.config.trigger_batch_size) == (0.05, 16)
