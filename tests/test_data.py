"""Tests for gradguard.experiments.data: digits, splits, canaries, torchvision on-disk formats.

The MNIST / Fashion-MNIST / CIFAR-10 tests write small fake copies in torchvision's exact
layout (idx-ubyte headers with magic 2051 / 2049, CIFAR python pickles) and check that
what comes back is exactly those pixels and labels, in the split's order.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.datasets import load_digits
from torchvision.datasets import CIFAR10

from gradguard.experiments.data import (
    DATASET_NAMES,
    MembershipSplit,
    load_dataset,
    load_digits_tensors,
    make_split,
)

# ------------------------------------------------------------------------- digits


def test_digits_tensors_match_scikit_learn():
    x, y = load_digits_tensors()
    reference = load_digits()
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32
    assert y.shape == (1797,) and y.dtype == torch.long
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    np.testing.assert_allclose(x[:, 0].numpy() * 16.0, reference.images, atol=1e-5)
    np.testing.assert_array_equal(y.numpy(), reference.target)


def _assert_partition(split: MembershipSplit, n_pool: int, *, test_from_pool: bool) -> None:
    parts = [split.train_indices, split.holdout_indices]
    if test_from_pool:
        parts.append(split.test_indices)
    rows = torch.cat(parts)
    rows = rows[rows >= 0]
    assert rows.unique().numel() == rows.numel(), "a pool row appears twice"
    assert int(rows.min()) >= 0 and int(rows.max()) < n_pool


def test_default_digits_split_is_a_40_30_30_partition():
    x, y = load_digits_tensors()
    split = load_dataset("digits")
    n = x.shape[0]
    sizes = len(split.train), len(split.holdout), len(split.test)
    assert sum(sizes) == n
    for size, share in zip(sizes, (0.4, 0.3, 0.3), strict=True):
        assert abs(size - share * n) <= 1
    _assert_partition(split, n, test_from_pool=True)
    assert set(torch.cat([split.train_indices, split.holdout_indices,
                          split.test_indices]).tolist()) == set(range(n))
    for dataset, rows in ((split.train, split.train_indices),
                          (split.holdout, split.holdout_indices),
                          (split.test, split.test_indices)):
        xs, ys = dataset.tensors
        assert torch.equal(xs, x[rows]) and torch.equal(ys, y[rows])
        assert xs.dtype == torch.float32 and ys.dtype == torch.long
    assert split.input_shape == (1, 8, 8) and split.num_classes == 10
    assert split.canary_kind is None and split.num_canaries == 0
    assert not split.train_canary_mask.any() and not split.holdout_canary_mask.any()


def test_split_is_deterministic_by_seed_and_leaves_global_rng_alone():
    x, y = load_digits_tensors()
    state = torch.get_rng_state()
    a = make_split(x, y, seed=5, canaries=6)
    b = make_split(x, y, seed=5, canaries=6)
    c = make_split(x, y, seed=6, canaries=6)
    assert torch.equal(torch.get_rng_state(), state)
    for field in ("train_indices", "holdout_indices", "test_indices", "train_canary_mask",
                  "holdout_canary_mask"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    assert torch.equal(a.train.tensors[1], b.train.tensors[1])
    assert not torch.equal(a.train_indices, c.train_indices)


def test_sizes_left_open_share_the_free_rows():
    x, y = load_digits_tensors()
    split = make_split(x, y, n_train=100)
    assert len(split.train) == 100
    assert len(split.holdout) + len(split.test) == 1797 - 100
    assert abs(len(split.holdout) - len(split.test)) <= 1
    fixed = make_split(x, y, n_train=50, n_holdout=40, n_test=30, seed=2)
    assert (len(fixed.train), len(fixed.holdout), len(fixed.test)) == (50, 40, 30)
    _assert_partition(fixed, 1797, test_from_pool=True)
    capped = load_dataset("digits", max_examples=200, seed=3)
    assert len(capped.train) + len(capped.holdout) + len(capped.test) == 200
    _assert_partition(capped, 1797, test_from_pool=True)


def test_canaries_do_not_change_the_partition():
    x, y = load_digits_tensors()
    plain = make_split(x, y, seed=4)
    for kind in ("mislabel", "ood"):
        planted = make_split(x, y, seed=4, canaries=9, canary_kind=kind)
        for rows_plain, rows_planted, mask in (
            (plain.train_indices, planted.train_indices, planted.train_canary_mask),
            (plain.holdout_indices, planted.holdout_indices, planted.holdout_canary_mask),
        ):
            assert torch.equal(rows_plain[~mask], rows_planted[~mask])
        assert torch.equal(plain.test_indices, planted.test_indices)


def test_mislabel_canaries_keep_the_image_and_change_the_label():
    x, y = load_digits_tensors()
    x_before, y_before = x.clone(), y.clone()
    split = make_split(x, y, seed=0, canaries=21, canary_kind="mislabel")
    assert torch.equal(x, x_before) and torch.equal(y, y_before), "caller's data was edited"
    assert int(split.train_canary_mask.sum()) == 11
    assert int(split.holdout_canary_mask.sum()) == 10
    assert split.canary_kind == "mislabel" and split.num_canaries == 21
    for dataset, rows, mask in ((split.train, split.train_indices, split.train_canary_mask),
                                (split.holdout, split.holdout_indices,
                                 split.holdout_canary_mask)):
        xs, ys = dataset.tensors
        assert mask.dtype == torch.bool and mask.shape == (len(dataset),)
        assert (rows >= 0).all()
        assert torch.equal(xs, x[rows])
        assert (ys[mask] != y[rows][mask]).all()
        assert torch.equal(ys[~mask], y[rows][~mask])
        assert int(ys.min()) >= 0 and int(ys.max()) < 10


def test_mislabel_canary_labels_are_uniform_over_the_other_classes():
    x = torch.rand(4000, 3)
    y = torch.zeros(4000, dtype=torch.long)
    split = make_split(x, y, n_train=2000, n_holdout=2000, n_test=0, num_classes=5,
                       canaries=4000, seed=11)
    labels = torch.cat([split.train.tensors[1], split.holdout.tensors[1]])
    counts = torch.bincount(labels, minlength=5)
    assert int(counts[0]) == 0
    assert stats.chisquare(counts[1:].numpy()).pvalue > 1e-3


def test_ood_canaries_are_noise_outside_the_pool():
    x, y = load_digits_tensors()
    split = make_split(x, y, seed=1, canaries=8, canary_kind="ood")
    pool_flat = x.reshape(x.shape[0], -1)
    for dataset, rows, mask in ((split.train, split.train_indices, split.train_canary_mask),
                                (split.holdout, split.holdout_indices,
                                 split.holdout_canary_mask)):
        xs, ys = dataset.tensors
        assert int(mask.sum()) == 4
        assert torch.equal(rows == -1, mask)
        assert torch.equal(xs[~mask], x[rows[~mask]])
        assert torch.equal(ys[~mask], y[rows[~mask]])
        canaries = xs[mask].reshape(4, -1)
        assert float(canaries.min()) >= 0.0 and float(canaries.max()) <= 1.0
        # Continuous noise: no canary equals any digit, and it is far from all of them.
        assert torch.cdist(canaries, pool_flat).min() > 1.0
        assert int(ys.min()) >= 0 and int(ys.max()) < 10


def test_uint8_pool_and_separate_test_set():
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (50, 1, 4, 4), dtype=torch.uint8, generator=gen)
    y = torch.randint(0, 3, (50,), generator=gen)
    x_test = torch.randint(0, 256, (20, 1, 4, 4), dtype=torch.uint8, generator=gen)
    y_test = torch.randint(0, 3, (20,), generator=gen)
    split = make_split(x, y, test_data=(x_test, y_test), seed=0, canaries=4,
                       canary_kind="ood")
    assert (len(split.train), len(split.holdout), len(split.test)) == (25, 25, 20)
    _assert_partition(split, 50, test_from_pool=False)
    xs, _ = split.train.tensors
    keep = ~split.train_canary_mask
    assert xs.dtype == torch.float32
    torch.testing.assert_close(xs[keep], x[split.train_indices[keep]].float() / 255)
    torch.testing.assert_close(split.test.tensors[0], x_test[split.test_indices].float() / 255)
    assert float(xs.max()) <= 1.0
    assert split.num_classes == 3


def test_summary_is_counts_only_and_json_serialisable():
    split = load_dataset("digits", canaries=4, canary_kind="ood")
    summary = split.summary()
    json.dumps(summary)
    assert summary["train_canaries"] == 2 and summary["holdout_canaries"] == 2
    assert summary["n_train"] == len(split.train)


def test_bad_split_arguments_raise_clear_errors():
    x, y = load_digits_tensors()
    with pytest.raises(ValueError, match="need 2000 rows"):
        make_split(x, y, n_train=1000, n_holdout=1000)
    with pytest.raises(ValueError, match="at least one member and one holdout"):
        make_split(x, y, n_train=10, n_holdout=0)
    with pytest.raises(ValueError, match="fewer canaries"):
        make_split(x, y, n_train=5, n_holdout=5, canaries=12)
    with pytest.raises(ValueError, match="canary_kind"):
        make_split(x, y, canaries=2, canary_kind="backdoor")
    with pytest.raises(TypeError, match="integer tensor of class labels"):
        make_split(x, y.float())
    with pytest.raises(TypeError, match="floating point"):
        make_split(x.long(), y)
    with pytest.raises(ValueError, match="must match"):
        make_split(x, y[:-1])
    with pytest.raises(ValueError, match="num_classes"):
        make_split(x, y, num_classes=5)
    with pytest.raises(ValueError, match=">= 0"):
        make_split(x, y - 1)
    with pytest.raises(ValueError, match="same kind of input"):
        make_split(x, y, test_data=(torch.rand(3, 1, 4, 4), torch.zeros(3, dtype=torch.long)))
    with pytest.raises(TypeError, match="seed"):
        make_split(x, y, seed=1.0)


def test_unknown_dataset_names_the_valid_ones():
    with pytest.raises(ValueError) as info:
        load_dataset("imagenet")
    for name in DATASET_NAMES:
        assert name in str(info.value)
    # Case, '-' and '_' are ignored: this resolves to fashionmnist, which needs files.
    with pytest.raises(ValueError, match="--data-dir"):
        load_dataset("Fashion-MNIST")


@pytest.mark.parametrize("name", ["mnist", "fashionmnist", "cifar10"])
def test_file_datasets_require_data_dir(name, tmp_path):
    with pytest.raises(ValueError, match="--data-dir"):
        load_dataset(name)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_dataset(name, data_dir=tmp_path / "nowhere")


# ------------------------------------------------------------------ fake MNIST files


def _write_idx_images(path: Path, images: np.ndarray) -> None:
    n, h, w = images.shape
    path.write_bytes(struct.pack(">IIII", 2051, n, h, w) + images.astype(np.uint8).tobytes())


def _write_idx_labels(path: Path, labels: np.ndarray) -> None:
    path.write_bytes(struct.pack(">II", 2049, labels.shape[0]) + labels.astype(np.uint8).tobytes())


def _fake_mnist(root: Path, folder: str, *, n_train: int = 40, n_test: int = 12,
                gzipped: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    arrays = {
        "train_x": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_y": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test_x": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_y": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    files = {"train-images-idx3-ubyte": ("train_x", _write_idx_images),
             "train-labels-idx1-ubyte": ("train_y", _write_idx_labels),
             "t10k-images-idx3-ubyte": ("test_x", _write_idx_images),
             "t10k-labels-idx1-ubyte": ("test_y", _write_idx_labels)}
    for filename, (key, writer) in files.items():
        writer(raw / filename, arrays[key])
        if gzipped:
            path = raw / filename
            (raw / (filename + ".gz")).write_bytes(gzip.compress(path.read_bytes()))
            path.unlink()
    return arrays


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashionmnist", "FashionMNIST")])
def test_mnist_like_files_load_into_an_exact_split(name, folder, tmp_path):
    arrays = _fake_mnist(tmp_path, folder)
    split = load_dataset(name, data_dir=str(tmp_path), seed=3, canaries=4)
    assert split.name == name and split.input_shape == (1, 28, 28)
    assert split.num_classes == 10
    assert (len(split.train), len(split.holdout), len(split.test)) == (20, 20, 12)
    _assert_partition(split, 40, test_from_pool=False)
    pool_x = torch.from_numpy(arrays["train_x"]).float().div(255).unsqueeze(1)
    pool_y = torch.from_numpy(arrays["train_y"]).long()
    for dataset, rows, mask in ((split.train, split.train_indices, split.train_canary_mask),
                                (split.holdout, split.holdout_indices,
                                 split.holdout_canary_mask)):
        xs, ys = dataset.tensors
        assert xs.dtype == torch.float32 and 0.0 <= float(xs.min()) <= float(xs.max()) <= 1.0
        torch.testing.assert_close(xs, pool_x[rows])
        assert torch.equal(ys[~mask], pool_y[rows][~mask])
        assert (ys[mask] != pool_y[rows][mask]).all() and int(mask.sum()) == 2
    test_x = torch.from_numpy(arrays["test_x"]).float().div(255).unsqueeze(1)
    torch.testing.assert_close(split.test.tensors[0], test_x[split.test_indices])
    assert torch.equal(split.test.tensors[1],
                       torch.from_numpy(arrays["test_y"]).long()[split.test_indices])
    assert sorted(split.test_indices.tolist()) == list(range(12))

    again = load_dataset(name, data_dir=tmp_path, seed=3, canaries=4)
    assert torch.equal(again.train_indices, split.train_indices)
    small = load_dataset(name, data_dir=tmp_path, seed=3, max_examples=10)
    assert (len(small.train), len(small.holdout), len(small.test)) == (5, 5, 10)


def test_mnist_missing_files_say_where_torchvision_looks(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("mnist", data_dir=tmp_path)
    message = str(info.value)
    assert str(tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte") in message
    assert "never downloads" in message


def test_mnist_gzipped_files_ask_for_gunzip(tmp_path):
    _fake_mnist(tmp_path, "MNIST", gzipped=True)
    with pytest.raises(FileNotFoundError, match="gunzip"):
        load_dataset("mnist", data_dir=tmp_path)


def test_mnist_corrupt_file_is_a_value_error(tmp_path):
    _fake_mnist(tmp_path, "MNIST")
    # An images file carrying the labels magic (1-D) is rejected by torchvision's reader.
    _write_idx_labels(tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte",
                      np.zeros(40, dtype=np.uint8))
    with pytest.raises(ValueError, match="idx-ubyte"):
        load_dataset("mnist", data_dir=tmp_path)


# ---------------------------------------------------------------- fake CIFAR-10 files


def _fake_cifar10(root: Path, *, per_batch: int = 6, n_test: int = 8) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train_rows, train_labels = [], []
    for i in range(1, 6):
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch).tolist()
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump({"batch_label": f"training batch {i} of 5", "labels": labels,
                         "data": data, "filenames": [f"{i}_{j}.png" for j in range(per_batch)]},
                        f)
        train_rows.append(data)
        train_labels += labels
    test_data = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    test_labels = rng.integers(0, 10, n_test).tolist()
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"batch_label": "testing batch 1 of 1", "labels": test_labels,
                     "data": test_data}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog",
                                     "frog", "horse", "ship", "truck"],
                     "num_cases_per_batch": per_batch, "num_vis": 3072}, f)
    return {"train_x": np.concatenate(train_rows), "train_y": np.array(train_labels),
            "test_x": test_data, "test_y": np.array(test_labels)}


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _check_cifar_split(split: MembershipSplit, arrays: dict[str, np.ndarray]) -> None:
    # CIFAR rows are 1024 red, then 1024 green, then 1024 blue values of a 32x32 image.
    pool_x = torch.from_numpy(arrays["train_x"].reshape(-1, 3, 32, 32)).float() / 255
    pool_y = torch.from_numpy(arrays["train_y"]).long()
    assert split.input_shape == (3, 32, 32) and split.num_classes == 10
    assert (len(split.train), len(split.holdout), len(split.test)) == (15, 15, 8)
    _assert_partition(split, 30, test_from_pool=False)
    for dataset, rows in ((split.train, split.train_indices),
                          (split.holdout, split.holdout_indices)):
        torch.testing.assert_close(dataset.tensors[0], pool_x[rows])
        assert torch.equal(dataset.tensors[1], pool_y[rows])
    test_x = torch.from_numpy(arrays["test_x"].reshape(-1, 3, 32, 32)).float() / 255
    torch.testing.assert_close(split.test.tensors[0], test_x[split.test_indices])
    assert torch.equal(split.test.tensors[1],
                       torch.from_numpy(arrays["test_y"]).long()[split.test_indices])


def test_cifar10_fake_files_fail_torchvision_md5_check_with_a_clear_error(tmp_path):
    _fake_cifar10(tmp_path)
    with pytest.raises(ValueError) as info:
        load_dataset("cifar10", data_dir=tmp_path)
    message = str(info.value)
    assert "MD5" in message and "verify_checksums=False" in message
    assert "data_batch_1" in message and "batches.meta" in message


def test_cifar10_loads_through_torchvision_checksum_verification(tmp_path, monkeypatch):
    # Fake files cannot match the official MD5s, so point torchvision's expected
    # checksums at the fakes: the loading path, verification included, is the real one.
    arrays = _fake_cifar10(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    monkeypatch.setattr(CIFAR10, "train_list",
                        [[name, _md5(folder / name)] for name, _ in CIFAR10.train_list])
    monkeypatch.setattr(CIFAR10, "test_list",
                        [[name, _md5(folder / name)] for name, _ in CIFAR10.test_list])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": _md5(folder / "batches.meta")})
    _check_cifar_split(load_dataset("cifar10", data_dir=tmp_path, seed=2), arrays)

    # One edited byte now fails verification, and the error names that file.
    path = folder / "data_batch_3"
    path.write_bytes(path.read_bytes()[:-1] + b"\x00")
    with pytest.raises(ValueError, match="data_batch_3"):
        load_dataset("cifar10", data_dir=tmp_path, seed=2)


def test_cifar10_without_checksum_verification(tmp_path):
    arrays = _fake_cifar10(tmp_path)
    split = load_dataset("cifar10", data_dir=tmp_path, seed=2, verify_checksums=False)
    _check_cifar_split(split, arrays)
    # The official checksums are untouched for everyone else.
    assert CIFAR10.train_list[0][1] == "c99cafc152244af753f735de768cd75f"


def test_cifar10_missing_or_unextracted_files(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("cifar10", data_dir=tmp_path)
    assert str(tmp_path / "cifar-10-batches-py" / "data_batch_1") in str(info.value)
    assert "never downloads" in str(info.value)
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"not really an archive")
    with pytest.raises(FileNotFoundError, match="tar -xzf"):
        load_dataset("cifar10", data_dir=tmp_path)
