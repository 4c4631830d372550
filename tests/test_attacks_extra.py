"""Exact trigger values and poisoning bookkeeping for SIG, WaNet, Refool and the SAGE patch attacks."""
import math

import numpy as np
import pytest
import torch

from backdoor_eraser.attacks.badnets import BadNets, BadNetsConfig
from backdoor_eraser.attacks.patch import MultiTrigger, MultiTriggerConfig, Patch, PatchConfig
from backdoor_eraser.attacks.refool import Refool, RefoolConfig, gaussian_blur, spatial_mask
from backdoor_eraser.attacks.sig import SIG, SIGConfig, compat_mask, sine_signal
from backdoor_eraser.attacks.wanet import WaNet, WaNetConfig, identity_grid
from backdoor_eraser.data.dataset import ImageDataset
from backdoor_eraser.errors import UserError
from backdoor_eraser.registry import build_config

GRID = torch.tensor([[0, 0, 255], [0, 255, 0], [255, 0, 255]], dtype=torch.uint8)


def flat(value=100, n=2, c=3, h=32, w=32):
    return torch.full((n, c, h, w), value, dtype=torch.uint8)


def noise(n=4, seed=0, c=3, h=32, w=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.int64).to(torch.uint8)


def toy_dataset(n=200, classes=10, seed=0):
    return ImageDataset(noise(n, seed), torch.arange(n) % classes, [str(i) for i in range(classes)])


# -- SIG ---------------------------------------------------------------------------------------
def test_sig_faithful_columns_on_constant_image():
    x = flat(100)
    y = SIG(SIGConfig())(x)
    # v(j) = 20·sin(2π·j·6/32) = 20·sin(3π·j/8)
    col = y[0, 0, 0]
    assert col[0] == 100       # sin 0 = 0
    assert col[1] == 118       # 20·sin(3π/8) = 18.48 → 118.48 → 118
    assert col[2] == 114       # 20·sin(3π/4) = 14.14 → 114
    assert col[4] == 80        # 20·sin(3π/2) = −20
    assert col[8] == 100       # 20·sin(3π) = 0
    assert col[12] == 120      # 20·sin(9π/2) = +20
    assert (y == col).all(), "constant down each column, same in every channel and image"
    assert torch.equal(x, flat(100)), "the input batch must not be modified"
    # saturation instead of wrap-around at both ends
    assert SIG(SIGConfig())(flat(250))[0, 0, 0, 12] == 255
    assert SIG(SIGConfig())(flat(5))[0, 0, 0, 4] == 0


def test_sig_faithful_signal_is_zero_mean():
    v = sine_signal(32, 20.0, 6.0)
    assert abs(v.sum().item()) < 1e-9    # 6 whole periods over 32 columns
    # v(j + 8) = −v(j), so the rounded offsets cancel exactly too
    y = SIG(SIGConfig())(flat(100, n=1))[0, 0, 0].long()
    assert (y - 100).sum() == 0
    assert torch.equal(SIG(SIGConfig(delta=40))(flat(100, n=1))[0, 0, 0, 12:13], torch.tensor([140], dtype=torch.uint8))


def test_sig_nad_compat_mask_and_blend():
    j = np.arange(32)
    expected = np.trunc(20 * np.sin(0.8 * j)).astype(np.int64) % 256
    assert compat_mask(32).tolist() == expected.tolist()
    assert compat_mask(32)[4] == 255   # 20·sin(3.2) = −1.167 → trunc −1 → wraps to 255
    assert compat_mask(32)[6] == 237   # 20·sin(4.8) = −19.92 → −19 → 237
    assert compat_mask(32)[2] == 19    # 20·sin(1.6) = 19.99 → 19
    y = SIG(SIGConfig(nad_compat=True))(flat(100, n=1))
    blended = np.uint8(0.8 * 100 + 0.2 * expected.astype(np.float64))
    assert y[0, 0, 0].tolist() == blended.tolist()
    assert y[0, 0, 0, 4] == 131        # 80 + 0.2·255 = 131
    assert (y == y[0, 0, 0]).all()


def test_sig_is_clean_label_on_80_percent_of_target_class():
    cfg = SIGConfig()
    assert (cfg.label_mode, cfg.rate, cfg.target, cfg.delta, cfg.frequency) == ("clean", 0.8, 0, 20.0, 6.0)
    ds = toy_dataset(200)
    atk = SIG(SIGConfig(target=3))
    p = atk.poison(ds, seed=1)
    assert p.poison_flag.sum() == round(0.8 * 20)
    assert (p.original_label[p.poison_flag] == 3).all()
    assert torch.equal(p.labels, ds.labels)
    assert torch.equal(p.images[p.poison_flag], atk(ds.images[p.poison_flag]))
    assert torch.equal(p.images[~p.poison_flag], ds.images[~p.poison_flag])
    with pytest.raises(UserError, match="clean-label"):
        SIG(SIGConfig(mode="all2all"))


# -- WaNet -------------------------------------------------------------------------------------
def test_wanet_zero_strength_is_identity():
    x = noise(4)
    y = WaNet(WaNetConfig(s=0.0))(x)
    assert (y.int() - x.int()).abs().max() <= 1


def test_wanet_field_is_bounded_and_fixed_by_seed():
    atk = WaNet(WaNetConfig())
    field, p_up = atk.field(32, 32), atk.noise_grid(32, 32)
    move = (field - identity_grid(32, 32)).abs()
    assert move.max() <= 0.5 * p_up.abs().max() / 32 + 1e-6
    assert move.max() > 0
    assert field.abs().max() <= 1
    assert torch.equal(field, WaNet(WaNetConfig()).field(32, 32))
    assert not torch.equal(field, WaNet(WaNetConfig(field_seed=1)).field(32, 32))
    x = noise(3)
    warped = atk(x)
    assert warped.dtype == torch.uint8 and not torch.equal(warped, x)
    # a saved run reproduces the field without the seed's help
    restored = WaNet(WaNetConfig(field_seed=99))
    restored.load_trigger_state(atk.trigger_state())
    assert torch.equal(restored(x), warped)


def test_wanet_poison_stores_nothing():
    ds = toy_dataset(50)
    p = WaNet(WaNetConfig()).poison(ds, seed=0)
    assert torch.equal(p.images, ds.images) and torch.equal(p.labels, ds.labels)
    assert p.poison_flag.sum() == 0


def test_wanet_batch_hook_warps_relabels_and_adds_noise_mode():
    atk = WaNet(WaNetConfig())
    hook = atk.training_batch_hook(10)
    x, y = noise(64, seed=3), torch.ones(64, dtype=torch.int64)
    x2, y2 = hook(x, y, torch.Generator().manual_seed(0))
    n_bd, n_noise = round(0.1 * 64), round(0.2 * 64)      # 6 and 13
    assert (n_bd, n_noise) == atk.batch_counts(64)
    assert (y2 == 0).sum() == n_bd and (y2[:n_bd] == 0).all() and (y2[n_bd:] == 1).all()
    assert torch.equal(x2[:n_bd], atk(x[:n_bd]))
    changed = (x2 != x).flatten(1).any(1)
    assert changed[n_bd:n_bd + n_noise].all(), "noise-mode samples are warped"
    assert not changed[n_bd + n_noise:].any(), "the rest of the batch is untouched"
    assert not torch.equal(x2[n_bd:n_bd + n_noise], atk(x[n_bd:n_bd + n_noise])), "noise mode ≠ backdoor warp"
    assert torch.equal(x, noise(64, seed=3)), "the hook must not modify its input"
    # determinism for a generator seed
    x3, y3 = hook(x, y, torch.Generator().manual_seed(0))
    assert torch.equal(x2, x3) and torch.equal(y2, y3)
    x4, _ = hook(x, y, torch.Generator().manual_seed(1))
    assert not torch.equal(x2, x4)
    # all-to-all relabels c → c + 1
    _, y5 = WaNet(WaNetConfig(mode="all2all")).training_batch_hook(10)(x, torch.full((64,), 9), torch.Generator())
    assert (y5[:n_bd] == 0).all() and (y5[n_bd:] == 9).all()


# -- Refool ------------------------------------------------------------------------------------
def test_refool_pool_comes_from_non_target_classes():
    ds = toy_dataset(200)
    atk = Refool(RefoolConfig(target=2, pool_size=50, reflection_indices=None))
    atk.fit_trigger(ds, seed=0)
    state = atk.trigger_state()
    idx = state["pool_index"]
    assert len(idx) == 50 and len(set(idx.tolist())) == 50
    assert (ds.labels[idx] != 2).all()
    assert torch.equal(state["pool"], ds.images[idx])
    assert atk.describe()["reflection_source"] == {"train_indices": idx.tolist()}
    other = Refool(RefoolConfig(target=2, pool_size=50, reflection_indices=None))
    other.fit_trigger(ds, seed=1)
    assert not torch.equal(other.trigger_state()["pool_index"], idx)
    # a pool larger than the non-target classes takes all of them, never the target class
    big = Refool(RefoolConfig(target=2, pool_size=500, reflection_indices=None))
    big.fit_trigger(ds, seed=0)
    assert sorted(big.trigger_state()["pool_index"].tolist()) == torch.nonzero(ds.labels != 2).flatten().tolist()


def test_refool_default_is_the_argd_single_reflection():
    ds = toy_dataset(200)
    assert RefoolConfig().reflection_indices == (2,)
    atk = Refool(RefoolConfig())
    atk.fit_trigger(ds, seed=0)
    state = atk.trigger_state()
    assert state["pool_index"].tolist() == [2] and torch.equal(state["pool"], ds.images[2:3])
    p = atk.poison(ds, seed=0)
    assert p.poison_flag.sum() == round(0.2 * 20) and torch.equal(p.labels, ds.labels)
    # every poisoned image carries a blend of training image 2 (the same one for a test image)
    assert (p.images[p.poison_flag] != ds.images[p.poison_flag]).any()
    two = Refool(RefoolConfig(reflection_indices=(5, 7)))
    two.fit_trigger(ds, seed=3)
    assert two.trigger_state()["pool_index"].tolist() == [5, 7]
    with pytest.raises(UserError, match="refool reflection index 999 is not in the training set"):
        Refool(RefoolConfig(reflection_indices=(999,))).fit_trigger(ds)
    with pytest.raises(UserError, match="at least one"):
        Refool(RefoolConfig(reflection_indices=()))


def test_refool_poisoning_is_clean_label_and_seeded():
    ds = toy_dataset(200)
    cfg = RefoolConfig()
    assert (cfg.label_mode, cfg.rate, cfg.target, cfg.pool_size) == ("clean", 0.2, 0, 200)
    atk = Refool(RefoolConfig(pool_size=30, reflection_indices=None))
    atk.fit_trigger(ds, seed=0)
    p = atk.poison(ds, seed=0)
    assert p.poison_flag.sum() == round(0.2 * 20)
    assert (p.original_label[p.poison_flag] == 0).all()
    assert torch.equal(p.labels, ds.labels)
    assert p.images.dtype == torch.uint8
    assert (p.images[p.poison_flag] != ds.images[p.poison_flag]).any()
    assert torch.equal(p.images[~p.poison_flag], ds.images[~p.poison_flag])
    assert torch.equal(atk.poison(ds, seed=0).images, p.images)
    q = atk.poison(ds, seed=1)
    assert not torch.equal(q.images[q.poison_flag], p.images[p.poison_flag])


def test_refool_both_optical_models_and_test_time_determinism():
    ds = toy_dataset(100)
    x = noise(6, seed=7)
    for ghost_prob in (0.0, 1.0):
        atk = Refool(RefoolConfig(pool_size=10, ghost_prob=ghost_prob, reflection_indices=None))
        atk.fit_trigger(ds, seed=0)
        y = atk(x)
        assert y.dtype == torch.uint8 and y.shape == x.shape
        assert not torch.equal(y, x)
        # the same image gets the same reflection whatever batch it comes in
        assert torch.equal(atk(x[3:5]), y[3:5])
        restored = Refool(RefoolConfig(pool_size=10, ghost_prob=ghost_prob, reflection_indices=None))
        restored.load_trigger_state(atk.trigger_state())
        assert torch.equal(restored(x), y)
    t = atk.triggered_test_set(ds)
    assert len(t) == 90 and (t.true_labels != 0).all() and (t.target_labels == 0).all()


def test_refool_blur_and_mask_building_blocks():
    const = torch.full((2, 3, 32, 32), 0.3, dtype=torch.float64)
    blurred = gaussian_blur(const, torch.tensor([1.0, 5.0], dtype=torch.float64))
    assert torch.allclose(blurred, const), "normalised kernels keep a flat image flat"
    spike = torch.zeros(1, 1, 32, 32, dtype=torch.float64)
    spike[0, 0, 16, 16] = 1
    b = gaussian_blur(spike, torch.tensor([1.0]))
    assert math.isclose(b.sum().item(), 1.0, rel_tol=1e-9)
    assert b[0, 0, 16, 18] > 0 and b[0, 0, 16, 19] == 0   # σ = 1: 2·ceil(2)+1 = 5 taps, radius 2
    assert b[0, 0, 14, 14] > 0 and b[0, 0, 13, 16] == 0
    wide = gaussian_blur(spike, torch.tensor([4.6]))         # ceil(9.2) = 10 → radius 10
    assert wide[0, 0, 16, 26] > 0 and wide[0, 0, 16, 27] == 0
    m = spatial_mask(32, 32)
    assert m.max() == 1 and torch.allclose(m, m.flip(0)) and torch.allclose(m, m.t())
    assert m[0, 0] < 0.05 and m[15, 15] > 0.9


def test_refool_folder_pool(tmp_path):
    from PIL import Image
    (tmp_path / "sub").mkdir()
    for i, (size, colour) in enumerate([((40, 40), (255, 0, 0)), ((16, 24), (0, 255, 0)), ((64, 32), (0, 0, 255))]):
        # the last one in a subfolder: an unpacked data set with nested folders is read as it is
        Image.new("RGB", size, colour).save(tmp_path / ("sub/r2.png" if i == 2 else f"r{i}.png"))
    (tmp_path / "notes.txt").write_text("not an image")
    atk = Refool(RefoolConfig(reflection_dir=str(tmp_path)))
    y = atk(flat(100, n=4))
    pool = atk.trigger_state()["pool"]
    assert pool.shape == (3, 3, 32, 32)
    assert pool[1, :, 5, 5].tolist() == [0, 255, 0] and pool[2, :, 5, 5].tolist() == [0, 0, 255]
    assert "pool_index" not in atk.trigger_state()
    assert y.dtype == torch.uint8 and not torch.equal(y, flat(100, n=4))
    assert atk.describe()["reflection_source"] == {"folder": str(tmp_path.resolve())}
    with pytest.raises(UserError, match="does not exist"):
        Refool(RefoolConfig(reflection_dir=str(tmp_path / "nope")))(flat(1, n=1))
    with pytest.raises(UserError, match="no reflection pool"):
        Refool(RefoolConfig())(flat(1, n=1))


def test_refool_selection_weights_by_hand():
    from backdoor_eraser.attacks.refool_selection import updated_weights

    # reflections 0-2 were drawn in the test with 5, 0 and 3 successes; 3 was not drawn: the median, 3
    drawn = torch.tensor([0, 0, 0, 0, 0, 1, 1, 2, 2, 2, 2])
    success = torch.tensor([1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 0], dtype=torch.bool)
    assert updated_weights(drawn, success, 4).tolist() == [5.0, 0.0, 3.0, 3.0]
    # an even count: the mean of the two middle numbers, as np.median
    assert updated_weights(torch.tensor([0, 1]), torch.tensor([True, False]), 3).tolist() == [1.0, 0.0, 0.5]
    # no success anywhere: equal weights again
    assert updated_weights(torch.tensor([0, 1]), torch.tensor([False, False]), 3).tolist() == [1.0, 1.0, 1.0]


def test_refool_draws_reflections_with_the_selection_weights():
    ds = toy_dataset(200)
    atk = Refool(RefoolConfig(pool_size=4, reflection_indices=None))
    atk.fit_trigger(ds, seed=0)
    keys = [(9, i) for i in range(300)]
    _, uniform = atk.add_reflections(noise(300, seed=1), keys, with_choice=True)
    assert set(uniform.tolist()) == {0, 1, 2, 3}
    atk.weights = torch.tensor([0.0, 3.0, 0.0, 1.0], dtype=torch.float64)
    _, weighted = atk.add_reflections(noise(300, seed=1), keys, with_choice=True)
    counts = torch.bincount(weighted, minlength=4)
    assert counts[0] == 0 and counts[2] == 0 and 180 < counts[1] < 270   # about 3/4 of 300
    # the weights travel with the trigger state, so test triggers are drawn the same way
    restored = Refool(RefoolConfig(pool_size=4, reflection_indices=None))
    restored.load_trigger_state(atk.trigger_state())
    x = noise(6, seed=2)
    assert torch.equal(restored(x), atk(x))


def test_refool_selection_rounds_train_proxies_and_are_seeded(monkeypatch):
    monkeypatch.setenv("BACKDOOR_ERASER_AUTO_FP32", "1")
    ds = ImageDataset(noise(240, seed=3, h=16, w=16), torch.arange(240) % 4, ["a", "b", "c", "d"])
    cfg = dict(target=1, rate=0.5, pool_size=6, reflection_indices=None, select_rounds=2, select_epochs=1,
               select_val=40, select_arch="wrn-10-1")
    atk = Refool(RefoolConfig(**cfg))
    atk.fit_trigger(ds, seed=0)
    w = atk.weights
    assert w.shape == (6,) and (w >= 0).all() and w.sum() > 0
    again = Refool(RefoolConfig(**cfg))
    again.fit_trigger(ds, seed=0)
    assert torch.equal(again.weights, w)
    # poisoning draws only reflections with weight
    p = atk.poison(ds, seed=0)
    keys = [(1, 0, int(i)) for i in ds.index[p.poison_flag]]
    _, chosen = atk.add_reflections(ds.images[p.poison_flag], keys, with_choice=True)
    assert (w[chosen] > 0).all()
    with pytest.raises(UserError, match="at least two reflections"):
        Refool(RefoolConfig(**{**cfg, "reflection_indices": (2,)})).fit_trigger(ds, seed=0)
    with pytest.raises(UserError, match="select_rounds"):
        Refool(RefoolConfig(select_epochs=0))


def test_refool_selection_off_is_no_part_of_an_attack_cells_identity():
    from backdoor_eraser.registry import identity_dict

    ident = identity_dict(RefoolConfig())
    assert not [k for k in ident if k.startswith("select_")]
    assert identity_dict(RefoolConfig(select_rounds=3))["select_epochs"] == 10


# -- patch triggers ----------------------------------------------------------------------------
def test_patch_opacity_blends_exactly():
    x = flat(100)
    assert torch.equal(Patch(PatchConfig(opacity=0.0))(x), x)
    opaque = Patch(PatchConfig())(x)
    assert torch.equal(opaque, BadNets(BadNetsConfig())(x)), "size 3 grid at the bottom-right is BadNets"
    half = Patch(PatchConfig(opacity=0.5))(x)[0, 0, 29:, 29:]
    # 0.5·100 + 0.5·0 = 50; 0.5·100 + 0.5·255 = 177.5 → 178 (round half to even)
    assert half.tolist() == [[50, 50, 178], [50, 178, 50], [178, 50, 178]]
    quarter = Patch(PatchConfig(opacity=0.25, pattern="white"))(x)[0, 0, 29:, 29:]
    assert (quarter == 139).all()      # 0.75·100 + 0.25·255 = 138.75 → 139
    assert (Patch(PatchConfig(opacity=0.5))(x) != x).sum() == 2 * 3 * 9


def test_patch_size_20_covers_400_pixels_bottom_right():
    y = Patch(PatchConfig(size=20, pattern="white"))(flat(0, n=1))
    assert ((y != 0).sum((2, 3)) == 400).all()
    assert (y[..., 12:, 12:] == 255).all()
    grid = Patch(PatchConfig(size=20))(flat(7, n=1))[0, 1]
    tiled = torch.tensor([[int(GRID[r % 3, c % 3]) for c in range(20)] for r in range(20)], dtype=torch.uint8)
    assert torch.equal(grid[12:, 12:], tiled)
    assert (grid[:12] == 7).all() and (grid[:, :12] == 7).all()


def test_patch_positions_and_random_pattern():
    y = Patch(PatchConfig(size=4, pattern="white", position="top-left"))(flat(0, n=1))
    assert (y[..., :4, :4] == 255).all() and (y != 0).sum() == 3 * 16
    y = Patch(PatchConfig(size=4, pattern="white", position="centre"))(flat(0, n=1))
    assert (y[..., 14:18, 14:18] == 255).all() and (y != 0).sum() == 3 * 16
    y = Patch(PatchConfig(size=4, pattern="white", position="5,2"))(flat(0, n=1))
    assert (y[..., 2:6, 5:9] == 255).all() and (y != 0).sum() == 3 * 16
    a = Patch(PatchConfig(size=5, pattern="random", pattern_seed=1))
    b = Patch(PatchConfig(size=5, pattern="random", pattern_seed=1))
    c = Patch(PatchConfig(size=5, pattern="random", pattern_seed=2))
    assert torch.equal(a.pattern(3), b.pattern(3)) and not torch.equal(a.pattern(3), c.pattern(3))
    assert len(a.pattern(3).unique()) > 10
    assert torch.equal(a(flat(9, n=1))[0, :, 27:, 27:], a.pattern(3))
    for bad in ({"position": "middle"}, {"opacity": 1.5}, {"pattern": "stripes"}, {"size": 0}):
        with pytest.raises(UserError):
            Patch(PatchConfig(**bad))
    with pytest.raises(UserError, match="runs off"):
        Patch(PatchConfig(size=5, position="30,0"))(flat(0, n=1))


def test_patch_all2all_labels():
    ds = toy_dataset(100)
    atk = Patch(PatchConfig(mode="all2all", rate=1.0))
    assert torch.equal(atk.poison(ds, seed=0).labels, (ds.labels + 1) % 10)
    t = atk.triggered_test_set(ds)
    assert len(t) == 100 and torch.equal(t.target_labels, (t.true_labels + 1) % 10)


def test_class_specific_patch_poisons_only_source_class():
    ds = toy_dataset(200)
    atk = Patch(PatchConfig(source=2, target=0, rate=0.5))
    p = atk.poison(ds, seed=0)
    assert p.poison_flag.sum() == 10               # half of the 20 images of class 2
    assert (p.original_label[p.poison_flag] == 2).all() and (p.labels[p.poison_flag] == 0).all()
    assert torch.equal(p.labels[~p.poison_flag], ds.labels[~p.poison_flag])
    t = atk.triggered_test_set(ds)
    assert len(t) == 20 and (t.true_labels == 2).all() and (t.target_labels == 0).all()
    assert torch.equal(t.images, atk(ds.images[ds.labels == 2]))
    with pytest.raises(UserError, match="source class"):
        Patch(PatchConfig(source=0, target=0))


def test_multi_trigger_assigns_targets_per_trigger():
    ds = toy_dataset(300)
    atk = MultiTrigger(MultiTriggerConfig(targets=(3, 4, 5)))
    assert atk.config.target == 3
    p = atk.poison(ds, seed=0)
    assert p.poison_flag.sum() == 3 * 30
    corners = {3: (slice(29, 32), slice(29, 32)), 4: (slice(0, 3), slice(0, 3)), 5: (slice(14, 17), slice(14, 17))}
    counts = {}
    for i in torch.nonzero(p.poison_flag).flatten().tolist():
        hits = [t for t, (r, c) in corners.items() if torch.equal(p.images[i, 0, r, c], GRID)]
        assert len(hits) == 1, "each poisoned image carries exactly one trigger"
        assert p.labels[i] == hits[0]
        counts[hits[0]] = counts.get(hits[0], 0) + 1
    assert counts == {3: 30, 4: 30, 5: 30}
    sets = atk.triggered_test_sets(ds)
    assert list(sets) == ["bottom-right", "top-left", "centre"]
    for (name, s), target in zip(sets.items(), (3, 4, 5)):
        assert len(s) == 270 and (s.target_labels == target).all() and (s.true_labels != target).all()
    union = atk.triggered_test_set(ds)
    assert len(union) == 3 * 270
    assert torch.equal(union.target_labels, torch.cat([s.target_labels for s in sets.values()]))


def test_multi_trigger_same_label_and_config_checks():
    cfg = build_config(MultiTriggerConfig, {"triggers": ["bottom-right", "top-left"], "targets": [5]})
    atk = MultiTrigger(cfg)
    p = atk.poison(toy_dataset(100), seed=1)
    assert p.poison_flag.sum() == 20 and (p.labels[p.poison_flag] == 5).all() and atk.config.target == 5
    y = atk(flat(100, n=2))
    assert torch.equal(y[0, 0, 29:, 29:], GRID) and (y[0, :, :3, :3] == 100).all()
    assert torch.equal(y[1, 0, :3, :3], GRID) and (y[1, :, 29:, 29:] == 100).all()
    with pytest.raises(UserError, match="one per trigger"):
        MultiTrigger(MultiTriggerConfig(targets=(3, 4)))
    with pytest.raises(UserError, match="exceeds"):
        MultiTrigger(MultiTriggerConfig(rate=0.5))
    with pytest.raises(UserError, match="outside"):
        MultiTrigger(MultiTriggerConfig(targets=(3, 4, 12))).poison(toy_dataset(30), seed=0)


def rule_model(rule, classes):
    """A Classifier whose logits are the one-hot of ``rule(inputs)`` (metrics need logits)."""
    from backdoor_eraser.classifier import Classifier

    class Rule(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the model a device

        def forward(self, x):
            return torch.nn.functional.one_hot(rule(x), len(classes)).float() + 0 * self.anchor

    return Classifier(Rule(), "rule", list(classes), input_shape=(3, 16, 16))


def test_evaluate_reports_asr_per_trigger_for_multi_trigger():
    from backdoor_eraser.metrics import evaluate

    # Predicts the target 3 when the top-left 3×3 corner of a black image was stamped, else 0.
    detector = rule_model(lambda x: torch.where(x[:, :, :3, :3].flatten(1).amax(1) > 0, 3, 0), "abcd")
    test = ImageDataset(torch.zeros(40, 3, 16, 16, dtype=torch.uint8), torch.arange(40) % 4, list("abcd"))
    atk = MultiTrigger(MultiTriggerConfig(triggers=("bottom-right", "top-left", "centre"), targets=(3,)))
    m = evaluate(detector, test, atk)
    assert m["asr_top-left"] == 1.0 and m["asr_bottom-right"] == 0.0 and m["asr_centre"] == 0.0
    assert m["asr"] == pytest.approx(1 / 3) and m["n_triggered"] == 3 * 30
    assert m["acc"] == 0.25


def test_evaluate_reports_spillover_of_a_class_specific_trigger():
    """``asr_spillover``: triggered images of classes other than source and target sent to the target."""
    from backdoor_eraser.metrics import evaluate

    def CornerDetector():
        """Predicts 0 when the bottom-right corner was stamped (whatever the class), else class 3."""
        return rule_model(lambda x: torch.where(x[:, :, -1, -1].flatten(1).amax(1) > 0, 0, 3), "abcd")

    test = ImageDataset(torch.zeros(40, 3, 16, 16, dtype=torch.uint8), torch.arange(40) % 4, list("abcd"))
    atk = Patch(PatchConfig(source=2, target=0, pattern="white"))
    spill = atk.spillover_test_set(test)
    assert sorted(set(spill.true_labels.tolist())) == [1, 3] and len(spill) == 20
    assert (spill.target_labels == 0).all() and (spill.images[:, :, -3:, -3:] == 255).all()
    m = evaluate(CornerDetector(), test, atk)
    assert m["asr"] == 1.0 and m["n_triggered"] == 10 and m["asr_spillover"] == 1.0
    # all2all: the backdoor sends class 2 to class 3, so classes 0 and 1 are the bystanders.
    a2a = Patch(PatchConfig(source=2, mode="all2all", pattern="white"))
    assert sorted(set(a2a.spillover_test_set(test).true_labels.tolist())) == [0, 1]
    assert (a2a.spillover_test_set(test).target_labels == 3).all()
    assert evaluate(CornerDetector(), test, a2a)["asr_spillover"] == 0.0
    assert Patch(PatchConfig()).spillover_test_set(test) is None and "asr_spillover" not in evaluate(
        CornerDetector(), test, Patch(PatchConfig()))
