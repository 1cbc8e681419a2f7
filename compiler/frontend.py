"""Loading and checking ONNX models before lowering.

Every defect is reported as a CompileError that names the file and, where there is
one, the node; nothing is sent to a chip for a model that fails here.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper


class CompileError(ValueError):
    """The model cannot be compiled; the message names the file and the node."""


def load(model: str | os.PathLike | onnx.ModelProto, source: str | None = None) -> tuple[onnx.ModelProto, str]:
    """Read, check and shape-infer a model; return it with a name for messages.

    ``source`` names an in-memory model in messages (default: its graph name).
    """
    if isinstance(model, onnx.ModelProto):
        source, proto = source or model.graph.name or "<model>", model
    else:
        source = str(model)
        path = Path(model)
        if not path.is_file():
            raise CompileError(f"{source}: no such ONNX file")
        try:
            proto = onnx.load(str(path))
        except (DecodeError, ValueError, RuntimeError, OSError) as e:
            raise CompileError(f"{source}: not a readable ONNX model ({type(e).__name__}: {e})") from None
    if not proto.graph.node:
        raise CompileError(f"{source}: not an ONNX model with a graph (no nodes found; is the file truncated?)")
    try:
        onnx.checker.check_model(proto)
        proto = onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CompileError(f"{source}: invalid ONNX model: {first}") from None
    return proto, source


def initializers(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in graph.initializer}


def node_label(node: onnx.NodeProto, index: int) -> str:
    """How messages name a node: its name, or its op and position when it has none."""
    return node.name or f"{node.op_type}#{index}"


def static_shape(value: onnx.ValueInfoProto, source: str) -> tuple[int, ...]:
    """Shape of a graph input with the first (batch) dimension as -1.

    Every other dimension must be fixed: crossbars are laid out for one input size.
    """
    dims = value.type.tensor_type.shape.dim
    shape = [-1]
    for i, d in enumerate(dims[1:], start=1):
        if not d.HasField("dim_value") or d.dim_value <= 0:
            label = d.dim_param or "unknown"
            raise CompileError(f"{source}: input '{value.name}' has dynamic dimension {i} ('{label}'); "
                               f"only the batch dimension (0) may vary on the chip")
        shape.append(d.dim_value)
    return tuple(shape)
