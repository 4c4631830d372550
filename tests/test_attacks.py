"""Exact trigger pixels and poisoning bookkeeping for the Core attacks."""
import pytest
import torch

from backdoor_eraser import attacks
from backdoor_eraser.attacks.trojan import PATCH
from backdoor_eraser.data.dataset import ImageDataset
from backdoor_eraser.errors import UserError

GRID = [[0, 0, 255], [0, 255, 0], [255, 0, 255]]


def flat(value=100, n=2, c=3, h=32, w=32):
    return torch.full((n, c, h, w), value, dtype=torch.uint8)


def toy_dataset(n=200, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.int64).to(torch.uint8)
    labels = torch.arange(n) % classes
    return ImageDataset(images, labels, [str(i) for i in range(classes)])


def test_badnets_bottom_right_sets_exactly_the_nine_pixels():
    x = flat(100)
    y = attacks.create("badnets")(x)
    assert torch.equal(y[:, :, 29:, 29:], torch.tensor(GRID, dtype=torch.uint8).expand(2, 3, 3, 3))
    changed = (y != x).any(1)
    assert changed.sum().item() == 2 * 9
    assert torch.equal(x, flat(100)), "the input batch must not be modified"


def test_badnets_four_corners_mirrors_the_grid():
    y = attacks.create("badnets", position="four-corners")(flat(100, n=1))[0, 0]
    g = torch.tensor(GRID, dtype=torch.uint8)
    assert torch.equal(y[29:, 29:], g)
    assert torch.equal(y[29:, :3], g.flip(1))
    assert torch.equal(y[:3, 29:], g.flip(0))
    assert torch.equal(y[:3, :3], g.flip(0).flip(1))
    assert (y[3:29, :] == 100).all() and (y[:, 3:29] == 100).all()


def test_badnets_centre_is_argd_release_trigger():
    y = attacks.create("badnets", position="centre")(flat(7, n=1))[0]
    expected = torch.tensor([[255, 128, 255], [128, 255, 128], [255, 128, 128]], dtype=torch.uint8)
    assert torch.equal(y[:, 18:21, 18:21], expected.expand(3, 3, 3))
    assert (y != 7).sum() == 27


def test_blend_with_fixed_key_is_exact():
    atk = attacks.create("blend", alpha=0.2, key_seed=3)
    x = torch.arange(3 * 32 * 32, dtype=torch.int64).remainder(256).to(torch.uint8).view(1, 3, 32, 32)
    y = atk(x)
    key = atk.key((3, 32, 32))
    expected = torch.round(0.8 * x.double() + 0.2 * key.double()).to(torch.uint8)
    assert torch.equal(y, expected)
    # hand-checked pixel: x = 10, k = 255 → 0.8·10 + 0.2·255 = 59
    atk2 = attacks.create("blend")
    atk2._key = torch.full((3, 32, 32), 255, dtype=torch.uint8)
    assert atk2(flat(10, n=1)).unique().tolist() == [59]


def test_blend_key_is_fixed_by_seed_and_shared_by_all_images():
    a, b = attacks.create("blend", key_seed=1), attacks.create("blend", key_seed=1)
    assert torch.equal(a.key((3, 32, 32)), b.key((3, 32, 32)))
    assert not torch.equal(a.key((3, 32, 32)), attacks.create("blend", key_seed=2).key((3, 32, 32)))
    y = a(flat(0, n=4))
    assert all(torch.equal(y[0], y[i]) for i in range(4))
    noisy = attacks.create("blend", per_image_noise=True)(flat(0, n=2))
    assert not torch.equal(noisy[0], noisy[1])


def test_blend_key_image(tmp_path):
    from PIL import Image
    Image.new("RGB", (64, 64), (200, 100, 0)).save(tmp_path / "key.png")
    atk = attacks.create("blend", key_image=str(tmp_path / "key.png"), alpha=0.5)
    y = atk(flat(100, n=1))
    assert y[0, :, 5, 5].tolist() == [150, 100, 50]
    with pytest.raises(UserError, match="does not exist"):
        attacks.create("blend", key_image=str(tmp_path / "nope.png"))(flat(1, n=1))


def test_trojan_patch_values_saturate_and_wrap():
    x = flat(100, n=1)
    y = attacks.create("trojan")(x)
    expected = torch.clamp(100 + PATCH, 0, 255).to(torch.uint8)  # trunc of positive floats
    assert torch.equal(y[0, :, 25:28, 25:28], expected)
    mask = torch.ones(32, 32, dtype=torch.bool)
    mask[25:28, 25:28] = False
    assert (y[0][:, mask] == 100).all(), "only rows/cols 25–27 change"
    # R at (25,25): 100 + 207.35 = 307.35 → 255 saturated, 51 with the release's wrap-around
    assert y[0, 0, 25, 25] == 255
    wrapped = attacks.create("trojan", wrap=True)(x)
    assert wrapped[0, 0, 25, 25] == 51
    # G at (26,26) is 0 in the patch: unchanged
    assert y[0, 1, 26, 26] == 100 and wrapped[0, 1, 26, 26] == 100


def test_poisoned_label_counts_and_flags():
    ds = toy_dataset(200)
    atk = attacks.create("badnets", rate=0.1, target=3)
    p = atk.poison(ds, seed=5)
    assert p.poison_flag.sum() == 20
    assert (p.labels[p.poison_flag] == 3).all()
    assert torch.equal(p.labels[~p.poison_flag], ds.labels[~p.poison_flag])
    assert torch.equal(p.original_label, ds.labels)
    assert torch.equal(p.index, torch.arange(200))
    assert torch.equal(p.images[~p.poison_flag], ds.images[~p.poison_flag])
    assert torch.equal(p.images[p.poison_flag], atk(ds.images[p.poison_flag]))
    # the same seed gives the same poisoned set; another seed another
    assert torch.equal(atk.poison(ds, seed=5).poison_indices, p.poison_indices)
    assert not torch.equal(atk.poison(ds, seed=6).poison_indices, p.poison_indices)


def test_clean_label_only_poisons_target_class_and_keeps_labels():
    ds = toy_dataset(200)
    p = attacks.create("blend", label_mode="clean", rate=0.5, target=2).poison(ds, seed=0)
    assert p.poison_flag.sum() == 10  # half of the 20 images of class 2
    assert (p.original_label[p.poison_flag] == 2).all()
    assert torch.equal(p.labels, ds.labels)


def test_all2all_label_map_and_test_set():
    ds = toy_dataset(100)
    atk = attacks.create("badnets", mode="all2all", rate=1.0)
    p = atk.poison(ds, seed=0)
    assert torch.equal(p.labels, (ds.labels + 1) % 10)
    t = atk.triggered_test_set(ds)
    assert len(t) == 100
    assert torch.equal(t.target_labels, (t.true_labels + 1) % 10)


def test_triggered_test_set_drops_target_class():
    ds = toy_dataset(100)
    t = attacks.create("trojan", target=4).triggered_test_set(ds)
    assert len(t) == 90 and (t.true_labels != 4).all() and (t.target_labels == 4).all()
    assert (t.images[:, :, 25:28, 25:28] != ds.images[t.source_index][:, :, 25:28, 25:28]).any()


def test_bad_attack_input_gives_user_errors():
    with pytest.raises(UserError, match="known: badnets, blend, .*trojan, .*wanet"):
        attacks.create("nope")
    with pytest.raises(UserError, match="rate"):
        attacks.create("badnets", rate=1.5)
    with pytest.raises(UserError, match="no parameter"):
        attacks.create("badnets", alpha=0.3)
    with pytest.raises(UserError, match="outside"):
        attacks.create("badnets", target=12).poison(toy_dataset(20), seed=0)
    with pytest.raises(UserError, match="clean-label"):
        attacks.create("badnets", mode="all2all", label_mode="clean")
