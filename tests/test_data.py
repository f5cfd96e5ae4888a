"""Datasets, augmentation, BatchLoader and evaluation subsets (robbench/data)."""
from __future__ import annotations

import hashlib
import json
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from robbench.data import (BatchLoader, FolderData, Subset, TensorData, augment_batch, clear_cache, dverge_subset,
                           get_info, load_split, make_subset)
from robbench.data import digits as digits_mod
from robbench.data import vision
from robbench.data.augment import DEFAULT_AUGMENT, resolve
from robbench.data.base import seeded_generator
from robbench.errors import ConfigError, DataError


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_cache()
    yield
    clear_cache()


# ------------------------------------------------------------------------------------------ digits

def test_digits_shapes_range_and_counts():
    tr, te = load_split("digits", "train"), load_split("digits", "test")
    info = get_info("digits")
    assert tuple(tr.x.shape) == (info.train_size, 1, 8, 8) and tuple(te.x.shape) == (info.test_size, 1, 8, 8)
    assert len(tr) + len(te) == 1797
    for d in (tr, te):
        assert d.x.dtype == torch.float32 and d.y.dtype == torch.int64
        assert float(d.x.min()) == 0.0 and float(d.x.max()) == 1.0
        # values are k/16
        assert torch.equal(d.x * 16, (d.x * 16).round())
    assert sorted(torch.unique(te.y).tolist()) == list(range(10))
    # info mean/std are the measured train statistics
    assert abs(float(tr.x.mean()) - info.mean[0]) < 1e-3 and abs(float(tr.x.std()) - info.std[0]) < 1e-3


def test_digits_split_is_stratified_disjoint_and_fixed():
    from sklearn.datasets import load_digits

    target = load_digits().target
    train, test = digits_mod.split_indices()
    assert set(train).isdisjoint(test) and len(set(train) | set(test)) == 1797
    counts = np.bincount(target[test], minlength=10)
    expected = np.bincount(target) * 450 / 1797
    assert np.all(np.abs(counts - expected) <= 1), counts
    # fixed: recomputing gives the same split, and it is the one pinned in the code
    train2, test2 = digits_mod.split_indices()
    assert np.array_equal(test, test2) and np.array_equal(train, train2)
    assert hashlib.sha256(json.dumps(test.tolist(), separators=(",", ":")).encode()).hexdigest() \
        == digits_mod.TEST_INDICES_SHA256
    te = load_split("digits", "test")
    assert torch.equal(te.y, torch.from_numpy(target[test]))


# --------------------------------------------------------------------------------------- synthetic

def test_synthetic_shapes_balance_determinism():
    info = get_info("synthetic")
    tr = load_split("synthetic", "train")
    assert tuple(tr.x.shape) == (info.train_size, info.in_channels, info.image_size, info.image_size)
    assert 0.0 <= float(tr.x.min()) and float(tr.x.max()) <= 1.0
    assert torch.bincount(tr.y).tolist() == [info.train_size // 10] * 10
    clear_cache()
    again = load_split("synthetic", "train")
    assert again is not tr and torch.equal(again.x, tr.x) and torch.equal(again.y, tr.y)
    other = load_split("synthetic", "train", options={"seed": 1})
    assert not torch.equal(other.x, tr.x)
    # the test split does not depend on the train size
    t1 = load_split("synthetic", "test")
    t2 = load_split("synthetic", "test", options={"n_train": 100})
    assert torch.equal(t1.x, t2.x)


def test_synthetic_is_learnable_and_options_change_info():
    tr, te = load_split("synthetic", "train"), load_split("synthetic", "test")
    # nearest class mean from the train split classifies the test split well
    means = torch.stack([tr.x[tr.y == c].mean(0) for c in range(10)]).flatten(1)
    pred = torch.cdist(te.x.flatten(1), means).argmin(1)
    acc = (pred == te.y).float().mean().item()
    assert acc > 0.8, acc
    info = get_info("synthetic", {"image_size": 16, "n_train": 40, "channels": 1})
    d = load_split("synthetic", "train", options={"image_size": 16, "n_train": 40, "channels": 1})
    assert (info.image_size, info.train_size, info.in_channels) == (16, 40, 1)
    assert tuple(d.x.shape) == (40, 1, 16, 16) and len(info.mean) == 1


def test_bad_options_and_split_are_user_errors():
    with pytest.raises(ConfigError, match=r"data\.options\.n_tset.*allowed here"):
        load_split("synthetic", "test", options={"n_tset": 3})
    with pytest.raises(ConfigError, match="n_test"):
        load_split("synthetic", "test", options={"n_test": 0})
    with pytest.raises(ConfigError, match="takes no options"):
        load_split("digits", "test", options={"x": 1})
    with pytest.raises(ConfigError, match="allowed: train, test"):
        load_split("digits", "val")
    with pytest.raises(ConfigError, match="unknown dataset"):
        load_split("mnist", "test")


def test_load_split_caches_per_process(tmp_path):
    a = load_split("synthetic", "test", tmp_path)
    assert load_split("synthetic", "test", tmp_path) is a
    assert load_split("synthetic", "test", tmp_path, {"seed": 2}) is not a
    assert load_split("synthetic", "test", tmp_path / "other") is not a


# ---------------------------------------------------------------------------------------- subsets

def test_dverge_subset_matches_reference_and_keeps_global_random():
    idx = dverge_subset()
    assert idx[:5] == [6311, 6890, 663, 4242, 8376]
    state = random.getstate()
    random.seed(0)
    reference = random.sample(range(10000), 1000)  # DVERGE eval_wbox.py
    random.setstate(state)
    assert idx == reference and len(set(idx)) == 1000
    before = random.getstate()
    dverge_subset(1000, 10000, 0)
    assert random.getstate() == before
    # a list pool (within-ensemble transferability draws from the all-correct samples)
    pool = list(range(0, 20000, 2))
    assert dverge_subset(10, pool) == [pool[i] for i in idx[:10]]
    with pytest.raises(DataError, match="n <= 50"):
        dverge_subset(100, 50)


def test_subset_hash_is_stable_and_detects_changes():
    s = make_subset("dverge", "cifar10", "test", 1000, 0)
    assert list(s.indices) == dverge_subset() and s.split == "test"
    canonical = json.dumps(list(s.indices), separators=(",", ":")).encode()
    assert s.sha256 == hashlib.sha256(canonical).hexdigest()
    assert make_subset("dverge", "cifar10", "test", 1000, 0).sha256 == s.sha256
    assert make_subset("dverge", "cifar10", "test", 1000, 1).sha256 != s.sha256
    d = s.to_dict()
    assert Subset.from_dict(json.loads(json.dumps(d))) == s
    d["indices"][3] += 1
    with pytest.raises(DataError, match="does not match its sha256"):
        Subset.from_dict(d)


def test_make_subset_kinds_and_sizes():
    assert list(make_subset("first", "digits", "test", 5).indices) == [0, 1, 2, 3, 4]
    assert len(make_subset("all", "digits", "test").indices) == 450
    r = make_subset("random", "digits", "test", 50, seed=3)
    assert len(set(r.indices)) == 50 and list(r.indices) == sorted(r.indices) and max(r.indices) < 450
    assert r.indices == make_subset("random", "digits", "test", 50, seed=3).indices
    assert r.indices != make_subset("random", "digits", "test", 50, seed=4).indices
    dv = make_subset("dverge", "digits", "test", 100)
    assert list(dv.indices) == random.Random(0).sample(range(450), 100)
    with pytest.raises(DataError, match="n=1000 but the split has 450 samples"):
        make_subset("dverge", "digits", "test", 1000)
    assert len(make_subset("first", "digits", "test", 1000, clamp=True)) == 450
    assert len(make_subset("first", "synthetic", "test", 40, options={"n_test": 30}, clamp=True)) == 30
    with pytest.raises(DataError, match="allowed: dverge, first, random, all"):
        make_subset("odd", "digits", "test", 5)


# ----------------------------------------------------------------------------------- augmentation

def _candidates(img: torch.Tensor, pad: int, flips: bool) -> list[torch.Tensor]:
    c, h, w = img.shape
    p = torch.nn.functional.pad(img, (pad, pad, pad, pad))
    out = []
    for i in range(2 * pad + 1):
        for j in range(2 * pad + 1):
            crop = p[:, i:i + h, j:j + w]
            out.append(crop)
            if flips:
                out.append(crop.flip(-1))
    return out


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_crop_flip_is_a_padded_crop_of_each_sample(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 256, (64, 3, 6, 6), generator=g).to(dtype)
    if dtype == torch.float32:
        x = x / 255
    out = augment_batch(x, "crop_flip", seeded_generator("t", 1), padding=2)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert float(out.min()) >= 0 and float(out.max()) <= (255 if dtype == torch.uint8 else 1.0)
    for a, b in zip(x, out):
        assert any(torch.equal(b, c) for c in _candidates(a, 2, True))
    # randomness is actually used: several offsets and both flip states occur
    assert len({tuple(o.flatten().tolist()) for o in out}) > 32
    assert (out == 0).any()  # zero padding shows up for shifted crops


def test_crop_only_flip_only_and_none():
    x = torch.rand(32, 1, 8, 8)
    crop = augment_batch(x, "crop", seeded_generator("t", 2))  # 8x8 -> pad 1 (digits default)
    for a, b in zip(x, crop):
        assert any(torch.equal(b, c) for c in _candidates(a, 1, False))
    flip = augment_batch(x, "flip", seeded_generator("t", 3))
    flipped = [torch.equal(b, a.flip(-1)) for a, b in zip(x, flip)]
    assert all(f or torch.equal(b, a) for f, a, b in zip(flipped, x, flip)) and 0 < sum(flipped) < 32
    assert augment_batch(x, "none", seeded_generator("t", 4)) is x


def test_default_augmentation_per_dataset():
    assert resolve("default", "cifar10") == "crop_flip"
    assert resolve("default", "svhn") == "crop"  # no flips for house numbers
    assert resolve("default", "digits") == "crop" and resolve("default", "synthetic") == "none"
    assert set(DEFAULT_AUGMENT) >= {"cifar10", "cifar100", "svhn", "digits", "synthetic", "imagenet"}
    with pytest.raises(ConfigError, match="allowed: default"):
        resolve("cutout", "cifar10")


# ------------------------------------------------------------------------------------- BatchLoader

def _batches(it):
    return [(x.clone(), y.clone()) for x, y in it]


def test_batchloader_resume_equals_uninterrupted():
    data = load_split("digits", "train")
    loader = BatchLoader(data, 100, shuffle=True, augment="default", seed=7)
    assert len(loader) == 14
    full = _batches(loader.epoch(3))
    for k in (0, 1, 9, 13):
        resumed = _batches(loader.epoch(3, start_batch=k))
        assert len(resumed) == len(full) - k
        for (xa, ya), (xb, yb) in zip(full[k:], resumed):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # a fresh loader object (a restarted process) gives the same batches
    again = _batches(BatchLoader(data, 100, True, "default", 7).epoch(3, start_batch=5))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(full[5:], again))


def test_batchloader_seeds_epochs_streams():
    data = load_split("synthetic", "train", options={"n_train": 250})
    loader = BatchLoader(data, 64, shuffle=True, augment="crop_flip", seed=0)
    e0 = _batches(loader.epoch(0))
    assert [len(y) for _, y in e0] == [64, 64, 64, 58]
    assert sorted(torch.cat([y for _, y in e0]).tolist()) == sorted(data.y.tolist())
    assert all(x.dtype == torch.float32 and 0 <= float(x.min()) and float(x.max()) <= 1 for x, _ in e0)
    same = _batches(BatchLoader(data, 64, True, "crop_flip", 0).epoch(0))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(e0, same))
    other_seed = _batches(BatchLoader(data, 64, True, "crop_flip", 1).epoch(0))
    assert not torch.equal(e0[0][1], other_seed[0][1])
    other_epoch = _batches(loader.epoch(1))
    assert not torch.equal(e0[0][1], other_epoch[0][1])
    second = _batches(loader.stream(1).epoch(0))  # DVERGE's second, independent shuffle
    assert not torch.equal(e0[0][1], second[0][1])
    assert loader.stream_id == 0  # stream() returns a copy
    assert len(BatchLoader(data, 64, True, "none", 0, drop_last=True)) == 3


def test_batchloader_over_subset_without_shuffle():
    data = load_split("digits", "test")
    sub = make_subset("dverge", "digits", "test", 30)
    loader = BatchLoader(data, 8, shuffle=False, augment="none", seed=0, indices=sub.indices)
    xs, ys = zip(*loader.epoch(0))
    x, y = data.get(list(sub.indices))
    assert torch.equal(torch.cat(xs), x) and torch.equal(torch.cat(ys), y)
    with pytest.raises(ConfigError, match="out of range"):
        BatchLoader(data, 8, False, "none", 0, indices=[0, 450])


# ----------------------------------------------------------------------- CIFAR / SVHN on fake files

def _write_cifar(root: Path, kind: str, n_per_file: int) -> dict[str, tuple[np.ndarray, list[int]]]:
    """Files in the torchvision CIFAR layout with random content; returns what each file holds."""
    import torchvision

    cls = torchvision.datasets.CIFAR10 if kind == "cifar10" else torchvision.datasets.CIFAR100
    folder = root / cls.base_folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    key = "labels" if kind == "cifar10" else "fine_labels"
    ncls = 10 if kind == "cifar10" else 100
    content = {}
    for fname, _ in cls.train_list + cls.test_list:
        data = rng.integers(0, 256, (n_per_file, 3072), dtype=np.uint8)
        labels = rng.integers(0, ncls, n_per_file).tolist()
        with open(folder / fname, "wb") as fh:
            pickle.dump({"data": data, key: labels}, fh)
        content[fname] = (data, labels)
    with open(folder / cls.meta["filename"], "wb") as fh:
        pickle.dump({cls.meta["key"]: [f"c{i}" for i in range(ncls)]}, fh)
    return content


def _no_md5(cls):
    # Test-only subclass: the generated files cannot match torchvision's md5 list.
    return type("Local" + cls.__name__, (cls,), {
        "meta": dict(cls.meta, md5=None),
        "train_list": [[n, None] for n, _ in cls.train_list],
        "test_list": [[n, None] for n, _ in cls.test_list],
    })


@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
def test_cifar_loader_on_generated_pickles(tmp_path, monkeypatch, kind):
    import torchvision

    content = _write_cifar(tmp_path, kind, 6)
    base = torchvision.datasets.CIFAR10 if kind == "cifar10" else torchvision.datasets.CIFAR100
    # the real code keeps torchvision's checksums, so the fake files are rejected ...
    with pytest.raises(DataError, match="corrupt"):
        load_split(kind, "test", tmp_path, {"download": False})
    # ... and load with md5 checks off
    monkeypatch.setitem(vision.TV_CLASSES, kind, _no_md5(base))
    clear_cache()
    tr, te = load_split(kind, "train", tmp_path), load_split(kind, "test", tmp_path)
    n_train = 6 * len(base.train_list)  # CIFAR-10: 5 batch files, CIFAR-100: one
    assert tuple(tr.x.shape) == (n_train, 3, 32, 32) and tuple(te.x.shape) == (6, 3, 32, 32)
    assert tr.x.dtype == torch.uint8 and tr.y.dtype == torch.int64
    data, labels = content["test_batch" if kind == "cifar10" else "test"]
    # CIFAR rows are 1024 R, 1024 G, 1024 B values, row-major
    assert torch.equal(te.x, torch.from_numpy(data.reshape(6, 3, 32, 32)))
    assert te.y.tolist() == labels
    x, _ = te.get([2, 0])
    assert x.dtype == torch.float32 and torch.allclose(x[1], te.x[0].float() / 255)
    batch = next(BatchLoader(tr, 4, True, "default", 0).epoch(0))[0]
    assert batch.shape == (4, 3, 32, 32) and float(batch.max()) <= 1.0


def test_svhn_loader_on_generated_mat(tmp_path, monkeypatch):
    import scipy.io
    import torchvision

    folder = tmp_path / "svhn"
    folder.mkdir()
    rng = np.random.default_rng(1)
    X = rng.integers(0, 256, (32, 32, 3, 7), dtype=np.uint8)  # the .mat layout H×W×C×N
    y = np.array([[10], [1], [2], [10], [5], [9], [3]], dtype=np.uint8)  # SVHN labels digit 0 as 10
    scipy.io.savemat(folder / "test_32x32.mat", {"X": X, "y": y})
    split_list = {k: [u, f, None] for k, (u, f, _) in torchvision.datasets.SVHN.split_list.items()}
    monkeypatch.setitem(vision.TV_CLASSES, "svhn",
                        type("LocalSVHN", (torchvision.datasets.SVHN,), {"split_list": split_list}))
    te = load_split("svhn", "test", tmp_path)
    assert tuple(te.x.shape) == (7, 3, 32, 32) and te.x.dtype == torch.uint8
    assert te.y.tolist() == [0, 1, 2, 0, 5, 9, 3]
    assert torch.equal(te.x[4], torch.from_numpy(X[:, :, :, 4]).permute(2, 0, 1))


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "svhn"])
def test_missing_data_is_one_line_data_error(tmp_path, monkeypatch, name):
    calls = []
    monkeypatch.setattr(vision, "network_reachable", lambda url, timeout=3.0: calls.append(url) or False)
    with pytest.raises(DataError) as e:
        load_split(name, "train", tmp_path / "nowhere")  # download allowed, but no network
    msg = str(e.value)
    assert "\n" not in msg and str((tmp_path / "nowhere").resolve()) in msg
    assert "missing" in msg and "download=True" in msg and "unreachable" in msg
    assert len(calls) == 1  # it asked whether the network works instead of trying blindly
    with pytest.raises(DataError, match="downloads are off"):
        load_split(name, "test", tmp_path / "nowhere", {"download": False})
    assert len(calls) == 1


def test_failed_download_is_data_error(tmp_path, monkeypatch):
    import torchvision

    class Offline(torchvision.datasets.CIFAR10):
        def download(self):
            raise OSError("connection reset\nsecond line")

    monkeypatch.setitem(vision.TV_CLASSES, "cifar10", Offline)
    monkeypatch.setattr(vision, "network_reachable", lambda url, timeout=3.0: True)
    with pytest.raises(DataError, match=r"download from https://www\.cs\.toronto\.edu.* failed \(OSError: connection reset\)") as e:
        load_split("cifar10", "test", tmp_path)
    assert "\n" not in str(e.value) and str(tmp_path.resolve()) in str(e.value)


# -------------------------------------------------------------------------------------- ImageNet

def _write_folder(root: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(2)
    for split, n in (("train", 3), ("val", 2)):
        for wnid in ("n02", "n01"):
            d = root / "imagenet" / split / wnid
            d.mkdir(parents=True)
            for k in range(n):
                arr = rng.integers(0, 256, (20 + 3 * k, 26, 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"img{k}.png")


def test_imagenet_folder_loader(tmp_path):
    _write_folder(tmp_path)
    opts = {"crop_size": 12, "resize_size": 14, "num_workers": 0}
    te = load_split("imagenet", "test", tmp_path, opts)
    tr = load_split("imagenet", "train", tmp_path, opts)
    assert isinstance(te, FolderData) and len(te) == 4 and len(tr) == 6
    assert te.classes == ["n01", "n02"] and te.y.tolist() == [0, 0, 1, 1]  # sorted wnids
    x, y = te.get([3, 0])
    assert x.shape == (2, 3, 12, 12) and x.dtype == torch.float32 and 0 <= float(x.min()) <= float(x.max()) <= 1
    assert y.tolist() == [1, 0]
    assert get_info("imagenet", opts).image_size == 12 and get_info("imagenet").image_size == 224
    loader = BatchLoader(tr, 4, shuffle=True, augment="default", seed=0)
    full = _batches(loader.epoch(2))
    assert [len(b[1]) for b in full] == [4, 2] and full[0][0].shape == (4, 3, 12, 12)
    resumed = _batches(loader.epoch(2, start_batch=1))
    assert torch.equal(resumed[0][0], full[1][0]) and torch.equal(resumed[0][1], full[1][1])
    assert not torch.equal(_batches(loader.epoch(3))[0][0], full[0][0])


def test_imagenet_default_eval_transform_is_224(tmp_path):
    _write_folder(tmp_path)
    te = load_split("imagenet", "test", tmp_path / "imagenet", {"num_workers": 0})  # root holding train/ val/
    x, _ = te.get([0])
    assert x.shape == (1, 3, 224, 224)


def test_imagenet_missing_is_data_error(tmp_path):
    with pytest.raises(DataError, match=r"no folder .*imagenet/val.*image-net\.org") as e:
        load_split("imagenet", "test", tmp_path)
    assert "\n" not in str(e.value)


def test_tensordata_rejects_bad_shapes_and_indices():
    with pytest.raises(DataError):
        TensorData(torch.zeros(3, 8, 8), torch.zeros(3, dtype=torch.int64))
    d = TensorData(torch.zeros(3, 1, 2, 2, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64), "t", "test")
    with pytest.raises(DataError, match="allowed: 0..2"):
        d.get([3])
