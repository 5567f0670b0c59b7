"""The CIFAR-10/100 and SVHN loaders of jemfast.data on small files written in torchvision's real
on-disk formats (cifar-10-batches-py / cifar-100-python pickles, SVHN .mat files).

Only torchvision's md5 check is replaced (by "the file exists"): the real files' checksums
cannot match generated ones. Everything else, torchvision's readers and jemfast's scaling,
splitting and label handling, is the code a user's first real run goes through.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from jemfast.data import load_data, torchvision_arrays
from jemfast.eval.ood import _load_dataset
from jemfast.options.config import DataConfig
from jemfast.process.errors import UserError

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def files_exist_is_integrity(monkeypatch):
    """torchvision's check_integrity(path, md5) -> "the file exists"."""
    def exists(fpath, md5=None):
        return os.path.isfile(fpath)

    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", exists)
    monkeypatch.setattr(torchvision.datasets.svhn, "check_integrity", exists)


def make_images(n: int, rng: np.random.Generator, first_id: int) -> np.ndarray:
    """``[n, 3, 32, 32]`` uint8 with the image's id in the red channel's top-left pixel."""
    x = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    x[:, 0, 0, 0] = np.arange(first_id, first_id + n)
    x[0, 1, 5, 7], x[-1, 2, 31, 0] = 0, 255  # both ends of the range occur
    return x


def _dump(obj: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def write_cifar(root: Path, name: str, n_train: int, n_test: int, seed: int = 0):
    """Write a CIFAR-10 (5 train batches) or CIFAR-100 (one train file) tree; returns
    ``(x_train, y_train, x_test, y_test)`` as written, images ``[N, 3, 32, 32]`` uint8."""
    rng = np.random.default_rng(seed)
    n_classes = 10 if name == "cifar10" else 100
    x_tr, x_te = make_images(n_train, rng, 0), make_images(n_test, rng, n_train)
    y_tr, y_te = rng.integers(0, n_classes, n_train), rng.integers(0, n_classes, n_test)
    rows = lambda x: x.reshape(len(x), 3072)  # noqa: E731  (R plane, G plane, B plane; row-major)
    if name == "cifar10":
        base = root / "cifar-10-batches-py"
        for k, part in enumerate(np.array_split(np.arange(n_train), 5), start=1):
            _dump({"data": rows(x_tr[part]), "labels": y_tr[part].tolist()}, base / f"data_batch_{k}")
        _dump({"data": rows(x_te), "labels": y_te.tolist()}, base / "test_batch")
        _dump({"label_names": [f"c{i}" for i in range(10)]}, base / "batches.meta")
    else:
        base = root / "cifar-100-python"
        for split, x, y in (("train", x_tr, y_tr), ("test", x_te, y_te)):
            # coarse labels differ from fine ones: the loader must read fine_labels
            _dump({"data": rows(x), "fine_labels": y.tolist(), "coarse_labels": (y // 5).tolist()}, base / split)
        _dump({"fine_label_names": [f"f{i}" for i in range(100)],
               "coarse_label_names": [f"c{i}" for i in range(20)]}, base / "meta")
    return x_tr, y_tr, x_te, y_te


def write_svhn(root: Path, n_train: int, n_test: int, seed: int = 0):
    """Write train_32x32.mat / test_32x32.mat (X: [32, 32, 3, N] uint8, y: [N, 1] with 10 for
    the digit 0); returns ``(x_train, digits_train, x_test, digits_test)`` with x ``[N, 3, 32, 32]``."""
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    out = []
    for split, n, first in (("train", n_train, 0), ("test", n_test, n_train)):
        x = make_images(n, rng, first)
        digit = np.arange(n) % 10  # every digit, 0 included
        mat_y = np.where(digit == 0, 10, digit).reshape(n, 1).astype(np.uint8)
        savemat(root / f"{split}_32x32.mat", {"X": x.transpose(2, 3, 1, 0), "y": mat_y})
        out += [x, digit]
    return tuple(out)


def scaled(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x.astype(np.float32) / 255.0 * 2.0 - 1.0)


def check_bundle(data, name, n_classes, x_tr, y_tr, x_te, y_te, n_valid, flip):
    assert data.name == name and data.n_classes == n_classes and data.input_shape == (3, 32, 32)
    assert (len(data.train), len(data.valid), len(data.test)) == (len(y_tr) - n_valid, n_valid, len(y_te))
    for split in (data.train, data.valid, data.test):
        assert split.x.dtype == torch.float32 and split.y.dtype == torch.int64
        assert split.x.shape[1:] == (3, 32, 32) and split.x.min() >= -1.0 and split.x.max() <= 1.0
    # the test split keeps the file's order: pixels scaled exactly, labels as written
    assert torch.equal(data.test.x, scaled(x_te)) and data.test.y.tolist() == list(y_te)
    assert data.test.x.min() == -1.0 and data.test.x.max() == 1.0
    # train and valid split the train files' images (found by the id pixel) without overlap
    ids = torch.cat([data.train.x, data.valid.x])[:, 0, 0, 0].add(1).mul(127.5).round().long()
    assert sorted(ids.tolist()) == list(range(len(y_tr)))
    for split in (data.train, data.valid):
        idx = split.x[:, 0, 0, 0].add(1).mul(127.5).round().long().numpy()
        assert torch.equal(split.x, scaled(x_tr[idx])) and split.y.tolist() == list(y_tr[idx])
    assert data.augment_crop and data.augment_flip == flip


def test_cifar10_from_its_pickled_batches(tmp_path):
    x_tr, y_tr, x_te, y_te = write_cifar(tmp_path, "cifar10", n_train=40, n_test=12)
    data = load_data(DataConfig(dataset="cifar10", data_dir=str(tmp_path), n_valid=6), CPU)
    check_bundle(data, "cifar10", 10, x_tr, y_tr, x_te, y_te, n_valid=6, flip=True)
    again = load_data(DataConfig(dataset="cifar10", data_dir=str(tmp_path), n_valid=6), CPU)
    assert torch.equal(again.valid.x, data.valid.x)  # the split is fixed, not drawn per run


def test_cifar100_reads_fine_labels(tmp_path):
    x_tr, y_tr, x_te, y_te = write_cifar(tmp_path, "cifar100", n_train=30, n_test=8, seed=1)
    data = load_data(DataConfig(dataset="cifar100", data_dir=str(tmp_path), n_valid=5), CPU)
    check_bundle(data, "cifar100", 100, x_tr, y_tr, x_te, y_te, n_valid=5, flip=True)


def test_svhn_from_mat_files_maps_label_10_to_0(tmp_path):
    x_tr, d_tr, x_te, d_te = write_svhn(tmp_path, n_train=25, n_test=11)
    data = load_data(DataConfig(dataset="svhn", data_dir=str(tmp_path), n_valid=4), CPU)
    check_bundle(data, "svhn", 10, x_tr, d_tr, x_te, d_te, n_valid=4, flip=False)  # no flips of digits
    assert 0 in data.test.y.tolist() and 10 not in torch.cat([data.train.y, data.test.y]).tolist()


def test_ood_sets_load_the_test_split(tmp_path):
    _, _, x_te, _ = write_svhn(tmp_path, n_train=3, n_test=7)
    _, _, c_te, _ = write_cifar(tmp_path, "cifar10", n_train=10, n_test=5)
    assert torch.equal(_load_dataset("svhn", str(tmp_path)), scaled(x_te))
    assert torch.equal(_load_dataset("cifar10", str(tmp_path)), scaled(c_te))


def test_a_corrupt_file_is_one_line_and_no_download(tmp_path, monkeypatch):
    write_cifar(tmp_path, "cifar10", n_train=10, n_test=5)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"\x80\x04truncated")

    def no_network(*a, **k):
        raise AssertionError("tried to download")

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", no_network)
    with pytest.raises(UserError) as info:
        torchvision_arrays("cifar10", str(tmp_path), train=True)
    assert "\n" not in str(info.value) and "cifar10" in str(info.value)
