"""Clean-subset selection, batched augmentation and the synthetic data set."""
import pytest
import torch

from backdoor_eraser.data import load_dataset
from backdoor_eraser.data.augment import CropFlip, random_crop, random_flip
from backdoor_eraser.data.subset import select_clean_subset
from backdoor_eraser.errors import UserError


def test_clean_subset_is_deterministic_and_stratified():
    labels = torch.arange(1000) % 10
    a = select_clean_subset(labels, fraction=0.05, seed=3)
    b = select_clean_subset(labels, fraction=0.05, seed=3)
    c = select_clean_subset(labels, fraction=0.05, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len(a) == 50 and len(set(a.tolist())) == 50
    assert torch.bincount(labels[a], minlength=10).tolist() == [5] * 10


def test_clean_subset_unbalanced_classes_by_count():
    labels = torch.tensor([0] * 70 + [1] * 20 + [2] * 10)
    idx = select_clean_subset(labels, count=10, seed=0)
    assert torch.bincount(labels[idx], minlength=3).tolist() == [7, 2, 1]
    # largest remainder: 11 of (70, 20, 10) → exact 7.7, 2.2, 1.1 → 7+1, 2, 1
    idx = select_clean_subset(labels, count=11, seed=0)
    assert torch.bincount(labels[idx], minlength=3).tolist() == [8, 2, 1]


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5, float("nan")])
def test_clean_fraction_outside_range_is_refused(fraction):
    with pytest.raises(UserError, match="clean fraction"):
        select_clean_subset(torch.arange(10) % 2, fraction=fraction)


def test_random_crop_is_a_shifted_window_with_zero_padding():
    x = torch.arange(1, 2 * 3 * 8 * 8 + 1).remainder(250).add(1).to(torch.uint8).view(2, 3, 8, 8)
    g = torch.Generator().manual_seed(0)
    y = random_crop(x, 2, g)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):
        matches = [(dy, dx) for dy in range(5) for dx in range(5)
                   if torch.equal(y[i], padded[i, :, dy:dy + 8, dx:dx + 8])]
        assert len(matches) == 1
    assert y.dtype == torch.uint8 and y.shape == x.shape


def test_flip_and_cropflip_are_seeded():
    x = torch.randint(0, 255, (16, 3, 8, 8), dtype=torch.uint8)
    f = random_flip(x, torch.Generator().manual_seed(1))
    for i in range(16):
        assert torch.equal(f[i], x[i]) or torch.equal(f[i], x[i].flip(2))
    assert not torch.equal(f, x)
    a = CropFlip(4)(x, torch.Generator().manual_seed(5))
    b = CropFlip(4)(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_synthetic_dataset_is_seeded_and_balanced():
    a = load_dataset("synthetic", n_train=200, n_test=100)
    b = load_dataset("synthetic", n_train=200, n_test=100)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)
    assert a.train.images.shape == (200, 3, 32, 32) and a.train.images.dtype == torch.uint8
    assert a.train.class_counts().tolist() == [20] * 10
    assert not torch.equal(a.train.images[:100], a.test.images)
    c = load_dataset("synthetic", n_train=200, n_test=100, seed=1)
    assert not torch.equal(a.train.images, c.train.images)


def test_loading_needs_data_dir_and_known_name():
    with pytest.raises(UserError, match="needs --data-dir"):
        load_dataset("cifar10")
    with pytest.raises(UserError, match="known: .*synthetic"):
        load_dataset("imagenet", "/tmp")
