"""ONNX export of the models (deploy form) and reading them back into torch.

The TorchScript exporter (``dynamo=False``) is fast but emits the TSB's channel padding as
a small constant subgraph (ConstantOfShape, Concat, Slice, Cast ...). The compiler's
constant folding (``compiler.frontend.fold_constants``) evaluates every node whose inputs
are all constant and stores the results as initializers, so the file holds the plain
pattern Pad -> Reshape -> Transpose -> MatMul -> Transpose -> Reshape -> Slice with
constant shapes, and no Constant nodes.

The model's build config travels in the file's metadata (``nvcim.model``), so later steps
(TSB training, evaluation) rebuild the same torch module from the ONNX file alone.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import onnx
import torch
from onnx import numpy_helper

from nvcim.compiler.frontend import fold_constants

from .models import Net, build

META_KEY = "nvcim.model"
INPUT, OUTPUT = "image", "logits"


class ModelFileError(ValueError):
    """An ONNX file that is not a model these tools made; names the file."""


def export(model: Net, path: str | Path, *, role: str, extra: dict | None = None) -> Path:
    """Export ``model`` in deploy form (BN folded, eval) to ``path`` with its config in the metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    deploy = model.folded()
    cfg = deploy.config
    example = torch.zeros(1, cfg["in_ch"], cfg["image"], cfg["image"])
    with warnings.catch_warnings():  # the TorchScript exporter announces its own deprecation
        warnings.simplefilter("ignore")
        torch.onnx.export(deploy, (example,), str(path), dynamo=False, input_names=[INPUT], output_names=[OUTPUT],
                          dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
                          keep_initializers_as_inputs=True)  # True: no merging of equal initializers
    proto = onnx.load(str(path))
    names = {t.name for t in proto.graph.initializer}
    inputs = [v for v in proto.graph.input if v.name not in names]
    del proto.graph.input[:]
    proto.graph.input.extend(inputs)
    proto = fold_constants(proto, str(path))
    proto.graph.name = f"{cfg['arch']}-{role}"
    meta = dict(cfg, role=role, **(extra or {}))
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, {META_KEY: json.dumps(meta, sort_keys=True)})
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return path


def read_meta(path: str | Path) -> tuple[onnx.ModelProto, dict]:
    """The ONNX model and the build config these tools stored in it."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such ONNX file")
    try:
        proto = onnx.load(str(path))
    except Exception as e:  # noqa: BLE001 - protobuf raises several unrelated types
        raise ModelFileError(f"{path}: not a readable ONNX model ({type(e).__name__}: {e})") from None
    props = {p.key: p.value for p in proto.metadata_props}
    if META_KEY not in props:
        raise ModelFileError(f"{path}: no '{META_KEY}' metadata; export the model with `nvcim train` "
                             f"(the TSB tools rebuild the torch model from it)")
    return proto, json.loads(props[META_KEY])


def load_deploy(path: str | Path) -> tuple[Net, dict]:
    """Rebuild the deploy-form torch model of an exported file, weights taken from the file bit for bit."""
    proto, meta = read_meta(path)
    cfg = {k: meta[k] for k in ("arch", "in_ch", "classes", "image", "width")}
    net = build(**cfg, bn=False, tsb=meta.get("tsb"), tsb_points=meta.get("tsb_points"))
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    state = net.state_dict()
    missing = [k for k in state if k not in inits]
    if missing:
        raise ModelFileError(f"{path}: initializer(s) {', '.join(missing[:4])} missing; not exported by these tools?")
    loaded = {k: torch.from_numpy(inits[k].copy()) for k in state}
    for k, v in loaded.items():
        if tuple(v.shape) != tuple(state[k].shape):
            raise ModelFileError(f"{path}: initializer '{k}' has shape {tuple(v.shape)}, model expects "
                                 f"{tuple(state[k].shape)}")
    net.load_state_dict(loaded)
    return net.eval(), meta


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
