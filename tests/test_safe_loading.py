"""Data files never run code: CIFAR-10 batches are unpickled with only the globals of that
format allowed, checkpoints with ``torch.load(weights_only=True)``.

Each malicious file would, if loaded with ``pickle.load`` / ``torch.load(weights_only=False)``,
create a marker file (checked first, so the test cannot pass because the payload is inert).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from nvcim.tools.datasets import DatasetError, cifar10


class _Payload:
    """Unpickling this creates ``marker``: code run from a data file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


class _ShellPayload(_Payload):
    def __reduce__(self):
        return (__import__("os").system, (f"touch {self.marker}",))


def _batch(x: np.ndarray, labels: list[int], extra=None) -> dict:
    d = {b"batch_label": b"training batch 1 of 5", b"data": x, b"labels": labels,
         b"filenames": [b"img%d.png" % i for i in range(len(labels))]}
    if extra is not None:
        d[b"extra"] = extra
    return d


def _cifar_folder(folder: Path, train: dict, protocol: int = pickle.DEFAULT_PROTOCOL) -> Path:
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    test = _batch(rng.integers(0, 256, (2, 3072), dtype=np.uint8), [0, 1])
    for name, d in (("data_batch_1", train), ("test_batch", test)):
        (folder / name).write_bytes(pickle.dumps(d, protocol=protocol))
    return folder


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_a_cifar_batch_of_any_pickle_protocol_loads(tmp_path, protocol):
    x = np.random.default_rng(1).integers(0, 256, (4, 3072), dtype=np.uint8)
    d = cifar10(_cifar_folder(tmp_path / "c", _batch(x, [3, 1, 4, 1]), protocol))
    assert d.x_train.shape == (4, 3, 32, 32) and list(d.y_train) == [3, 1, 4, 1]
    assert np.array_equal(d.x_train, x.reshape(-1, 3, 32, 32) / np.float32(255))


@pytest.mark.parametrize("payload", [_Payload, _ShellPayload])
def test_a_cifar_batch_that_would_run_code_is_refused_and_runs_nothing(tmp_path, payload):
    marker = tmp_path / "ran"
    x = np.zeros((2, 3072), np.uint8)
    evil = _batch(x, [0, 1], extra=payload(marker))
    pickle.loads(pickle.dumps(evil))  # the payload works when pickle.load is used...
    assert marker.exists()
    marker.unlink()
    folder = _cifar_folder(tmp_path / "c", evil)
    with pytest.raises(DatasetError, match=r"data_batch_1: not a CIFAR-10 python batch .*not part of a CIFAR-10 "
                                           r"batch \(refused: a data file never runs code\)"):
        cifar10(folder)
    assert not marker.exists()  # ...and not when cifar10 reads it


def test_a_cifar_batch_of_python_objects_is_refused(tmp_path):
    folder = _cifar_folder(tmp_path / "c", _batch(np.array([1, "x"], dtype=object), [0, 1]))
    with pytest.raises(DatasetError, match="its data is not a numeric numpy array"):
        cifar10(folder)


def test_a_checkpoint_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    from nvcim.tools.train import load_checkpoint

    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    torch.save({"config": {"arch": "lenet3"}, "state": {}, "payload": _Payload(marker)}, path)
    torch.load(path, weights_only=False)  # the payload works with the old load...
    assert marker.exists()
    marker.unlink()
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_checkpoint(path)
    assert not marker.exists()  # ...and not with load_checkpoint


def test_no_module_loads_user_files_with_plain_pickle_or_full_torch_load():
    """The product never calls pickle.load/loads or torch.load without weights_only=True."""
    root = Path(__file__).resolve().parents[1]
    offenders = []
    for folder in ("tools", "driver", "compiler", "firmware_emu"):
        for path in (root / folder).rglob("*.py"):
            text = path.read_text()
            if "pickle.load(" in text or "pickle.loads(" in text or "weights_only=False" in text:
                offenders.append(str(path.relative_to(root)))
    assert offenders == [], offenders
