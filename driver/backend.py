"""An ``onnx.backend`` backend, so onnx's own backend test runner can drive the chip.

    from nvcim.driver import backend as chip_backend
    outputs = chip_backend.run_model(model, [x])

``prepare`` compiles the model and programs a chip (``nvcim_device=URL``, default
$NVCIM_DEVICE, else an ideal in-process chip, sigma = 0, so results are deterministic);
the returned rep runs inputs given in graph-input order.
"""

from __future__ import annotations

from collections import namedtuple
from typing import Any

import numpy as np
import onnx
from onnx.backend.base import Backend, BackendRep

from .default_device import resolve_device
from .session import Session, load

IDEAL_CHIP = "emu://?sigma=0"


class ChipRep(BackendRep):
    def __init__(self, session: Session):
        self.session = session

    def run(self, inputs: Any, **kwargs: Any) -> tuple[np.ndarray, ...]:
        if isinstance(inputs, dict):
            feed = dict(inputs)
        else:
            names = [arg.name for arg in self.session.get_inputs()]
            values = [inputs] if isinstance(inputs, np.ndarray) else list(inputs)
            if len(values) != len(names):
                raise ValueError(f"model takes {len(names)} inputs, got {len(values)}")
            feed = dict(zip(names, values))
        names = [o.name for o in self.session.get_outputs()]
        outputs = self.session.run(None, feed)
        return namedtuple("Outputs", names, rename=True)(*outputs)


class ChipBackend(Backend):
    @classmethod
    def prepare(cls, model: onnx.ModelProto, device: str = "CPU", **kwargs: Any) -> ChipRep:
        super().prepare(model, device, **kwargs)
        url = resolve_device(kwargs.get("nvcim_device"), default=IDEAL_CHIP)
        return ChipRep(load(model, device=url, cache=False))

    @classmethod
    def supports_device(cls, device: str) -> bool:
        """The runner's "CPU" is the host-attached chip; there is no CUDA here."""
        return device == "CPU"


prepare = ChipBackend.prepare
run_model = ChipBackend.run_model
supports_device = ChipBackend.supports_device
