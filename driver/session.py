"""``driver.load(onnx_path)``: an onnxruntime-shaped session backed by the chip.

A host application written against ``onnxruntime.InferenceSession(path)`` runs unchanged
against ``driver.load(path)``: same ``run(output_names, input_feed)``, same
``get_inputs()`` / ``get_outputs()`` descriptions, same errors for wrong names and shapes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import onnx

from compiler import lower_model, place
from firmware_emu.program_format import Program

from .device import Device, WriteStats
from .errors import InvalidArgument

_ONNX_TYPES = {onnx.TensorProto.FLOAT: ("tensor(float)", np.float32)}


@dataclass(frozen=True)
class NodeArg:
    """Name, shape and type of a model input or output, as onnxruntime describes them."""

    name: str
    shape: list
    type: str


@dataclass(frozen=True)
class ModelMetadata:
    producer_name: str
    graph_name: str
    domain: str
    description: str
    version: int
    custom_metadata_map: dict


def _node_args(values) -> list[NodeArg]:
    out = []
    for v in values:
        tt = v.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
        out.append(NodeArg(v.name, shape, _ONNX_TYPES.get(tt.elem_type, (f"tensor({tt.elem_type})",))[0]))
    return out


def deploy(device: Device, program: Program, *, verify: bool = False,
           layers: set[str] | None = None) -> WriteStats:
    """Upload the code and program the cells of ``layers`` (default: every layer).

    Each tile region is erased first; then only the cells of weights on the tile's side
    (level > 0, matching sign) are pulsed. The other cells stay erased, as DESIGN.md asks.
    Cells of layers not named are not touched, so a host can reflash only new layers.
    """
    if layers is not None:
        unknown = layers - {layer.name for layer in program.layers}
        if unknown:
            raise InvalidArgument(f"program has no layer(s) {', '.join(sorted(unknown))}")
    device.load_code(program)
    total = WriteStats()
    s = program.slices
    for layer in program.layers:
        if layers is not None and layer.name not in layers:
            continue
        for tile in layer.tiles:
            targets = program.tile_cells(tile)
            used = targets.reshape(tile.in_count, tile.out_count, s).any(axis=2)
            mask = np.repeat(used, s, axis=1)
            device.erase(tile.array, tile.row, tile.col, tile.in_count, tile.out_count * s)
            total += device.write_cells(tile.array, tile.row, tile.col, targets, verify=verify, mask=mask)
    return total


class Session:
    """An inference session on a chip holding one compiled model."""

    def __init__(self, model: onnx.ModelProto, program: Program, device: Device, write_stats: WriteStats):
        self._model = model
        self.program = program
        self.device = device
        self.write_stats = write_stats
        self._inputs = _node_args(v for v in model.graph.input
                                  if v.name not in {i.name for i in model.graph.initializer})
        self._outputs = _node_args(model.graph.output)

    # onnxruntime-compatible surface ---------------------------------------------------
    def get_inputs(self) -> list[NodeArg]:
        return list(self._inputs)

    def get_outputs(self) -> list[NodeArg]:
        return list(self._outputs)

    def get_modelmeta(self) -> ModelMetadata:
        m = self._model
        return ModelMetadata(m.producer_name, m.graph.name, m.domain, m.doc_string, m.model_version,
                             {p.key: p.value for p in m.metadata_props})

    def run(self, output_names: list[str] | None, input_feed: dict[str, np.ndarray], run_options=None) -> list[np.ndarray]:
        known_out = [o.name for o in self._outputs]
        wanted = known_out if not output_names else list(output_names)
        for name in wanted:
            if name not in known_out:
                raise InvalidArgument(f"invalid output name: '{name}' (model outputs: {', '.join(known_out)})")
        feeds = self._check_feed(input_feed)
        outputs = dict(zip(known_out, self.device.run(feeds)))
        return [outputs[name] for name in wanted]

    def _check_feed(self, input_feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        names = [i.name for i in self._inputs]
        for name in input_feed:
            if name not in names:
                raise InvalidArgument(f"invalid input name: '{name}' (model inputs: {', '.join(names)})")
        feeds, batch = [], None
        for arg in self._inputs:
            if arg.name not in input_feed:
                raise InvalidArgument(f"missing input: '{arg.name}'")
            x = input_feed[arg.name]
            if not isinstance(x, np.ndarray):
                raise InvalidArgument(f"input '{arg.name}' must be a numpy array, got {type(x).__name__}")
            if x.dtype != np.float32:
                raise InvalidArgument(f"unexpected input data type for '{arg.name}': actual {x.dtype}, "
                                      f"expected float32 ({arg.type})")
            if x.ndim != len(arg.shape):
                raise InvalidArgument(f"input '{arg.name}' has rank {x.ndim}, expected {len(arg.shape)} "
                                      f"(shape {arg.shape})")
            for axis, (got, want) in enumerate(zip(x.shape, arg.shape)):
                if axis > 0 and got != want:
                    raise InvalidArgument(f"input '{arg.name}' has dimension {axis} = {got}, expected {want}")
            if batch is not None and x.shape[0] != batch:
                raise InvalidArgument(f"input '{arg.name}' has batch {x.shape[0]}, other inputs have {batch}")
            batch = x.shape[0]
            feeds.append(x)
        if batch == 0:
            raise InvalidArgument("batch size 0")
        return feeds

    # lifetime ------------------------------------------------------------------------
    def close(self) -> None:
        self.device.close()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load(onnx_path: str | os.PathLike, device: str | None = None, *, verify: bool = False,
         timeout: float = 5.0) -> Session:
    """Compile ``onnx_path`` for the chip at ``device``, program it, and return a session.

    ``device``: a pyserial URL or port name (``emu://?seed=1``, ``socket://127.0.0.1:PORT``,
    ``/dev/pts/N``); default $NVCIM_DEVICE, else a fresh in-process chip.
    ``verify``: program every cell with write-verify instead of open loop.
    """
    lowered, model = lower_model(onnx_path)  # every model error surfaces before the link opens
    dev = Device.open(device, timeout=timeout)
    try:
        program = place(lowered, model, dev.identity.target)
        stats = deploy(dev, program, verify=verify)
    except BaseException:
        dev.close()
        raise
    return Session(model, program, dev, stats)
