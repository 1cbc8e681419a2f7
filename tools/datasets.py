"""Datasets that need no download: scikit-learn's 8x8 digits, or the user's own ``.npz``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Split:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int) -> Split:
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = int(round(len(x) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return Split(x[train], y[train], x[test], y[test])


def digits(test_fraction: float = 0.25, seed: int = 0) -> Split:
    """The 1797 real 8x8 handwritten digits shipped with scikit-learn, scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None, :, :]
    return _split(x, d.target.astype(np.int64), test_fraction, seed)


def from_npz(path: str | Path, test_fraction: float = 0.25, seed: int = 0) -> Split:
    """A user dataset stored as ``x`` (float images, N first) and ``y`` (integer labels)."""
    with np.load(path) as f:
        missing = {"x", "y"} - set(f.files)
        if missing:
            raise ValueError(f"{path}: missing array(s) {', '.join(sorted(missing))}; found {', '.join(f.files)}")
        x, y = f["x"].astype(np.float32), f["y"].astype(np.int64)
    if len(x) != len(y):
        raise ValueError(f"{path}: x has {len(x)} samples but y has {len(y)}")
    return _split(x, y, test_fraction, seed)
