"""Dataset readers: scikit-learn digits, .npz, MNIST IDX and CIFAR-10 pickles (small files made here)."""

from __future__ import annotations

import gzip
import pickle

import numpy as np
import pytest

from nvcim.tools import datasets
from nvcim.tools.datasets import DatasetError


def _idx(array: np.ndarray, type_code: int = 0x08) -> bytes:
    header = bytes([0, 0, type_code, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    return header + array.astype(">u1" if type_code == 0x08 else ">f4").tobytes()


def test_digits_upsampled_to_28():
    d = datasets.load("digits", image_size=28)
    assert d.x_train.shape[1:] == (1, 28, 28) and d.x_train.dtype == np.float32
    assert len(d.x_train) + len(d.x_test) == 1797 and len(d.x_test) == 449
    assert 0 <= d.x_train.min() and d.x_train.max() <= 1.0 + 1e-6
    assert d.num_classes == 10
    again = datasets.load("digits", image_size=28)
    assert np.array_equal(d.x_test, again.x_test)  # deterministic split and resize


def test_npz_with_and_without_channel_axis(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.random((40, 6, 6)).astype(np.float32), rng.integers(0, 3, 40)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    d = datasets.load(tmp_path / "d.npz")
    assert d.x_train.shape[1:] == (1, 6, 6) and len(d.x_train) + len(d.x_test) == 40
    np.savez(tmp_path / "hwc.npz", x=rng.random((20, 8, 8, 3)), y=np.arange(20) % 2)
    assert datasets.load(tmp_path / "hwc.npz", image_size=16).x_test.shape[1:] == (3, 16, 16)


@pytest.mark.parametrize("content, message", [
    (dict(x=np.zeros((4, 2, 2))), "missing array"),
    (dict(x=np.zeros((4, 2, 2)), y=np.zeros(3)), "4 samples but y has 3"),
])
def test_bad_npz_is_a_clear_error(tmp_path, content, message):
    np.savez(tmp_path / "bad.npz", **content)
    with pytest.raises(DatasetError, match=message):
        datasets.load(tmp_path / "bad.npz")


def test_mnist_idx_files_plain_and_gzip(tmp_path):
    rng = np.random.default_rng(1)
    images = {p: rng.integers(0, 256, (n, 28, 28)) for p, n in (("train", 12), ("t10k", 5))}
    labels = {p: rng.integers(0, 10, len(v)) for p, v in images.items()}
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx(images["train"]))
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx(labels["train"])))
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(images["t10k"])))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx(labels["t10k"]))
    d = datasets.load(tmp_path)
    assert d.name == "mnist" and d.x_train.shape == (12, 1, 28, 28) and d.x_test.shape == (5, 1, 28, 28)
    np.testing.assert_allclose(d.x_train[:, 0] * 255, images["train"], atol=1e-4)
    assert np.array_equal(d.y_test, labels["t10k"])


def test_truncated_idx_is_a_clear_error(tmp_path):
    data = _idx(np.zeros((10, 4, 4)))
    (tmp_path / "x-idx3-ubyte").write_bytes(data[:-5])
    with pytest.raises(DatasetError, match="truncated IDX data"):
        datasets.read_idx(tmp_path / "x-idx3-ubyte")
    (tmp_path / "y").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(DatasetError, match="not an IDX file"):
        datasets.read_idx(tmp_path / "y")


def test_cifar10_python_batches(tmp_path):
    rng = np.random.default_rng(2)
    rows = {}
    for name, n in (("data_batch_1", 6), ("data_batch_2", 4), ("test_batch", 3)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        rows[name] = (data, list(rng.integers(0, 10, n)))
        with open(tmp_path / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": rows[name][1]}, f)
    d = datasets.load(tmp_path)
    assert d.name == "cifar10" and d.x_train.shape == (10, 3, 32, 32) and d.x_test.shape == (3, 3, 32, 32)
    np.testing.assert_allclose(d.x_test[0] * 255, rows["test_batch"][0][0].reshape(3, 32, 32), atol=1e-4)
    assert list(d.y_train[:6]) == rows["data_batch_1"][1]


def test_unknown_dataset_names_what_is_accepted(tmp_path):
    with pytest.raises(DatasetError, match="expected 'digits'"):
        datasets.load("imagenet")
    with pytest.raises(DatasetError, match="neither an MNIST"):
        datasets.load(tmp_path)
