"""``driver.load(onnx_path)``: an onnxruntime-shaped session backed by the chip.

A host application written against ``onnxruntime.InferenceSession(path)`` runs unchanged
against ``driver.load(path)``: same ``run(output_names, input_feed)``, same
``get_inputs()`` / ``get_outputs()`` descriptions, same errors for wrong names and shapes.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from tqdm import tqdm

from nvcim.compiler import lower_model, place
from nvcim.firmware_emu.contract.program_format import (
    Opcode,
    Program,
    ProgramFormatError,
    Tile,
    check_cell_image,
    check_program,
)
from nvcim.firmware_emu.contract.protocol import WriteStats

from .cache import cached_program, known_model, model_digest, remember_model
from .calibration import apply as apply_calibration
from .calibration import calibrate
from .default_device import resolve_devices
from .device import Device
from .errors import InvalidArgument

log = logging.getLogger(__name__)

_ONNX_TYPES = {onnx.TensorProto.FLOAT: ("tensor(float)", np.float32),
               onnx.TensorProto.INT64: ("tensor(int64)", np.int64),    # indices of a Gather (embedding)
               onnx.TensorProto.INT32: ("tensor(int32)", np.int32)}
_DTYPES = dict(_ONNX_TYPES.values())  # "tensor(float)" -> np.float32


def without_batch(model: onnx.ModelProto, programs: list[Program]) -> tuple[set[str], set[str]]:
    """The model inputs whose dim 0 is no batch, and every tensor computed from them alone.

    The chip holds such an input with a batch axis in front of its own dims (each sample
    a copy: the host repeats it), so its program tensor has one axis more than the ONNX
    input; what only elementwise ops make of it is a copy per sample as well (the
    compiler's rule, replayed over the programs in order), and the host returns sample 0.
    """
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in model.graph.input}
    inputs = {p.tensors[t].name for p in programs for t in p.inputs
              if len(p.tensors[t].shape) == ranks.get(p.tensors[t].name, -2) + 1}
    names = set(inputs)
    for p in programs:
        copies = {tid for tid, t in enumerate(p.tensors) if t.name in names}
        for ins in p.instructions:
            computed = [t for t in ins.inputs if t not in p.constants]
            if computed and all(t in copies for t in computed):
                copies.update(ins.outputs)
        names |= {p.tensors[t].name for t in copies}
    return inputs, names


def index_depths(programs: list[Program]) -> dict[str, int]:
    """Inputs holding table indices (read by ONE_HOT) -> the table's rows."""
    return {p.tensors[ins.inputs[0]].name: ins.attrs["depth"][0]
            for p in programs for ins in p.instructions if ins.op == Opcode.ONE_HOT}


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


def _check_deployable(device: Device, program: Program, chosen: list) -> None:
    """InvalidArgument naming what of ``program`` does not fit the chip, or whose cells the
    program lacks: the checks PROGRAM_LOAD makes, and the tiles' cell image, on the host."""
    g = device.identity.geometry
    built = (program.weight_bits, program.cell_bits, program.array_rows, program.array_cols)
    if built != (g.weight_bits, g.cell_bits, g.rows, g.cols):
        raise InvalidArgument(f"program compiled for M={built[0]}, K={built[1]}, arrays of {built[2]}x{built[3]}; "
                              f"the chip has M={g.weight_bits}, K={g.cell_bits}, arrays of {g.rows}x{g.cols}")
    try:
        check_program(program, arrays=g.arrays)
        check_cell_image(program, chosen)
    except ProgramFormatError as e:
        raise InvalidArgument(f"program does not fit the chip: {e}") from None


def deploy(device: Device, program: Program, *, verify: bool = False, layers: set[str] | None = None,
           verify_mask: dict[str, np.ndarray] | None = None) -> WriteStats:
    """Upload the code and program the cells of ``layers`` (default: every layer).

    Each tile region is erased first; then only the cells of weights on the tile's side
    (level > 0, matching sign) are pulsed. The other cells stay erased,
    (docs/device-model.md#signed-weights-positive-and-negative-arrays).
    Cells of layers not named are not touched, so a host can reflash only new layers.
    ``verify``: write-verify every cell; ``verify_mask``: per layer, a bool matrix
    (in_features x out_features) of the weights to write-verify, the rest open loop.
    """
    names = {layer.name: layer for layer in program.layers}
    for what, given in (("layer", layers or set()), ("verify_mask layer", set(verify_mask or {}))):
        unknown = set(given) - set(names)
        if unknown:
            raise InvalidArgument(f"program has no {what}(s) {', '.join(sorted(unknown))}")
    for name, mask in (verify_mask or {}).items():
        want = (names[name].in_features, names[name].out_features)
        if np.shape(mask) != want:
            raise InvalidArgument(f"verify_mask for layer '{name}' has shape {np.shape(mask)}, expected {want}")
    chosen = [layer for layer in program.layers if layers is None or layer.name in layers]
    s = program.slices
    total_cells = sum(t.in_count * t.out_count * s for layer in chosen for t in layer.tiles)
    _check_deployable(device, program, chosen)  # before anything is sent: a refusal leaves the chip as it was
    device.load_code(program)
    total = WriteStats()
    runs = _erase_runs([tile for layer in chosen for tile in layer.tiles])
    with tqdm(total=total_cells, unit="cell", unit_scale=True, desc="programming", disable=None, leave=False) as bar:
        for layer in chosen:
            weights_mask = None if verify_mask is None or layer.name not in verify_mask else \
                np.asarray(verify_mask[layer.name], dtype=bool)
            for tile in layer.tiles:
                targets = program.tile_cells(tile)
                used = _weights_used(targets, tile.in_count, tile.out_count, s)
                if id(tile) in runs:
                    device.erase(tile.array, tile.row, tile.col, tile.in_count, tile.out_count * s,
                                 arrays=runs[id(tile)])
                if weights_mask is None:
                    parts = [(used, verify)]
                else:
                    selected = weights_mask[tile.in_start:tile.in_start + tile.in_count,
                                            tile.out_start:tile.out_start + tile.out_count]
                    parts = [(used & ~selected, False), (used & selected, True)]
                for weights, with_verify in parts:
                    if weights.any():
                        total += device.write_cells(tile.array, tile.row, tile.col, targets, verify=with_verify,
                                                    mask=np.repeat(weights, s, axis=1))
                bar.update(targets.size)
    log.info("programmed %d cells with %d write pulses (%d verify failures)",
             total.cells, total.write_pulses, total.verify_failures)
    return total


def _weights_used(targets: np.ndarray, rows: int, weights: int, slices: int) -> np.ndarray:
    """Per weight of a tile, whether any of its ``slices`` cells has a state above 0: one compare of
    the S cells as one integer where S is 2, 4 or 8, else an OR per slice (any() along a short last
    axis costs 20x more)."""
    cells = targets.reshape(rows, weights, slices)
    if slices in (2, 4, 8) and cells.dtype == np.uint8 and cells.flags.c_contiguous:
        return cells.view(f"u{slices}").reshape(rows, weights) != 0
    used = cells[:, :, 0].copy()
    for i in range(1, slices):
        used |= cells[:, :, i]
    return used != 0


def _erase_runs(tiles: list[Tile]) -> dict[int, int]:
    """id() of each tile that starts a run -> how many arrays the run spans.

    A run is consecutive tiles with the same rows and columns on consecutive arrays: one
    CELLS_ERASE over its arrays, before its first tile is written, does what erasing each
    right before its write did (they lie on different arrays), in one command instead of
    one per tile (VGG-8: 29 instead of 1600).
    """
    runs: dict[int, int] = {}
    start = None
    for tile in tiles:
        if start is not None and tile.array == start.array + runs[id(start)] and \
                (tile.row, tile.col, tile.in_count, tile.out_count) == \
                (start.row, start.col, start.in_count, start.out_count):
            runs[id(start)] += 1
        else:
            start, runs[id(tile)] = tile, 1
    return runs


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
        self._output_bytes = sum(4 * int(np.prod(program.tensors[t].shape[1:])) for t in program.outputs)
        self._depths = index_depths([program])
        self._no_batch, copies = without_batch(model, [program])
        self._copied_outputs = [program.tensors[t].name in copies for t in program.outputs]

    # onnxruntime-compatible surface ---------------------------------------------------
    def get_inputs(self) -> list[NodeArg]:
        return list(self._inputs)

    def get_outputs(self) -> list[NodeArg]:
        return list(self._outputs)

    def get_modelmeta(self) -> ModelMetadata:
        m = self._model
        return ModelMetadata(m.producer_name, m.graph.name, m.domain, m.doc_string, m.model_version,
                             {p.key: p.value for p in m.metadata_props})

    def run(self, output_names: list[str] | None, input_feed: dict[str, np.ndarray],
            run_options=None) -> list[np.ndarray]:
        known_out = [o.name for o in self._outputs]
        wanted = known_out if not output_names else list(output_names)
        for name in wanted:
            if name not in known_out:
                raise InvalidArgument(f"invalid output name: '{name}' (model outputs: {', '.join(known_out)})")
        feeds = self._check_feed(input_feed)
        results = [r[0] if copied else r for r, copied in zip(self._execute(feeds), self._copied_outputs)]
        outputs = dict(zip(known_out, results))
        return [outputs[name] for name in wanted]

    def _execute(self, feeds: list[np.ndarray]) -> list[np.ndarray]:
        """The model's outputs for checked float32 feeds: the batch in slices the staging buffer holds."""
        step = self._max_batch(feeds)
        parts = [self.device.run([f[i:i + step] for f in feeds]) for i in range(0, len(feeds[0]), step)]
        return [np.concatenate(p) if len(p) > 1 else p[0] for p in zip(*parts)]

    def _max_batch(self, feeds: list[np.ndarray]) -> int:
        """Largest batch whose inputs and outputs fit the chip's staging buffer at once."""
        per_input = sum(f[0].nbytes for f in feeds)
        return max(1, self.device.identity.geometry.buffer_size // max(per_input, self._output_bytes, 1))

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
            want_dtype = _DTYPES.get(arg.type, np.float32)
            if x.dtype != want_dtype:
                raise InvalidArgument(f"unexpected input data type for '{arg.name}': actual {x.dtype}, "
                                      f"expected {np.dtype(want_dtype).name} ({arg.type})")
            if x.ndim != len(arg.shape):
                raise InvalidArgument(f"input '{arg.name}' has rank {x.ndim}, expected {len(arg.shape)} "
                                      f"(shape {arg.shape})")
            for axis, (got, want) in enumerate(zip(x.shape, arg.shape)):
                if (axis > 0 or arg.name in self._no_batch) and got != want:
                    raise InvalidArgument(f"input '{arg.name}' has dimension {axis} = {got}, expected {want}")
            if arg.name in self._no_batch:
                feeds.append(x)
                continue
            if batch is not None and x.shape[0] != batch:
                raise InvalidArgument(f"input '{arg.name}' has batch {x.shape[0]}, other inputs have {batch}")
            batch = x.shape[0]
            feeds.append(self._indices(arg.name, x) if want_dtype != np.float32 else x)
        if batch == 0:
            raise InvalidArgument("batch size 0")
        # an input without a batch goes to the chip once per sample (a view, copied when sent)
        return [np.broadcast_to(f, (batch or 1, *f.shape)) if arg.name in self._no_batch else f
                for arg, f in zip(self._inputs, feeds)]

    def _indices(self, name: str, x: np.ndarray) -> np.ndarray:
        """Integer indices as the chip takes them (float32), each checked against its table."""
        depth = self._depths[name]
        bad = (x < -depth) | (x >= depth)
        if bad.any():
            where = tuple(int(i) for i in np.argwhere(bad)[0])
            raise InvalidArgument(f"input '{name}' holds index {x[where]} at {where}, outside [-{depth}, {depth}) "
                                  f"(the table has {depth} rows)")
        return x.astype(np.float32)

    # lifetime ------------------------------------------------------------------------
    def close(self) -> None:
        self.device.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


POLICIES = ("open-loop", "write-verify", "selective")


def _normalised(onnx_path: str | os.PathLike | onnx.ModelProto, cached: bool):
    """(lowering, normalised model, its digest): every model error surfaces here, before a link opens.

    With ``cached``, bytes the compile cache has seen normalised before are not lowered
    again: the lowering is None (``lower_model`` again if a program must be built), the
    model the cached description (inputs, outputs, metadata), and no error can come of
    them (the same compiler took the same bytes).
    """
    source = None
    if cached:
        try:
            source = onnx_path.SerializeToString() if isinstance(onnx_path, onnx.ModelProto) else \
                Path(onnx_path).read_bytes()
        except OSError:
            source = None  # lower_model names what is wrong with the path
    known = known_model(source) if source is not None else None
    if known is not None:
        return None, *known
    lowered, model = lower_model(onnx_path)
    digest = None
    if source is not None:
        digest = model_digest(model)
        remember_model(source, model, digest)
    return lowered, model, digest


def load(onnx_path: str | os.PathLike | onnx.ModelProto, device: str | list[str] | None = None, *,
         policy: str = "open-loop", verify_mask: dict[str, np.ndarray] | None = None,
         timeout: float = 5.0, cache: bool = True,
         calibration: dict[str, np.ndarray] | None = None) -> Session:
    """Compile ``onnx_path`` for the chip at ``device``, program it, and return a session.

    ``device``: a pyserial URL or port name (``emu://?seed=1``, ``socket://127.0.0.1:PORT``,
    ``/dev/pts/N``); default $NVCIM_DEVICE, else a fresh in-process chip. A list of them
    (or a comma-separated $NVCIM_DEVICE): the model is split into consecutive stages, one
    per chip, and batches flow through them (``multichip.MultiChipSession``); the
    ``verify_mask`` layers are found on whichever chip holds them.
    ``policy``: "open-loop" (one pulse per cell, the default), "write-verify" (every cell),
    or "selective" (write-verify the weights ``verify_mask`` marks: layer name -> bool
    matrix in_features x out_features).
    ``cache``: reuse a program compiled earlier for the same model and chip geometry.
    ``calibration``: a batch of inputs by name; the converters' full scales measured on it
    (``calibration.calibrate``) are written to every used array after programming. Without
    it the chip's automatic ranges apply (per-vector DAC, weight-bound ADC).
    """
    if policy not in POLICIES:
        raise InvalidArgument(f"policy {policy!r} is not one of {', '.join(POLICIES)}")
    if (policy == "selective") != (verify_mask is not None):
        raise InvalidArgument("verify_mask goes with policy='selective', and only with it")
    urls = resolve_devices(device)
    lowered, model, digest = _normalised(onnx_path, cache and len(urls) == 1)
    if len(urls) > 1:
        if calibration is not None:
            raise InvalidArgument("calibration is supported on one chip; load the stages without it")
        from .multichip import load_multichip

        return load_multichip(lowered, model, urls, policy=policy, verify_mask=verify_mask, timeout=timeout)
    dev = Device.open(urls[0], timeout=timeout)
    try:
        target = dev.identity.geometry
        pairs = dev.differential()   # a chip reading array pairs differentially needs paired placement
        build = lambda: place(*(lower_model(onnx_path) if lowered is None else (lowered, model)),  # noqa: E731
                              target, pairs=pairs)
        options = {"pairs": True} if pairs else {}
        program = cached_program(digest or model_digest(model), target, options, build) if cache else build()
        stats = deploy(dev, program, verify=policy == "write-verify", verify_mask=verify_mask)
        if calibration is not None:
            apply_calibration(dev, calibrate(program, calibration))
    except BaseException:
        dev.close()
        raise
    return Session(model, program, dev, stats)
