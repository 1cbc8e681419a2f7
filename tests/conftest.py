"""Shared fixtures: small real ONNX models exported by torch (defined in zoo.py), and a chip
served on a pty."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from zoo import SmallCNN, export, export_mlp


@pytest.fixture(autouse=True, scope="session")
def _private_compile_cache(tmp_path_factory):
    """Tests never read or write the user's compile cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("NVCIM_CACHE", str(tmp_path_factory.mktemp("nvcim-cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def mlp_path(tmp_path_factory) -> Path:
    return export_mlp(tmp_path_factory.mktemp("models") / "mlp.onnx")


@pytest.fixture(scope="session")
def cnn_path(tmp_path_factory) -> str:
    """SmallCNN (3x8x8 inputs, seed 0): conv layers that span several small arrays."""
    import torch

    torch.manual_seed(0)
    return export(SmallCNN().eval(), tmp_path_factory.mktemp("cnn") / "cnn.onnx", (3, 8, 8), dynamo=False)


@pytest.fixture
def batch() -> np.ndarray:
    return np.random.default_rng(7).standard_normal((16, 64)).astype(np.float32)


class Served:
    """A ``python -m nvcim.firmware_emu serve`` process and the address it printed."""

    def __init__(self, *args: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "nvcim.firmware_emu", "serve", *args],
                                     stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().strip()
        if not line.startswith("serving on "):
            self.proc.kill()
            raise RuntimeError(f"emulator did not start: {line!r}")
        self.address = line.removeprefix("serving on ")

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.fixture
def serve():
    started: list[Served] = []

    def start(*args: str) -> Served:
        s = Served(*args)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()
