"""Data loaders: fake data in the exact official formats, then the real data in ../shared/data when present."""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from backdoor_eraser.data import DATASETS, load_dataset
from backdoor_eraser.data import cifar10 as cifar10_mod
from backdoor_eraser.data.cache import resolve_cache_dir
from backdoor_eraser.data.folder import read_class_tree
from backdoor_eraser.errors import UserError

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True)
def _no_home_cache(tmp_path, monkeypatch):
    # A loader called without cache_dir must not write into the real ~/.cache during tests.
    monkeypatch.setenv("BACKDOOR_ERASER_CACHE", str(tmp_path / "default-cache"))


def test_all_loaders_registered():
    assert {"cifar10", "gtsrb", "mnist", "folder"} <= set(DATASETS.names())


# ---------------------------------------------------------------- CIFAR-10 official formats

def _batch(n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {b"batch_label": b"fake batch", b"labels": [int(x) for x in rng.integers(0, 10, n)],
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"filenames": [b"x.png"] * n}


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def _write_tarball(path: Path, batches: dict[str, bytes]) -> str:
    with tarfile.open(path, "w:gz") as tar:
        _add(tar, "cifar-10-batches-py/batches.meta", pickle.dumps({b"label_names": [b"airplane"]}, protocol=2))
        for name, payload in batches.items():
            _add(tar, f"cifar-10-batches-py/{name}", payload)
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def fake_cifar(tmp_path):
    """A tiny official-format tarball (3 train images per batch, 4 test images) and its batches."""
    batches = {f"data_batch_{i}": _batch(3, i) for i in range(1, 6)}
    batches["test_batch"] = _batch(4, 99)
    tarball = tmp_path / "src" / "cifar-10-python.tar.gz"
    tarball.parent.mkdir()
    md5 = _write_tarball(tarball, {k: pickle.dumps(v, protocol=2) for k, v in batches.items()})
    return tarball, md5, batches


def _expected(batches: dict, names: list[str]):
    data = np.concatenate([batches[n][b"data"] for n in names]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([batches[n][b"labels"] for n in names])
    return torch.from_numpy(data), torch.from_numpy(labels)


def _check_cifar(splits, batches):
    x, y = _expected(batches, [f"data_batch_{i}" for i in range(1, 6)])
    assert torch.equal(splits.train.images, x) and torch.equal(splits.train.labels, y)
    x, y = _expected(batches, ["test_batch"])
    assert torch.equal(splits.test.images, x) and torch.equal(splits.test.labels, y)
    assert splits.train.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                    "ship", "truck"]


def test_cifar10_tarball_file_and_folder(fake_cifar, monkeypatch):
    tarball, md5, batches = fake_cifar
    monkeypatch.setattr(cifar10_mod, "CIFAR10_MD5", md5)
    _check_cifar(load_dataset("cifar10", tarball), batches)
    _check_cifar(load_dataset("cifar10", tarball.parent), batches)
    # The image row layout is CHW row-major: pixel (c=1, y=2, x=5) of image 0 is byte 1*1024 + 2*32 + 5.
    assert load_dataset("cifar10", tarball).train.images[0, 1, 2, 5] == batches["data_batch_1"][b"data"][0, 1093]


def test_cifar10_wrong_md5_names_both(fake_cifar):
    tarball, md5, _ = fake_cifar
    with pytest.raises(UserError, match=f"md5 {md5}.*expected {cifar10_mod.CIFAR10_MD5}"):
        load_dataset("cifar10", tarball)


def test_cifar10_extracted_batches_folder(fake_cifar, tmp_path):
    tarball, _, batches = fake_cifar
    with tarfile.open(tarball) as tar:
        tar.extractall(tmp_path / "ex", filter="data")
    _check_cifar(load_dataset("cifar10", tmp_path / "ex"), batches)
    _check_cifar(load_dataset("cifar10", tmp_path / "ex" / "cifar-10-batches-py"), batches)


def test_cifar10_protocol5_pickles_also_load(tmp_path):
    # Batches re-saved by Python 3 / numpy 2 use other numpy globals than the Python 2 originals.
    batches = {f"data_batch_{i}": _batch(2, i) for i in range(1, 6)}
    batches["test_batch"] = _batch(2, 7)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name, b in batches.items():
        (folder / name).write_bytes(pickle.dumps(b, protocol=5))
    _check_cifar(load_dataset("cifar10", tmp_path), batches)


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar10_malicious_pickle_is_refused(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    payloads = {f"data_batch_{i}": pickle.dumps(_batch(2, i), protocol=2) for i in range(2, 6)}
    payloads["data_batch_1"] = pickle.dumps({b"data": _Evil(marker), b"labels": [0]}, protocol=2)
    payloads["test_batch"] = pickle.dumps(_batch(2, 0), protocol=2)
    tarball = tmp_path / "cifar-10-python.tar.gz"
    monkeypatch.setattr(cifar10_mod, "CIFAR10_MD5", _write_tarball(tarball, payloads))
    with pytest.raises(UserError, match=r"refusing to unpickle (posix|os|nt)\.system"):
        load_dataset("cifar10", tarball)
    assert not marker.exists()


def test_cifar10_download_via_file_url(fake_cifar, tmp_path, monkeypatch):
    tarball, md5, batches = fake_cifar
    monkeypatch.setattr(cifar10_mod, "CIFAR10_URL", tarball.as_uri())
    monkeypatch.setattr(cifar10_mod, "CIFAR10_MD5", md5)
    target = tmp_path / "downloaded"
    with pytest.raises(UserError, match="does not exist"):
        load_dataset("cifar10", target)
    _check_cifar(load_dataset("cifar10", target, download=True), batches)
    assert sorted(p.name for p in target.iterdir()) == ["cifar-10-python.tar.gz"]
    # Now the data is there: no second download is attempted.
    monkeypatch.setattr(cifar10_mod, "CIFAR10_URL", (tmp_path / "gone.tar.gz").as_uri())
    _check_cifar(load_dataset("cifar10", target, download=True), batches)


def test_cifar10_download_failures(fake_cifar, tmp_path, monkeypatch):
    tarball, _, _ = fake_cifar
    monkeypatch.setattr(cifar10_mod, "CIFAR10_URL", (tmp_path / "missing.tar.gz").as_uri())
    with pytest.raises(UserError, match="download.*failed.*yourself"):
        load_dataset("cifar10", tmp_path / "d1", download=True)
    monkeypatch.setattr(cifar10_mod, "CIFAR10_URL", tarball.as_uri())  # right file, but md5 is the official one
    with pytest.raises(UserError, match="expected c58f30108f718f92721af3b95e74349a"):
        load_dataset("cifar10", tmp_path / "d2", download=True)
    assert list((tmp_path / "d2").iterdir()) == []  # no partial or bad file left behind


def test_cifar10_unrecognised_folder(tmp_path):
    (tmp_path / "stuff").mkdir()
    with pytest.raises(UserError, match="no CIFAR-10 data"):
        load_dataset("cifar10", tmp_path)


# ---------------------------------------------------------------- CIFAR-10 image tree

TREE_CLASSES = ["cat", "airplane", "dog"]  # deliberately not alphabetical: classes.txt decides


def _png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def _make_tree(root: Path, per_class: int, seed: int, with_tsv: bool = True) -> dict:
    """root/cifar10_png/{train,test}/<class>/NNNN.png + classes.txt + tsv in a shuffled official order."""
    rng = np.random.default_rng(seed)
    top = root / "cifar10_png"
    (top).mkdir(parents=True)
    (top / "classes.txt").write_text("\n".join(TREE_CLASSES) + "\n")
    truth = {}
    for split in ("train", "test"):
        labels = np.repeat(np.arange(len(TREE_CLASSES)), per_class)
        rng.shuffle(labels)  # official order interleaves the classes
        counters = [0] * len(TREE_CLASSES)
        rows, images = [], []
        for i, label in enumerate(labels):
            rel = f"{split}/{TREE_CLASSES[label]}/{counters[label]:04d}.png"
            counters[label] += 1
            img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            _png(top / rel, img)
            rows.append(f"{i}\t{label}\t{rel}")
            images.append(img)
        if with_tsv:
            # rows written out of order: the loader must sort by the index column
            (top / f"{split}_index_to_jpeg.tsv").write_text("index\tlabel\tjpeg_path\n" + "\n".join(rows[::-1]) + "\n")
        truth[split] = (torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2), torch.from_numpy(labels))
    return truth


def test_cifar10_png_tree_in_tsv_order(tmp_path):
    truth = _make_tree(tmp_path / "data", per_class=4, seed=1)
    splits = load_dataset("cifar10", tmp_path / "data", cache_dir=False)
    for split in ("train", "test"):
        part = getattr(splits, split)
        assert part.classes == TREE_CLASSES
        assert torch.equal(part.images, truth[split][0])
        assert torch.equal(part.labels, truth[split][1])


def test_cifar10_png_tree_without_tsv_is_class_then_name_order(tmp_path):
    _make_tree(tmp_path, per_class=3, seed=2, with_tsv=False)
    top = tmp_path / "cifar10_png"
    splits = load_dataset("cifar10", top, cache_dir=False)
    assert splits.test.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    expected = np.array(Image.open(top / "test" / "airplane" / "0002.png"))
    assert torch.equal(splits.test.images[5], torch.from_numpy(expected).permute(2, 0, 1))


def test_cifar10_tree_tsv_label_mismatch_is_an_error(tmp_path):
    _make_tree(tmp_path, per_class=2, seed=3)
    tsv = tmp_path / "cifar10_png" / "test_index_to_jpeg.tsv"
    lines = tsv.read_text().splitlines()
    idx, label, rel = lines[1].split("\t")
    lines[1] = "\t".join([idx, str((int(label) + 1) % 3), rel])
    tsv.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match="class folder"):
        load_dataset("cifar10", tmp_path, cache_dir=False)


def test_cifar10_tree_cache_round_trip(tmp_path):
    _make_tree(tmp_path / "data", per_class=3, seed=4)
    data = tmp_path / "data"
    before = sorted(data.rglob("*"))
    os.chmod(data / "cifar10_png", 0o555)  # the data folder may be read-only: the cache goes elsewhere
    try:
        first = load_dataset("cifar10", data, cache_dir=tmp_path / "cache")
        files = list((tmp_path / "cache").iterdir())
        assert len(files) == 1 and files[0].suffix == ".safetensors"
        again = load_dataset("cifar10", data, cache_dir=tmp_path / "cache")
    finally:
        os.chmod(data / "cifar10_png", 0o755)
    for a, b in ((first.train, again.train), (first.test, again.test)):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and torch.equal(a.index, b.index)
        assert a.classes == b.classes and a.images.dtype == torch.uint8
    assert again.meta == first.meta
    assert sorted(data.rglob("*")) == before


def test_cache_is_invalidated_when_files_change(tmp_path):
    _make_tree(tmp_path / "data", per_class=2, seed=5)
    cache = tmp_path / "cache"
    first = load_dataset("cifar10", tmp_path / "data", cache_dir=cache)
    target = tmp_path / "data" / "cifar10_png" / "test" / "cat" / "0000.png"
    _png(target, np.zeros((32, 32, 3), np.uint8))
    os.utime(target, ns=(4 * 10**18, 4 * 10**18))  # make sure the mtime moves even on coarse-mtime file systems
    second = load_dataset("cifar10", tmp_path / "data", cache_dir=cache)
    assert not torch.equal(first.test.images, second.test.images)
    assert len(list(cache.iterdir())) == 2


def test_cache_disabled_writes_nothing(tmp_path):
    _make_tree(tmp_path / "data", per_class=2, seed=6)
    load_dataset("cifar10", tmp_path / "data", cache_dir=False)
    load_dataset("folder", tmp_path / "data", cache_dir=False)
    assert not (tmp_path / "default-cache").exists()
    assert resolve_cache_dir(False) is None
    load_dataset("folder", tmp_path / "data")  # default cache dir comes from BACKDOOR_ERASER_CACHE
    assert len(list((tmp_path / "default-cache").iterdir())) == 1


# ---------------------------------------------------------------- GTSRB

def _write_gtsrb(root: Path, labelled_test_csv_in: str = "Final_Test") -> dict:
    """GTSRB/Final_Training/Images/000NN/*.ppm + GT-000NN.csv and Final_Test/Images/*.ppm + csv."""
    rng = np.random.default_rng(0)
    gt = root / "GTSRB"
    header = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\r\n"
    train_imgs, train_labels = [], []
    for cls in (0, 2):
        folder = gt / "Final_Training" / "Images" / f"{cls:05d}"
        folder.mkdir(parents=True)
        lines = [header]
        for k in (1, 0):  # csv order, not name order, decides
            img = rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)
            name = f"00000_{k:05d}.ppm"
            Image.fromarray(img).save(folder / name)
            lines.append(f"{name};36;40;5;5;30;35;{cls}\r\n")
            train_imgs.append(img)
            train_labels.append(cls)
        (folder / f"GT-{cls:05d}.csv").write_text("".join(lines))
    test_dir = gt / "Final_Test" / "Images"
    test_dir.mkdir(parents=True)
    test_labels = [42, 2, 0]
    unlabelled, labelled = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2\r\n"], [header]
    test_imgs = []
    for i, cls in enumerate(test_labels):
        img = rng.integers(0, 256, (30, 33, 3), dtype=np.uint8)
        Image.fromarray(img).save(test_dir / f"{i:05d}.ppm")
        unlabelled.append(f"{i:05d}.ppm;33;30;5;5;25;25\r\n")
        labelled.append(f"{i:05d}.ppm;33;30;5;5;25;25;{cls}\r\n")
        test_imgs.append(img)
    (test_dir / "GT-final_test.test.csv").write_text("".join(unlabelled))  # shipped without labels
    (gt / labelled_test_csv_in / "GT-final_test.csv").write_text("".join(labelled))
    return {"train": (train_imgs, train_labels), "test": (test_imgs, test_labels)}


def _resized(img: np.ndarray, size: int) -> torch.Tensor:
    out = np.array(Image.fromarray(img).resize((size, size), Image.BILINEAR))
    return torch.from_numpy(out).permute(2, 0, 1)


@pytest.mark.parametrize("csv_in", ["Final_Test", "Final_Test/Images"])
def test_gtsrb_official_tree(tmp_path, csv_in):
    truth = _write_gtsrb(tmp_path / "gtsrb32", csv_in)
    for data_dir in (tmp_path, tmp_path / "gtsrb32", tmp_path / "gtsrb32" / "GTSRB"):
        splits = load_dataset("gtsrb", data_dir, cache_dir=False)
        assert splits.train.num_classes == 43 and splits.train.classes[42] == "00042"
        for split in ("train", "test"):
            imgs, labels = truth[split]
            part = getattr(splits, split)
            assert part.labels.tolist() == labels
            assert part.images.shape == (len(labels), 3, 32, 32)
            assert torch.equal(part.images, torch.stack([_resized(i, 32) for i in imgs]))
    assert load_dataset("gtsrb", tmp_path, size=20, cache_dir=False).test.images.shape == (3, 3, 20, 20)


def test_gtsrb_cache_and_missing_labels(tmp_path):
    _write_gtsrb(tmp_path)
    a = load_dataset("gtsrb", tmp_path, cache_dir=tmp_path / "c")
    b = load_dataset("gtsrb", tmp_path / "GTSRB", cache_dir=tmp_path / "c")  # same resolved root: same cache file
    assert torch.equal(a.train.images, b.train.images) and len(list((tmp_path / "c").iterdir())) == 1
    (tmp_path / "GTSRB" / "Final_Test" / "GT-final_test.csv").unlink()
    with pytest.raises(UserError, match="no GTSRB test labels.*ClassId"):
        load_dataset("gtsrb", tmp_path, cache_dir=False)
    with pytest.raises(UserError, match="no GTSRB tree"):
        load_dataset("gtsrb", tmp_path / "GTSRB" / "Final_Test", cache_dir=False)


# ---------------------------------------------------------------- MNIST

def _idx(magic: int, arr: np.ndarray) -> bytes:
    return struct.pack(f">I{arr.ndim}I", magic, *arr.shape) + arr.astype(np.uint8).tobytes()


def _write_mnist(folder: Path, gz: bool, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    truth = {}
    for prefix, n in (("train", 7), ("t10k", 3)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n).astype(np.uint8)
        for kind, magic, arr in (("images-idx3", 0x803, images), ("labels-idx1", 0x801, labels)):
            name, payload = f"{prefix}-{kind}-ubyte", _idx(magic, arr)
            if gz:
                (folder / f"{name}.gz").write_bytes(gzip.compress(payload))
            else:
                (folder / name).write_bytes(payload)
        truth[prefix] = (images, labels)
    return truth


@pytest.mark.parametrize("gz,layout", [(True, "mnist/raw"), (False, "raw"), (False, ".")])
def test_mnist_idx_files(tmp_path, gz, layout):
    truth = _write_mnist(tmp_path / layout, gz)
    splits = load_dataset("mnist", tmp_path)
    assert splits.train.images.shape == (7, 1, 28, 28) and splits.test.images.shape == (3, 1, 28, 28)
    assert torch.equal(splits.train.images[:, 0], torch.from_numpy(truth["train"][0]))
    assert splits.test.labels.tolist() == truth["t10k"][1].tolist()
    assert splits.train.classes == [str(i) for i in range(10)]


def test_mnist_pad_and_rgb(tmp_path):
    truth = _write_mnist(tmp_path, gz=True)
    splits = load_dataset("mnist", tmp_path, size=32, rgb=True)
    assert splits.train.images.shape == (7, 3, 32, 32)
    img = splits.train.images[0]
    assert torch.equal(img[0, 2:30, 2:30], torch.from_numpy(truth["train"][0][0]))
    assert torch.equal(img[0], img[2])
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert int(img[:, border].sum()) == 0
    with pytest.raises(UserError, match="at least 28"):
        load_dataset("mnist", tmp_path, size=20)


def test_mnist_bad_files(tmp_path):
    _write_mnist(tmp_path, gz=False)
    labels = tmp_path / "t10k-labels-idx1-ubyte"
    images = tmp_path / "t10k-images-idx3-ubyte"
    good = labels.read_bytes()
    labels.write_bytes(images.read_bytes()[:100])  # images where labels belong
    with pytest.raises(UserError, match="magic number 0x00000803, expected 0x00000801"):
        load_dataset("mnist", tmp_path)
    labels.write_bytes(good[:-1])
    with pytest.raises(UserError, match="truncated"):
        load_dataset("mnist", tmp_path)
    labels.unlink()
    with pytest.raises(UserError, match="no MNIST idx files"):
        load_dataset("mnist", tmp_path)


# ---------------------------------------------------------------- generic folder

def _flat_tree(root: Path, counts: dict[str, int]) -> None:
    rng = np.random.default_rng(7)
    for cls, n in counts.items():
        for k in range(n):
            ext = ["png", "PNG", "bmp"][k % 3]
            _png(root / cls / f"{k:03d}.{ext}", rng.integers(0, 256, (8, 12, 3), dtype=np.uint8))
    (root / "notes.txt").write_text("not an image")


def test_folder_with_train_test(tmp_path):
    _make_tree(tmp_path, per_class=2, seed=8, with_tsv=False)
    splits = load_dataset("folder", tmp_path, size=None, cache_dir=False)  # parent with one subfolder
    assert splits.train.classes == sorted(TREE_CLASSES)  # no classes.txt handling here: sorted names
    assert splits.test.labels.tolist() == [0, 0, 1, 1, 2, 2]
    resized = load_dataset("folder", tmp_path / "cifar10_png", size=16, cache_dir=False)
    assert resized.train.images.shape == (6, 3, 16, 16)


def test_folder_single_tree_stratified_split(tmp_path):
    _flat_tree(tmp_path, {"a": 10, "b": 5, "c": 2})
    splits = load_dataset("folder", tmp_path, size=32, cache_dir=False)
    assert splits.train.classes == ["a", "b", "c"]
    assert splits.test.class_counts().tolist() == [2, 1, 1]
    assert splits.train.class_counts().tolist() == [8, 4, 1]
    assert splits.train.images.shape[1:] == (3, 32, 32)
    again = load_dataset("folder", tmp_path, size=32, cache_dir=False)
    assert torch.equal(splits.test.images, again.test.images)
    other = load_dataset("folder", tmp_path, size=32, seed=1, cache_dir=False)
    assert not torch.equal(splits.test.images, other.test.images)
    x, y, classes = read_class_tree(tmp_path, size=32)
    assert torch.equal(torch.cat([splits.train.images, splits.test.images]).sum(0), x.sum(0))  # a partition


def test_folder_errors(tmp_path):
    _flat_tree(tmp_path, {"a": 2, "b": 2})
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no images"):
        load_dataset("folder", tmp_path, cache_dir=False)
    with pytest.raises(UserError, match="does not exist"):
        load_dataset("folder", tmp_path / "nope")
    with pytest.raises(UserError, match="test_fraction"):
        load_dataset("folder", tmp_path / "a", test_fraction=1.5)
    (tmp_path / "empty").rmdir()
    with pytest.raises(UserError, match=r"12×8.*pass a size"):
        _png(tmp_path / "b" / "big.png", np.zeros((9, 9, 3), np.uint8))
        load_dataset("folder", tmp_path, size=None, cache_dir=False)


# ---------------------------------------------------------------- real data (skipped when absent)

def _real(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"{path} not available")
    return path


MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_real_mnist(tmp_path):
    with tarfile.open(_real("mnist.tar")) as tar:
        tar.extractall(tmp_path, filter="data")
    splits = load_dataset("mnist", tmp_path)
    assert splits.train.images.shape == (60000, 1, 28, 28) and splits.test.images.shape == (10000, 1, 28, 28)
    assert splits.train.class_counts().tolist() == MNIST_TRAIN_COUNTS
    assert splits.test.class_counts().tolist() == MNIST_TEST_COUNTS


def test_real_cifar10_jpeg_test_split(tmp_path):
    wanted = ("cifar10_jpeg/test/", "cifar10_jpeg/classes.txt", "cifar10_jpeg/test_index_to_jpeg.tsv")
    with tarfile.open(_real("cifar10_jpeg.tar.gz")) as tar:
        members = [m for m in tar if m.name.startswith(wanted)]  # only test/: decoding 50,000 train JPEGs is too slow
        tar.extractall(tmp_path, members=members, filter="data")
    root = tmp_path / "cifar10_jpeg"
    test = cifar10_mod.read_tree_split(root, "test")
    assert test.images.shape == (10000, 3, 32, 32) and test.images.dtype == torch.uint8
    assert test.class_counts().tolist() == [1000] * 10
    assert test.classes == cifar10_mod.CIFAR10_CLASSES
    # The official test labels start 3 8 8 0 6 6 1 6 3 1 (cat ship ship airplane frog ...).
    assert test.labels[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    rows = cifar10_mod.read_index_tsv(root / "test_index_to_jpeg.tsv")
    for i in (0, 1, 4321, 9999):
        _, label, rel = rows[i]
        pixels = torch.from_numpy(np.array(Image.open(root / rel).convert("RGB"))).permute(2, 0, 1)
        assert torch.equal(test.images[i], pixels) and test.labels[i] == label
