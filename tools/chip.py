"""The chip side of the TSB flow: deploy, noise dump, incremental reflash, on-chip accuracy.

Everything here goes through the driver (``driver.open``/``Device``): registers, cell
reads, program upload, RUN. The chip is the source of truth: the program it holds is
fetched back (code) and its cell image rebuilt from the TARGET cells it reads out, so an
incremental compile pins exactly what the chip holds.

The noise dump maps each cell's captured deviation back onto the model's weights with
the inverse of the compiler's mapping: ``executor.effective_weights`` combines the
slices and the +/- tiles (scale * sign * sum_j dg_j 4^j), and a probe compile (every
weight replaced by its own index) tells which ONNX initializer element each (in, out)
matrix entry came from, whatever the layout (Gemm transB, conv im2col).
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.parse
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from nvcim import driver
from nvcim.compiler import CompileError, Target, compile_model, lower_model
from nvcim.compiler.quantize import fake_quantize
from nvcim.firmware_emu.contract.program_format import Program, effective_weights, pack_cells
from nvcim.firmware_emu.contract.protocol import CellQuantity, ErrorCode
from nvcim.firmware_emu.contract.registers import ALL_ARRAYS, Q16, DeviceModelCode
from nvcim.firmware_emu.contract.registers import field as register_field

NOISE_FORMAT = 2
SETTING_REGISTERS = ("CHIP_ID", "VERSION", "SEED", "SIGMA", "DEVICE_MODEL", "READ_NOISE", "CONFIG", "STUCK_RATE",
                     "CLOCK")
CONFIG_PER_CELL_STATE = register_field("CONFIG", "PER_CELL_STATE").mask


class FlowError(ValueError):
    """A step of the TSB flow cannot go on; the message says why and what to do."""


# -- identity ---------------------------------------------------------------------------
def chip_settings(device: driver.Device) -> dict:
    """The chip's identity, device settings, retention clock and geometry, read from its registers."""
    regs = {name: device.read_register(name) for name in SETTING_REGISTERS}
    identity = device.identity
    ident = identity.geometry
    return dict(chip_id=f"0x{regs['CHIP_ID']:08X}", unique_id=f"0x{identity.unique_id:016X}",
                version=regs["VERSION"], seed=regs["SEED"],
                sigma=regs["SIGMA"] / Q16, device_model=DeviceModelCode(regs["DEVICE_MODEL"]).name,
                variation="cell" if regs["CONFIG"] & CONFIG_PER_CELL_STATE else "weight", clock=regs["CLOCK"],
                read_noise=regs["READ_NOISE"] / Q16, clip=bool(regs["CONFIG"] & 1),
                stuck_rate=regs["STUCK_RATE"] / Q16, arrays=ident.arrays, rows=ident.rows, cols=ident.cols,
                weight_bits=ident.weight_bits, cell_bits=ident.cell_bits)


def finite_converters(device: driver.Device, arrays: set[int]) -> bool:
    """Whether any of ``arrays`` has a finite DAC or ADC (ARRAY_CONVERTERS, read array by array);
    ARRAY_SELECT is left selecting all arrays."""
    bits = register_field("ARRAY_CONVERTERS", "DAC_BITS").mask | register_field("ARRAY_CONVERTERS", "ADC_BITS").mask
    try:
        for array in sorted(arrays):
            device.write_register("ARRAY_SELECT", array)
            if device.read_register("ARRAY_CONVERTERS") & bits:
                return True
        return False
    finally:
        device.write_register("ARRAY_SELECT", ALL_ARRAYS)


def model_fingerprint(program: Program, layers: set[str] | None = None) -> str:
    """SHA-256 of the named layers' names and the weights their cells encode (w_q), wherever they sit."""
    h = hashlib.sha256()
    for index, layer in sorted(enumerate(program.layers), key=lambda il: il[1].name):
        if layers is not None and layer.name not in layers:
            continue
        w = effective_weights(program, index,
                              lambda i, layer=layer: program.tile_cells(layer.tiles[i]).astype(np.float32))
        h.update(layer.name.encode() + b"\0" + np.array(w.shape, np.int64).tobytes())
        h.update(np.ascontiguousarray(w, np.float32).tobytes())
    return h.hexdigest()


def target_of(device: driver.Device) -> Target:
    return device.identity.geometry


def settings_url(url: str, **settings) -> str:
    """``url`` with chip settings added to its query (emu:// only; other links ignore them)."""
    settings = {k: v for k, v in settings.items() if v is not None}
    if not settings or not url.startswith("emu://"):
        return url
    head, _, query_text = url.partition("?")
    query = dict(urllib.parse.parse_qsl(query_text))
    query.update({k: str(v) for k, v in settings.items()})
    return head + "?" + urllib.parse.urlencode(query, safe="/:")


# -- what the chip holds --------------------------------------------------------------------
def program_on_chip(device: driver.Device) -> Program:
    """The program the chip holds: its code fetched back, its cell image read from the TARGET cells."""
    try:
        program = device.fetch_program()
    except driver.DeviceError as e:
        if e.code == ErrorCode.NO_PROGRAM:
            raise FlowError("the chip holds no program: deploy the backbone first (nvcim deploy)") from None
        raise
    s, k = program.slices, program.cell_bits
    cells, offset = [], 0
    for layer in program.layers:
        for t in layer.tiles:
            targets = device.read_cells(t.array, t.row, t.col, t.in_count, t.out_count * s, CellQuantity.TARGET)
            data = pack_cells(targets.astype(np.uint8), k)
            t.cells_offset = offset
            cells.append(data)
            offset += len(data)
    program.cells = b"".join(cells)
    return program


def compile_for(device: driver.Device, onnx_path: str | os.PathLike, base: Program | None = None,
                shared: str = "common", own_arrays: bool = False) -> Program:
    try:
        return compile_model(onnx_path, target_of(device), base=base, shared=shared, pairs=device.differential(),
                             own_arrays=own_arrays)
    except CompileError as e:
        raise FlowError(str(e)) from None


def program_for(device: driver.Device, onnx_path: str | os.PathLike) -> Program:
    """The program of ``onnx_path`` as it sits on the chip (every layer pinned where the chip holds it)."""
    names = set(lower_model(onnx_path)[0].weights)
    chip_program = program_on_chip(device)
    missing = sorted(names - {lay.name for lay in chip_program.layers})
    if missing:
        raise FlowError(f"{onnx_path} is not on the chip: layer(s) {', '.join(missing[:3])} missing (the chip "
                        f"holds {', '.join(lay.name for lay in chip_program.layers)}); deploy or flash it first")
    try:
        return compile_model(onnx_path, target_of(device), base=program_subset(chip_program, names), shared="common",
                             pairs=device.differential())
    except CompileError as e:
        raise FlowError(f"{onnx_path} is not on the chip: the chip holds other weights ({e})") from None


# -- deploy -----------------------------------------------------------------------------------
@dataclass
class Cost(driver.WriteStats):
    """Programming cost: the write statistics, and the modelled busy time and energy (chip counters)."""

    busy_ns: int = 0
    energy_pj: int = 0

    @classmethod
    def between(cls, before: dict, after: dict, stats: driver.WriteStats) -> Cost:
        return cls(**asdict(stats), busy_ns=after.get("busy_ns", 0) - before.get("busy_ns", 0),
                   energy_pj=after.get("energy_pj", 0) - before.get("energy_pj", 0))

    def __str__(self) -> str:
        return (f"{self.cells} cells, {self.write_pulses} write + {self.read_pulses} read pulses, "
                f"{self.busy_ns / 1e6:.3f} ms, {self.energy_pj / 1e6:.3f} uJ modelled"
                + (f", {self.verify_failures} verify failures" if self.verify_failures else ""))


def deploy_backbone(device: driver.Device, onnx_path: str | os.PathLike) -> tuple[Program, Cost]:
    """Compile for this chip and program every cell open loop (read-after-write captures the noise)."""
    program = compile_for(device, onnx_path)
    before = device.counters()
    stats = driver.deploy(device, program, verify=False)
    return program, Cost.between(before, device.counters(), stats)


# -- noise dump -------------------------------------------------------------------------------
def weight_layout(model: onnx.ModelProto | str | os.PathLike) -> dict[str, tuple[str, tuple[int, ...], np.ndarray]]:
    """Per compiled layer: (initializer, its shape, index matrix (in, out) into the flat initializer, -1 = none).

    Found by compiling a probe copy of the model whose weights are their own 1-based indices.
    """
    lo, proto = lower_model(model, "common")
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    sources = set(lo.weight_sources.values())
    shapes = {}
    for init in probe.graph.initializer:
        if init.name in sources:
            shape = tuple(init.dims)
            n = int(np.prod(shape))
            if n >= 1 << 24:
                raise FlowError(f"weight '{init.name}' has {n} elements, too many to probe exactly in float32")
            init.CopyFrom(numpy_helper.from_array(np.arange(1, n + 1, dtype=np.float32).reshape(shape), init.name))
            shapes[init.name] = shape
    lo_probe, _ = lower_model(probe, "common")
    layout = {}
    for layer, matrix in lo_probe.weights.items():
        src = lo_probe.weight_sources[layer]
        idx = np.asarray(matrix, dtype=np.float64)
        n = int(np.prod(shapes[src]))
        if not np.array_equal(idx, np.rint(idx)) or idx.min() < 0 or idx.max() > n:
            raise FlowError(f"layer '{layer}': the compiler transforms weight '{src}' (scaling or mixing), so the "
                            f"chip's noise cannot be mapped back onto it element by element")
        flat = idx.astype(np.int64) - 1
        used = flat[flat >= 0]
        if len(np.unique(used)) != len(used):
            raise FlowError(f"layer '{layer}': weight '{src}' appears more than once in its crossbar matrix")
        layout[layer] = (src, shapes[src], flat)
    return layout


@dataclass
class NoiseDump:
    """Per-weight programming noise of one model on one chip, with both identities and its time.

    The noise is what the read right after programming saw; ``chip["clock"]`` is the chip's
    retention clock when the dump was taken and ``programmed_at`` each tile's cells'
    programming times on that clock (docs/device-model.md#drift): the cells have drifted
    for the difference since.
    """

    chip: dict
    model_fingerprint: str
    onnx_sha256: str
    noise: dict[str, np.ndarray]                 # initializer name -> w_p - w_q, initializer layout
    layers: dict[str, str] = field(default_factory=dict)  # chip layer -> initializer
    cells: dict[str, list[np.ndarray]] = field(default_factory=dict)  # chip layer -> per-tile cell noise
    source: str = ""                      # the file it was loaded from
    model: str = ""                       # the ONNX file it was captured for
    programmed_at: dict[str, list[np.ndarray]] = field(default_factory=dict)  # chip layer -> per-tile CLOCK stamps

    @property
    def clock(self) -> int:
        """The chip's retention clock (seconds) when the dump was taken (0 for a dump that predates the clock)."""
        return int(self.chip.get("clock", 0))

    def digest(self) -> str:
        h = hashlib.sha256()
        for layer in sorted(self.cells):
            for c in self.cells[layer]:
                h.update(np.ascontiguousarray(c, np.float32).tobytes())
        return h.hexdigest()

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = dict(format=NOISE_FORMAT, chip=self.chip, model_fingerprint=self.model_fingerprint,
                    onnx_sha256=self.onnx_sha256, layers=self.layers, digest=self.digest(),
                    tiles={k: len(v) for k, v in self.cells.items()}, model=self.model)
        arrays = {f"noise/{k}": v for k, v in self.noise.items()}
        for layer, tiles in self.cells.items():
            arrays.update({f"cells/{layer}/{i}": c for i, c in enumerate(tiles)})
        for layer, tiles in self.programmed_at.items():
            arrays.update({f"programmed/{layer}/{i}": t for i, t in enumerate(tiles)})
        with open(path, "wb") as f:
            np.savez_compressed(f, meta=np.array(json.dumps(meta, sort_keys=True)), **arrays)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> NoiseDump:
        path = Path(path)
        if not path.is_file():
            raise FlowError(f"{path}: no such noise file (make one with: nvcim noise fetch -o {path})")
        try:
            with np.load(path, allow_pickle=False) as f:
                meta = json.loads(str(f["meta"]))
                noise = {k[6:]: f[k] for k in f.files if k.startswith("noise/")}
                cells = {layer: [f[f"cells/{layer}/{i}"] for i in range(n)] for layer, n in meta["tiles"].items()}
                programmed = {layer: [f[f"programmed/{layer}/{i}"] for i in range(n)]
                              for layer, n in meta["tiles"].items() if f"programmed/{layer}/0" in f.files}
        except (OSError, ValueError, KeyError) as e:
            raise FlowError(f"{path}: not a noise file written by `nvcim noise fetch` ({e})") from None
        if meta.get("format") != NOISE_FORMAT:
            raise FlowError(f"{path}: noise file format {meta.get('format')}, expected {NOISE_FORMAT}")
        dump = cls(meta["chip"], meta["model_fingerprint"], meta["onnx_sha256"], noise, meta["layers"], cells,
                   str(path), meta.get("model", ""), programmed)
        if dump.digest() != meta["digest"]:
            raise FlowError(f"{path}: noise file is corrupt (its cell noise does not match its digest)")
        return dump

    def check_model(self, program: Program, what: str) -> None:
        """Raise unless this dump was taken from ``program``'s backbone layers."""
        names = set(self.layers)
        if not names <= {lay.name for lay in program.layers} or \
                model_fingerprint(program, names) != self.model_fingerprint:
            raise FlowError(f"noise file {self.source or '(in memory)'} was captured from another model "
                            f"(fingerprint {self.model_fingerprint[:12]}), not from {what}; "
                            f"fetch the noise of this model: nvcim noise fetch")

    def check_chip(self, settings: dict) -> None:
        """Raise unless ``settings`` (chip_settings of a device) are the chip this dump came from."""
        keys = ("chip_id", "unique_id", "seed", "sigma", "device_model", "variation", "read_noise", "clip",
                "stuck_rate", "arrays", "rows", "cols", "weight_bits", "cell_bits")
        diff = [f"{k}={settings.get(k)} (noise file: {self.chip.get(k)})" for k in keys
                if settings.get(k) != self.chip.get(k)]
        if diff:
            raise FlowError(f"noise file {self.source or '(in memory)'} comes from another chip: {', '.join(diff)}")


def fetch_noise(device: driver.Device, onnx_path: str | os.PathLike) -> NoiseDump:
    """Read the captured noise of the model's layers off the chip, per weight, with both identities."""
    expected = program_for(device, onnx_path)
    layout = weight_layout(onnx_path)
    s = expected.slices
    noise, layers, cells, programmed = {}, {}, {}, {}
    for li, layer in enumerate(expected.layers):
        tiles = [device.read_cells(t.array, t.row, t.col, t.in_count, t.out_count * s, CellQuantity.NOISE)
                 for t in layer.tiles]
        programmed[layer.name] = [
            device.read_cells(t.array, t.row, t.col, t.in_count, t.out_count * s, CellQuantity.PROGRAM_TIME)
            for t in layer.tiles]
        matrix = effective_weights(expected, li, lambda i, tiles=tiles: tiles[i])
        src, shape, flat = layout[layer.name]
        w = noise.setdefault(src, np.zeros(shape, np.float32)).reshape(-1)  # a view: groups fill their parts
        sel = flat >= 0
        w[flat[sel]] = matrix[sel]
        layers[layer.name] = src
        cells[layer.name] = tiles
    return NoiseDump(chip_settings(device), model_fingerprint(expected), _sha256(onnx_path), noise, layers, cells,
                     model=str(onnx_path), programmed_at=programmed)


def noisy_weights(onnx_path: str | os.PathLike, dump: NoiseDump, weight_bits: int = 8) -> dict[str, np.ndarray]:
    """w_q + captured noise for every dumped initializer: the weights the chip really holds."""
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(onnx_path)).graph.initializer}
    return {name: (fake_quantize(inits[name], weight_bits) + n).astype(np.float32) for name, n in dump.noise.items()}


def _sha256(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# -- reflash ----------------------------------------------------------------------------------
@dataclass
class FlashReport:
    tsb_layers: list[str]
    tsb_weights: int
    total_weights: int
    cost: Cost
    full_verify: Cost
    backbone_cells: int
    other_cells: int
    identical: bool
    conductance_compared: bool

    @property
    def verified_fraction(self) -> float:
        return self.tsb_weights / self.total_weights

    def lines(self) -> list[str]:
        ratio = self.full_verify.write_pulses / max(1, self.cost.write_pulses)
        return [
            f"TSB layer(s) {', '.join(self.tsb_layers)}: {self.tsb_weights} weights written with write-verify "
            f"= {self.verified_fraction:.2%} of all {self.total_weights} weights",
            f"  written: {self.cost}",
            f"  a full write-verify of the model would cost: {self.full_verify} ({ratio:.0f}x the pulses)",
            f"  backbone cells bit-identical after the reflash: {self.backbone_cells} of {self.backbone_cells}"
            f" (+{self.other_cells} other cells outside the TSB tiles; compared "
            f"{'conductance, target and noise' if self.conductance_compared else 'target and noise (reads are noisy)'})"
            if self.identical else "  BACKBONE CELLS CHANGED",
        ]


def _tile_mask(program: Program, names: set[str], arrays: list[int], shape: tuple[int, int]) -> np.ndarray:
    mask = np.zeros((len(arrays), *shape), dtype=bool)
    pos = {a: i for i, a in enumerate(arrays)}
    for layer in program.layers:
        if layer.name in names:
            for t in layer.tiles:
                if t.array in pos:
                    mask[pos[t.array], t.row:t.row + t.in_count, t.col:t.col + t.out_count * program.slices] = True
    return mask


def _snapshot(device: driver.Device, arrays: list[int], quantities: list[CellQuantity]) -> np.ndarray:
    ident = device.identity.geometry
    return np.stack([np.stack([device.read_cells(a, 0, 0, ident.rows, ident.cols, q) for a in arrays])
                     for q in quantities])


def full_verify_cost(settings: dict, program: Program) -> Cost:
    """What writing every cell of ``program`` with write-verify costs, measured on a fresh chip with these settings."""
    keys = ("seed", "sigma", "read_noise", "stuck_rate", "arrays", "rows", "cols", "weight_bits", "cell_bits")
    opts = {k: settings[k] for k in keys}
    opts.update(model=settings["device_model"], clip=int(settings["clip"]), variation=settings["variation"])
    with driver.open("emu://?" + urllib.parse.urlencode(opts)) as scratch:
        before = scratch.counters()
        stats = driver.deploy(scratch, program, verify=True)
        return Cost.between(before, scratch.counters(), stats)


def flash_tsb(device: driver.Device, backbone_onnx: str | os.PathLike, tsb_onnx: str | os.PathLike,
              dump: NoiseDump | None = None, shared: str = "common") -> tuple[Program, FlashReport]:
    """Compile the TSB model incrementally on the chip's program and write only the TSB cells, verified.

    ``shared``: the block on one crossbar that every insertion point reuses ("common"), or
    one copy per insertion point ("separate": more cells written, the uses run in parallel).

    Proves, by reading the cells back, that every cell outside the TSB tiles is bit-identical.
    """
    settings = chip_settings(device)
    backbone = program_for(device, backbone_onnx)  # where the chip holds it; refuses if it does not
    chip_program = program_on_chip(device)
    if dump is not None:
        dump.check_chip(settings)
        dump.check_model(backbone, f"the backbone {backbone_onnx}")
        s = backbone.slices
        for layer in backbone.layers:
            if layer.name in dump.cells:
                now = [device.read_cells(t.array, t.row, t.col, t.in_count, t.out_count * s, CellQuantity.NOISE)
                       for t in layer.tiles]
                if any(not np.array_equal(a, b) for a, b in zip(now, dump.cells[layer.name])):
                    raise FlowError(f"noise file {dump.source} does not match the noise this chip captured for "
                                    f"layer '{layer.name}' (another chip, or the backbone was deployed again); "
                                    f"fetch it again: nvcim noise fetch")
    base_names = {lay.name for lay in backbone.layers}
    base = program_subset(chip_program, base_names)
    # through finite converters a tile shares its array's ADC range: the TSB's small sums get arrays of their own
    own = finite_converters(device, {t.array for lay in backbone.layers for t in lay.tiles})
    program = compile_for(device, tsb_onnx, base=base, shared=shared, own_arrays=own)
    tsb_names = [lay.name for lay in program.layers if lay.name not in base_names]
    if not tsb_names:
        raise FlowError(f"{tsb_onnx} adds no crossbar layer to the backbone; is it a TSB model (nvcim tsb train)?")
    check_tsb_fits(program, tsb_names, settings)
    arrays = sorted({t.array for lay in program.layers for t in lay.tiles})
    quantities = [CellQuantity.TARGET, CellQuantity.NOISE]
    conductance = settings["read_noise"] == 0
    if conductance:
        quantities.insert(0, CellQuantity.CONDUCTANCE)
    before_cells = _snapshot(device, arrays, quantities)
    before = device.counters()
    stats = driver.deploy(device, program, verify=True, layers=set(tsb_names))
    cost = Cost.between(before, device.counters(), stats)
    after_cells = _snapshot(device, arrays, quantities)
    ident = device.identity.geometry
    tsb_mask = _tile_mask(program, set(tsb_names), arrays, (ident.rows, ident.cols))
    backbone_mask = _tile_mask(program, base_names, arrays, (ident.rows, ident.cols))
    outside = ~tsb_mask
    identical = bool(np.array_equal(before_cells[:, outside].view(np.uint32), after_cells[:, outside].view(np.uint32)))
    if not identical:
        changed = int((before_cells[:, outside] != after_cells[:, outside]).any(0).sum())
        raise FlowError(f"reflash changed {changed} cells outside the TSB tiles; the backbone is no longer intact")
    layout = {lay.name: lay for lay in program.layers}
    tsb_weights = sum(layout[n].in_features * layout[n].out_features for n in tsb_names)
    total = sum(lay.in_features * lay.out_features for lay in program.layers)
    backbone_cells = int(backbone_mask.sum())
    report = FlashReport(tsb_names, tsb_weights, total, cost, full_verify_cost(settings, program), backbone_cells,
                         int(outside.sum()) - backbone_cells, identical, conductance)
    return program, report


def check_tsb_fits(program: Program, tsb_names: list[str], settings: dict) -> None:
    for layer in program.layers:
        if layer.name in tsb_names:
            check_tsb_width(layer.in_features, settings)


def check_tsb_width(c: int, settings: dict) -> None:
    """The shared block must fit one crossbar: c rows and c * M/K columns."""
    slices = settings["weight_bits"] // settings["cell_bits"]
    if c > settings["rows"] or c * slices > settings["cols"]:
        raise FlowError(f"TSB width c={c} is larger than the chip's arrays: a c x c block needs {c} rows and "
                        f"{c * slices} columns ({slices} cells a weight), the arrays have {settings['rows']} rows x "
                        f"{settings['cols']} columns; choose c <= {min(settings['rows'], settings['cols'] // slices)}")


def program_subset(program: Program, names: set[str]) -> Program:
    """A program holding only the named layers (with their cells): the base of an incremental compile."""
    layers = [lay for lay in program.layers if lay.name in names]
    return Program(program.weight_bits, program.cell_bits, program.array_rows, program.array_cols, [], {},
                   layers, [], [], [], program.cells)


# -- inference on the chip ---------------------------------------------------------------------
def chip_logits(device: driver.Device, program: Program, x: np.ndarray, batch: int = 512) -> np.ndarray:
    """Run ``program``'s code on the chip's cells as they are (no cell is written), then restore its code."""
    try:
        previous = device.fetch_program()
    except driver.DeviceError:
        previous = None
    swap = previous is None or previous.code_bytes() != program.code_bytes()
    if swap:
        device.load_code(program)
    try:
        return np.concatenate([device.run([np.ascontiguousarray(x[i:i + batch], dtype=np.float32)])[0]
                               for i in range(0, len(x), batch)])
    finally:
        if swap and previous is not None:
            device.load_code(previous)


def chip_accuracy(device: driver.Device, program: Program, x: np.ndarray, y: np.ndarray) -> float:
    return float((chip_logits(device, program, x).argmax(1) == y).mean())
