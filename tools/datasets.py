"""Datasets that need no download, and readers for the user's own files.

* ``digits``: the 1797 real 8x8 handwritten digits shipped with scikit-learn (default);
* ``.npz`` with ``x`` (images, N first) and ``y`` (integer labels);
* MNIST IDX files (``train-images-idx3-ubyte`` etc., optionally ``.gz``) in a folder;
* CIFAR-10 python-pickle batches (``data_batch_1..5``, ``test_batch``) in a folder, read
  by an unpickler that builds nothing but the dicts, lists, bytes and numpy arrays of that
  format: a batch file cannot run code (``pickle.load`` would run any it holds).

Every loader returns images as float32 (N, C, H, W) in [0, 1] (npz: as stored) and
int64 labels. ``load(spec, image_size=...)`` resizes bilinearly, e.g. digits 8x8 -> 28x28
(the MNIST size the seeds' LeNet-3 expects).
"""

from __future__ import annotations

import gzip
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class DatasetError(ValueError):
    """A dataset that cannot be read; the message names the file and what is wrong."""


@dataclass
class Split:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    name: str = ""

    @property
    def num_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max())) + 1

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def validation(self, fraction: float = 0.1, seed: int = 0) -> tuple[Split, Split]:
        """(train minus validation, validation) carved from the training part; test untouched."""
        order = np.random.default_rng(seed).permutation(len(self.x_train))
        n_val = max(1, int(round(len(order) * fraction)))
        val, tr = order[:n_val], order[n_val:]
        return (Split(self.x_train[tr], self.y_train[tr], self.x_test, self.y_test, self.name),
                Split(self.x_train[val], self.y_train[val], self.x_train[val], self.y_train[val], self.name + "/val"))


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int, name: str) -> Split:
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = int(round(len(x) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return Split(x[train], y[train], x[test], y[test], name)


def digits(test_fraction: float = 0.25, seed: int = 0) -> Split:
    """The 1797 real 8x8 handwritten digits shipped with scikit-learn, scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None, :, :]
    return _split(x, d.target.astype(np.int64), test_fraction, seed, "digits")


def from_npz(path: str | Path, test_fraction: float = 0.25, seed: int = 0) -> Split:
    """A user dataset stored as ``x`` (float images, N first) and ``y`` (integer labels).

    Images of shape (N, H, W) get a channel axis; (N, H, W, C) with C in {1, 3} is moved
    to (N, C, H, W).
    """
    try:
        f = np.load(path)
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path}: not a readable .npz file ({e})") from None
    with f:
        missing = {"x", "y"} - set(f.files)
        if missing:
            raise DatasetError(f"{path}: missing array(s) {', '.join(sorted(missing))}; found {', '.join(f.files)}")
        x, y = f["x"].astype(np.float32), f["y"].astype(np.int64).ravel()
    if len(x) != len(y):
        raise DatasetError(f"{path}: x has {len(x)} samples but y has {len(y)}")
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    if x.ndim != 4:
        raise DatasetError(f"{path}: x has shape {x.shape}; expected images (N, H, W) or (N, C, H, W)")
    if y.min() < 0:
        raise DatasetError(f"{path}: labels must be non-negative integers (found {y.min()})")
    return _split(np.ascontiguousarray(x), y, test_fraction, seed, Path(path).name)


def _open_maybe_gz(path: Path) -> bytes:
    raw = path.read_bytes()
    return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (the MNIST format: magic 0x0000 type ndim, big-endian dims, data)."""
    path = Path(path)
    data = _open_maybe_gz(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DatasetError(f"{path}: not an IDX file (bad magic {data[:4].hex()})")
    types = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if data[2] not in types:
        raise DatasetError(f"{path}: unknown IDX element type 0x{data[2]:02X}")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise DatasetError(f"{path}: truncated IDX header")
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", ndim, 4))
    dtype = np.dtype(types[data[2]])
    count = int(np.prod(dims)) if dims else 0
    body = 4 + 4 * ndim
    if len(data) < body + count * dtype.itemsize:
        raise DatasetError(f"{path}: truncated IDX data: header says {dims}, file holds "
                           f"{(len(data) - body) // dtype.itemsize} elements")
    return np.frombuffer(data, dtype, count, body).reshape(dims)


def _find(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (folder / name).is_file():
            return folder / name
    raise DatasetError(f"{folder}: no {stem}[.gz] found (an MNIST folder holds train-images-idx3-ubyte, "
                       f"train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte)")


def mnist(folder: str | Path) -> Split:
    """MNIST (or Fashion-MNIST) from the four IDX files in ``folder``."""
    folder = Path(folder)
    parts = []
    for prefix in ("train", "t10k"):
        x = read_idx(_find(folder, f"{prefix}-images-idx3-ubyte"))
        y = read_idx(_find(folder, f"{prefix}-labels-idx1-ubyte"))
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DatasetError(f"{folder}: {prefix} images {x.shape} and labels {y.shape} do not match")
        parts += [(x.astype(np.float32) / 255.0)[:, None], y.astype(np.int64)]
    return Split(*parts, name="mnist")


# the only globals a CIFAR-10 batch names: a numpy array rebuilt from its bytes (pickle protocol
# 2-4 or 5), numpy scalars (labels written as numpy integers), and bytes written by Python 3 at protocol 2
_CIFAR_GLOBALS = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                  ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
                  ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
                  ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles a CIFAR-10 batch and nothing else: any other global (a function to call,
    a class to build) is refused before it is looked up, so a file cannot run code."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _CIFAR_GLOBALS:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which is not part of a CIFAR-10 batch "
                                         f"(refused: a data file never runs code)")
        return super().find_class(module, name)


def read_cifar_batch(path: Path) -> dict:
    """The dict of one CIFAR-10 python batch, read without running anything the file holds."""
    with open(path, "rb") as f:
        d = _CifarUnpickler(f, encoding="bytes").load()
    if not isinstance(d, dict):
        raise TypeError(f"it holds a {type(d).__name__}, not a dict")
    if not isinstance(d.get(b"data"), np.ndarray) or d[b"data"].dtype.hasobject:
        raise TypeError("its data is not a numeric numpy array")
    return d


def cifar10(folder: str | Path) -> Split:
    """CIFAR-10 from the python-pickle batches (``data_batch_1..5``, ``test_batch``) in ``folder``."""
    folder = Path(folder)

    def batch(name: str) -> tuple[np.ndarray, np.ndarray]:
        path = folder / name
        if not path.is_file():
            raise DatasetError(f"{folder}: no {name} (a CIFAR-10 folder holds data_batch_1..5 and test_batch)")
        try:
            d = read_cifar_batch(path)
            data = np.asarray(d[b"data"], dtype=np.uint8)
            labels = np.asarray(d[b"labels"], dtype=np.int64)
        except (pickle.UnpicklingError, KeyError, EOFError, TypeError, ValueError, AttributeError, IndexError) as e:
            raise DatasetError(f"{path}: not a CIFAR-10 python batch ({type(e).__name__}: {e})") from None
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
            raise DatasetError(f"{path}: data {data.shape} / labels {labels.shape}; expected (N, 3072) and (N,)")
        return data.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0, labels

    names = sorted(p.name for p in folder.glob("data_batch_*"))
    if not names:
        raise DatasetError(f"{folder}: no data_batch_* files (a CIFAR-10 folder holds data_batch_1..5 and test_batch)")
    train = [batch(n) for n in names]
    xt, yt = batch("test_batch")
    return Split(np.concatenate([t[0] for t in train]), np.concatenate([t[1] for t in train]), xt, yt, "cifar10")


def resize(x: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of (N, C, H, W) images to size x size (torch's interpolate, deterministic)."""
    if x.shape[-2:] == (size, size):
        return x
    import torch

    with torch.no_grad():
        out = torch.nn.functional.interpolate(torch.from_numpy(np.ascontiguousarray(x)), size=(size, size),
                                              mode="bilinear", align_corners=False)
    return out.numpy()


def load(spec: str | Path = "digits", image_size: int | None = None, seed: int = 0) -> Split:
    """Load a dataset by name or path: ``digits``, a ``.npz``, an MNIST or a CIFAR-10 folder."""
    spec_s = str(spec)
    if spec_s == "digits":
        data = digits(seed=seed)
    else:
        path = Path(spec_s)
        if path.suffix == ".npz":
            if not path.is_file():
                raise DatasetError(f"{path}: no such file")
            data = from_npz(path, seed=seed)
        elif path.is_dir():
            if any(path.glob("data_batch_*")):
                data = cifar10(path)
            elif any(path.glob("*idx3-ubyte*")) or any(path.glob("*idx3.ubyte*")):
                data = mnist(path)
            else:
                raise DatasetError(f"{path}: neither an MNIST (IDX files) nor a CIFAR-10 (data_batch_*) folder")
        else:
            raise DatasetError(f"dataset {spec_s!r}: expected 'digits', a .npz file, or an MNIST / CIFAR-10 folder")
    if image_size is not None:
        data = Split(resize(data.x_train, image_size), data.y_train, resize(data.x_test, image_size), data.y_test,
                     data.name)
    return data
