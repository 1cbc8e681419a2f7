"""Crossbar products through the arrays' converters and read noise, all tiles of a layer at once.

With ideal converters and no read noise a layer's tiles combine exactly into one effective
matrix (``effective_weights``) and the executor multiplies by that. A real array sees its
inputs through a DAC, adds read noise to every column current and delivers each column
through an ADC; this module forms that product for every tile of a layer in one batched
matrix product. The model (every setting is per array, registers ARRAY_SELECT /
ARRAY_CONVERTERS / ARRAY_DAC_FS / ARRAY_ADC_FS):

* DAC, b bits, sign included: a tile's input rows x are driven as
  u = rint(clip(x / dac_fs, -1, 1) * L) / L with L = 2^(b-1) - 1 (L = 1 for b = 1).
  ``dac_fs`` is the array's input full scale; 0 means per vector: each input vector is
  scaled by its own largest |x| over the tile's rows, as a bit-serial input driver sets it
  (it depends on that vector only, so never on the batch). 0 bits: u = x / dac_fs, exact.
* Read noise: reading a cell returns g + N(0, (read_noise * g_max)^2), fresh on every
  product. On a column sum that is exactly one Gaussian of std read_noise * ||u_rows||_2
  (in the normalised units below), drawn per column, per slice, per tile, inside the ADC
  pass from a counter-based source (``gaussian_source``) keyed per chunk of the batch.
* ADC, b bits: column j's normalised sum s_j = sum_i u_i g_ij / g_max (plus its noise) is
  clipped to [-adc_fs, adc_fs] and rounded to 2^(b-1) - 1 levels of adc_fs. ``adc_fs`` is
  the array's ADC full scale; 0 means the weight bound: the largest |s| any input in the
  DAC range can produce on the array's used columns, max_j sum_i |g_ij| / g_max over the
  program's tiles on that array. It is fixed once the cells are programmed, never taken
  from the current batch, so a sample's output is the same alone or in any batch.
  0 bits: s passes exactly.
* The digital unit rescales each column by dac_fs (or the vector's own scale) * g_max,
  shift-adds the S slices with place values 2^(jK), subtracts negative tiles and
  multiplies by the layer's scale.
* Readout (ARRAY_CONVERTERS.SHIFT_ADD, per array): above, one ADC per column (bit line).
  With analog shift-add the S slice currents of weight column o are summed with gains
  2^(jK) before ONE ADC: s_o = sum_j 2^(jK) sum_i u_i g_i,oS+j / g_max, read noise one
  Gaussian of std read_noise * ||u_rows||_2 * sqrt(sum_j 4^(jK)), adc_fs 0 the fused
  bound max_o sum_i |sum_j 2^(jK) g_i,oS+j| / g_max; the digital unit only rescales. The
  product reads each tile through its fused matrix (``fused_cells``): the multiply-adds
  and noise draws of one sign tile per weight, not S.

* Differential readout (ARRAY_CONVERTERS.DIFFERENTIAL, per array pair 2p / 2p+1): the
  ADCs of array 2p see each bit line of array 2p minus the same bit line of array 2p+1,
  through array 2p's converters (array 2p+1's converter registers are not used). With the
  compiler's paired placement a block's positive tile sits on 2p and its negative tile at
  the same spot of 2p+1, so one ADC sample carries both signs: the column sum is
  sum_i u_i (g+_ij - g-_ij) / g_max, read noise one Gaussian of std sqrt(2) times the
  single read's (both bit lines' cells are read), adc_fs 0 the bound of the difference.
  A tile whose partner spot is empty is read alone (still with both bit lines' noise); a
  tile facing anything but its mirror is a programming error (``pair_units`` names it).

Without DIFFERENTIAL, positive and negative tiles are read by separate ADCs, each by its
own array's, and each array's converter registers mean exactly what they say.

Speed: tiles that see the same input (same rows of x, same DAC) form one group; every
group's cells are stacked into one zero-padded (groups, columns, rows) tensor, prepared
once per programming, so a layer is one pass of the DAC, one batched matrix product and
one pass of the ADC side that draws one Gaussian per column sum - no Python loop per tile. The
batch runs along the last axis of every array (a layer may have 9 rows and 5 columns;
a chunk of the batch has thousands of vectors), and the two passes are compiled loops
(``converter_kernels``).
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .contract.pairing import PairingError, Unit, pair_units, unit_cells
from .contract.program_format import Program

__all__ = ["ConverterPath", "ConverterSettings", "Epilogue", "LayerConverters", "NoiseStream", "PairingError",
           "ReadNoise", "ReadNoiseMap", "Unit", "Windows", "fused_cells", "pair_units", "unit_cells", "weight_bounds"]

# (layer, x (P, in)[, Epilogue]) -> (P, out); (layer, a CONV's Windows[, Epilogue]) -> its output planes (N, out, *O)
LayerProduct = Callable[..., np.ndarray]
TileConductance = Callable[[int, int], np.ndarray]       # (layer, tile) -> (in_count, out_count * S)


CHUNK_SUMS = 1 << 18  # column sums per pass: ~1 MB, so the passes over them stay in cache
MIN_ROWS = 512        # batch rows per chunk at least: wide layers multiply faster (VGG-8: 128 -> 512, -12-15 %)
CHUNK_SET = 4         # chunks come in multiples of this many, of equal size
SQRT2 = math.sqrt(2.0)  # a differential column's read noise: two bit lines' cells read
SCRATCH_KEEP = 1 << 24  # floats (64 MB): a worker keeps working arrays up to this size for the next chunk

_pool_lock = threading.Lock()
_chunk_pool: tuple[int, ThreadPoolExecutor] | None = None  # (pid, pool)


def _torch():
    import torch  # deferred: a chip that never runs a program does not pay for the import

    return torch


def _kernels():
    from . import converter_kernels  # deferred like torch: numba's import and compiled code load on first use

    return converter_kernels


def _pool() -> ThreadPoolExecutor:
    """Worker threads for a batch's chunks, one per core torch would use, each running
    single-threaded torch; made again after a fork."""
    global _chunk_pool
    with _pool_lock:
        if _chunk_pool is None or _chunk_pool[0] != os.getpid():
            torch = _torch()
            _chunk_pool = (os.getpid(), ThreadPoolExecutor(max(1, torch.get_num_threads()), "nvcim-adc",
                                                           torch.set_num_threads, (1,)))
        return _chunk_pool[1]


def levels(bits: int) -> int:
    """Largest level of a symmetric ``bits``-bit converter (sign included): 2^(b-1) - 1, 1 for b = 1."""
    return max(1, (1 << (bits - 1)) - 1) if bits > 0 else 0


@dataclass(frozen=True)
class ConverterSettings:
    """Every array's converters: resolution (0 = ideal) and full scale (0 = automatic, see module doc)."""

    dac_bits: np.ndarray  # (arrays,) input DAC bits
    adc_bits: np.ndarray  # (arrays,) column ADC bits
    dac_fs: np.ndarray    # (arrays,) input full scale in input units; 0: per vector
    adc_fs: np.ndarray    # (arrays,) ADC full scale, normalised column sum; 0: weight bound
    shift_add: np.ndarray  # (arrays,) bool: the S slice columns of a weight fused before one ADC
    differential: np.ndarray  # (arrays,) bool, equal on both arrays of a pair: 2p's ADCs read 2p minus 2p+1

    def key(self) -> tuple[bytes, ...]:
        """The settings as a hashable value (prepared products are kept while it holds)."""
        arrays = (self.dac_bits, self.adc_bits, self.dac_fs, self.adc_fs, self.shift_add, self.differential)
        return tuple(np.ascontiguousarray(a).tobytes() for a in arrays)

    @classmethod
    def uniform(cls, arrays: int, dac_bits: int = 0, adc_bits: int = 0, dac_fs: float = 0.0,
                adc_fs: float = 0.0, shift_add: bool = False, differential: bool = False) -> ConverterSettings:
        return cls(np.full(arrays, dac_bits, np.int64), np.full(arrays, adc_bits, np.int64),
                   np.full(arrays, dac_fs, np.float64), np.full(arrays, adc_fs, np.float64),
                   np.full(arrays, shift_add, bool), np.full(arrays, differential, bool))


def fused_cells(g: np.ndarray, slices: int, cell_bits: int) -> np.ndarray:
    """A tile's cells (rows, out * S) as analog shift-add reads them: (rows, out), column o
    = sum_j 2^(jK) g[:, o * S + j], the S slice currents weighted by their place values."""
    place = (2.0 ** (cell_bits * np.arange(slices))).astype(g.dtype)
    return g.reshape(g.shape[0], -1, slices) @ place


@dataclass(frozen=True)
class Epilogue:
    """What the digital unit applies to a layer's outputs after its scale: a per-output bias
    (the program's bias ADD) and a RELU, in that order.

    The product applies them in each chunk while its outputs are in cache and on the worker
    threads, instead of two more passes over the whole output afterwards; they are the same
    float32 additions and maxima as the instructions they stand for, so the same bits.
    """

    bias: np.ndarray | None = None  # (out,) float32
    relu: bool = False

    def apply(self, y: np.ndarray) -> None:
        """In place on outputs y whose axis -2 runs over the layer's outputs: (out, k) or (images, out, positions)."""
        if self.bias is not None:
            np.add(y, self.bias[:, None], out=y)
        if self.relu:
            np.maximum(y, np.float32(0), out=y)


class Windows:
    """A CONV's im2col rows, made chunk by chunk where they are used.

    ``view`` is the input's windows as ``ops.windows`` gives them, (N, *O, C, *K), nothing
    copied. The product's worker threads each copy only their own chunk's rows (a few
    hundred KB, in cache), transposed (``columns``), so no thread waits while one copies the
    whole im2col matrix (300 MB for a VGG-8 layer at batch 64). Chunks start at an output
    line (``unit`` rows).
    """

    def __init__(self, view: np.ndarray):
        nd = (view.ndim - 2) // 2
        self.view, self.spatial = view, view.shape[1:1 + nd]
        self.unit = math.prod(self.spatial[1:])
        self.shape = (view.shape[0] * math.prod(self.spatial), math.prod(view.shape[1 + nd:]))

    def group(self, g: int, groups: int) -> Windows:
        """The windows of channel group ``g`` of ``groups``."""
        nd = len(self.spatial)
        c = self.view.shape[1 + nd] // groups
        return Windows(self.view[(slice(None),) * (1 + nd) + (slice(g * c, (g + 1) * c),)])

    def columns(self, a: int, b: int, height: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows a..b transposed, as a (height, b - a) float32 array (``out`` if given): column r - a holds
        row r's features, the rows below the features read 0. a and b are multiples of ``unit`` (b may be the end)."""
        features = self.shape[1]
        if out is None:
            out = np.empty((height, b - a), np.float32)
        out[features:] = 0
        lines, line, end, at = self.spatial[0], a // self.unit, -(-b // self.unit), 0
        while line < end:
            n, o = divmod(line, lines)
            if o == 0 and end - line >= lines:                                # whole images
                piece = self.view[n:n + (end - line) // lines]
            else:                                                             # part of one image
                piece = self.view[n, o:min(lines, o + end - line)]
            lead = piece.ndim - (self.view.ndim - 1 - len(self.spatial))       # the axes that number rows
            count = piece.size // features
            target = np.reshape(out[:features, at:at + count], piece.shape[lead:] + piece.shape[:lead], copy=False)
            target[...] = piece.transpose(*range(lead, piece.ndim), *range(lead))
            at += count
            line += count // self.unit
        return out


class NoiseStream:
    """Independent random streams for the read noise of one run, in a fixed order.

    Seeded from a numpy SeedSequence: the same sequence gives the same streams in the
    same order, hence the same noise; every ``generator()`` (a torch generator) or
    ``keys()`` (Philox keys for ``gaussian_source``) call is a fresh substream.
    """

    def __init__(self, seed: np.random.SeedSequence | int | Sequence[int]):
        self._seed = seed
        self._seq: np.random.SeedSequence | None = None  # made on first use: a run without read noise never pays it

    def _child(self) -> np.random.SeedSequence:
        if self._seq is None:
            seed = self._seed
            self._seq = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
        child, = self._seq.spawn(1)
        return child

    def generator(self):
        return _torch().Generator().manual_seed(int(self._child().generate_state(1, np.uint64)[0] >> 1))

    def keys(self, count: int) -> np.ndarray:
        """``count`` independent 64-bit Philox keys, (count, 2) uint32."""
        return self._child().generate_state(2 * count, np.uint32).reshape(count, 2)


class _Readout:
    """The tiles of one layer that one readout reads (per column, or analog shift-add),
    stacked for one batched product: tiles that see the same input rows through the same
    DAC form a group; each group's ADC columns (a tile's out * S slice columns, or its out
    fused columns) are stacked into one zero-padded (groups, columns, rows) tensor."""

    def __init__(self, program: Program, layer_index: int, units: list[Unit], cells: Callable[[int], np.ndarray],
                 settings: ConverterSettings, adc_bound: np.ndarray, fused: bool):
        torch = _torch()
        layer = program.layers[layer_index]
        k = program.cell_bits
        s = 1 if fused else program.slices                             # ADC columns per weight column
        g_max = float((1 << k) - 1)
        self.place = (2.0 ** (k * np.arange(s))).astype(np.float32)
        # read noise of one ADC column in units of the rows' norm: 1, or the fused places' root sum of squares
        noise_gain = float(np.sqrt(np.sum(4.0 ** (k * np.arange(program.slices))))) if fused else 1.0
        groups: dict[tuple, list[Unit]] = {}
        for unit in units:
            a = unit.array
            t = layer.tiles[unit.tile]
            key = (t.in_start, t.in_count, int(settings.dac_bits[a]), float(settings.dac_fs[a]))
            groups.setdefault(key, []).append(unit)
        keys = sorted(groups)
        self.groups = len(keys)
        rows = max((key[1] for key in keys), default=0)
        width = max((sum(layer.tiles[u.tile].out_count for u in groups[key]) for key in keys), default=0)
        n = self.groups
        g_all = np.zeros((n, rows, width * s), np.float32)
        gather = np.full((n, rows), layer.in_features, np.int64)     # the row of x each reads (in_features: 0)
        col_scale = np.zeros((n, width * s), np.float32)              # read-noise gain / ADC step
        post = np.zeros((n, width), np.float32)                       # sign * ADC step * g_max
        adc_top = np.full((n, width * s), np.nan, np.float32)         # largest ADC level per column (0: ideal)
        out_index = np.full((n, width), layer.out_features, np.int64)  # output of each column group
        self.dac_top = np.zeros(n, np.float32)                        # largest DAC level per group (0: ideal)
        self.dac_fs = np.zeros(n, np.float32)                         # fixed full scale (0: per vector)
        for gi, key in enumerate(keys):
            in_start, in_count, dac_bits, dac_fs = key
            gather[gi, :in_count] = np.arange(in_start, in_start + in_count)
            dac_top = levels(dac_bits)
            self.dac_top[gi], self.dac_fs[gi] = dac_top, dac_fs
            c = 0
            for unit in sorted(groups[key], key=lambda u: (layer.tiles[u.tile].sign, layer.tiles[u.tile].out_start)):
                t = layer.tiles[unit.tile]
                a = unit.array
                bits = int(settings.adc_bits[a])
                fs = float(settings.adc_fs[a]) or float(adc_bound[a])
                top = levels(bits)
                step = fs / top if bits else 1.0
                cols = slice(c * s, (c + t.out_count) * s)
                inv = 1.0 / step if step > 0 else 0.0
                g = unit_cells(unit, cells)
                if fused:
                    g = fused_cells(g.astype(np.float64), program.slices, k)
                g_all[gi, :in_count, cols] = g * (inv / (g_max * (dac_top or 1)))
                col_scale[gi, cols] = inv * noise_gain * (SQRT2 if unit.differential else 1.0)
                adc_top[gi, cols] = top
                post[gi, c:c + t.out_count] = t.sign * step * g_max
                out_index[gi, c:c + t.out_count] = np.arange(t.out_start, t.out_start + t.out_count)
                c += t.out_count
        # the batch runs along the last axis: column sums (groups, columns, P) = cells^T @ drive (groups, rows, P)
        self.cells = torch.from_numpy(np.ascontiguousarray(g_all.transpose(0, 2, 1)))
        self.width = g_all.shape[2]
        self.rows = rows
        self.gather = gather
        self.col_scale = col_scale
        self.post = post
        self.out_index = out_index
        self.rounded = adc_top > 0                    # a finite ADC rounds (padding columns, NaN here, read 0)
        self.adc_top = np.where(self.rounded, adc_top, np.float32(np.inf))

    def add(self, x: np.ndarray, out: np.ndarray, span: int, read_noise: float, key: np.ndarray) -> None:
        """out (out + 1, P) += these tiles' digital outputs for the batch x (features, P), ``span`` groups at a time.

        x is the batch transposed, zero from row in_features down (the row padding rows read);
        ``key`` (2,) uint32 keys the read noise's draws (unused without read noise).
        """
        torch = _torch()
        p = x.shape[1]
        u = _scratch("drive", (self.groups, self.rows, p))
        scale, sigma = _scratch("scale", (self.groups, p)), _scratch("sigma", (self.groups, p))
        kernels = _kernels()
        kernels.drive(x, self.gather, self.dac_top, self.dac_fs, u, scale, sigma)
        sigma *= np.float32(read_noise)
        drive = torch.from_numpy(u)
        for g0 in range(0, self.groups, span):
            g = slice(g0, g0 + span)
            cells = self.cells[g]
            sums = _scratch("sums", (cells.shape[0], cells.shape[1], p))
            torch.bmm(cells, drive[g], out=torch.from_numpy(sums))                # ADC input in steps
            kernels.convert(sums, key if read_noise > 0 else _QUIET, g0, sigma[g], self.col_scale[g],
                            self.rounded[g], self.adc_top[g], self.place, self.post[g], scale[g],
                            self.out_index[g], out)


_QUIET = np.empty(0, np.uint32)  # ``convert``'s key when there is no read noise
_scratch_arrays = threading.local()


def _scratch(name: str, shape: tuple[int, ...]) -> np.ndarray:
    """A float32 working array of ``shape`` (contents undefined), kept per thread and name and reused.

    A chunk's working arrays are the same few MB chunk after chunk; fresh ones are fresh pages
    from the system each time (0.9 ms of a 3.3 ms VGG-8 chunk went to faulting them in).
    """
    size = math.prod(shape)
    if size > SCRATCH_KEEP:                          # a rare huge chunk (a very deep layer): not kept
        return np.empty(shape, np.float32)
    held = getattr(_scratch_arrays, name, None)
    if held is None or held.size < size:
        held = np.empty(size, np.float32)
        setattr(_scratch_arrays, name, held)
    return held[:size].reshape(shape)


class LayerConverters:
    """One layer's tiles prepared for products through their converters.

    ``cells(i)`` is tile i's conductance (in_count, out_count * S); ``settings`` the
    per-array converters; ``adc_bound`` each array's weight bound (used where adc_fs is 0).
    ``units``: what each set of ADCs reads (default ``pair_units`` of the settings). Units on arrays with per-column
    ADCs and units on arrays with analog shift-add readout form one ``_Readout`` each; the
    layer's output is their sum.
    """

    def __init__(self, program: Program, layer_index: int, cells: Callable[[int], np.ndarray],
                 settings: ConverterSettings, adc_bound: np.ndarray, units: list[Unit] | None = None):
        layer = program.layers[layer_index]
        if units is None:
            units = pair_units(program, settings.differential)[layer_index]
        self.out_features = layer.out_features
        self.in_features = layer.in_features
        self.scale = np.ascontiguousarray(np.broadcast_to(np.asarray(layer.scale, np.float32), (layer.out_features,)))
        fused = [bool(settings.shift_add[u.array]) for u in units]
        self.readouts = [_Readout(program, layer_index, [u for u, f in zip(units, fused) if f == mode], cells,
                                  settings, adc_bound, mode) for mode in (False, True) if mode in fused]
        self.height = layer.in_features + 1                           # the inputs, then the zero row padding reads
        self.sums = sum(r.groups * r.width for r in self.readouts)   # ADC samples per input vector
        self.macs = sum(r.groups * r.rows * r.width for r in self.readouts)  # multiply-adds per input vector

    def product(self, x: np.ndarray | Windows, read_noise: float = 0.0, noise: NoiseStream | None = None,
                epilogue: Epilogue | None = None) -> np.ndarray:
        """The layer's output through the converters: (P, out) for inputs x (P, in), the transposed
        view of an (out, P) array (the batch runs along the last axis throughout); for a CONV's
        ``Windows``, its output planes (N, out, *positions), written in place by the chunks,
        each applying ``epilogue`` (if given) to its outputs.

        The batch is cut into chunks of about ``CHUNK_SUMS`` column sums, so the passes over
        them (noise, rounding, shift-add) run in cache, on the worker threads (a CONV's
        chunk starts at an output line; each worker copies its own windows). With read
        noise each chunk draws under its own keys, one per readout, taken from ``noise`` in
        chunk order: the same stream gives the same result whatever the threads do.
        """
        if read_noise > 0 and noise is None:
            raise ValueError("read noise needs a NoiseStream")
        if isinstance(x, Windows):
            unit, take = x.unit, lambda a, b, buffer: x.columns(a, b, self.height, buffer)
        else:
            unit, take = 1, lambda a, b, buffer: _transposed(x[a:b], buffer)
        p = x.shape[0]
        budget = max(MIN_ROWS, CHUNK_SUMS // max(1, self.sums))   # rows per chunk (sizes the passes)
        chunks = -(-p // budget)
        if chunks > 1:   # a multiple of CHUNK_SET equal chunks: 1, 2 or 4 workers finish together (never
            chunks = -(-chunks // CHUNK_SET) * CHUNK_SET     # the worker count: chunks fix the noise streams)
        rows = -(-p // chunks)
        rows = -(-rows // unit) * unit                       # a CONV's chunk starts at an output line
        cuts = list(range(0, p, rows)) + [p]
        keys = [noise.keys(len(self.readouts)) if read_noise > 0 else None for _ in cuts[:-1]]
        if isinstance(x, Windows):                           # each chunk writes its part of each image's planes
            images, positions = x.view.shape[0], p // x.view.shape[0]
            y = np.empty((images, self.out_features, positions), np.float32)
            parts = [_plane_parts(y, a, b) for a, b in zip(cuts[:-1], cuts[1:])]
        else:                                                # outputs x batch rows
            y = np.empty((self.out_features, p), np.float32)
            parts = [[(y[:, a:b], 0)] for a, b in zip(cuts[:-1], cuts[1:])]
        jobs = [(take, a, b, part, budget, read_noise, key, epilogue)
                for a, b, part, key in zip(cuts[:-1], cuts[1:], parts, keys)]
        if len(jobs) == 1:
            self._chunk(*jobs[0])
        else:
            for future in [_pool().submit(self._chunk, *job) for job in jobs]:
                future.result()
        return y.reshape(y.shape[:2] + x.spatial) if isinstance(x, Windows) else y.T

    def _chunk(self, take: Callable, a: int, b: int, parts: list[tuple[np.ndarray, int]], rows: int,
               read_noise: float, keys: np.ndarray | None, epilogue: Epilogue | None) -> None:
        """The product for the batch rows a..b, ``take(a, b, buffer)`` their inputs (in buffer), written
        to ``parts``: (out, k) views, each the outputs of k consecutive rows from the row its int gives
        (counted from a). ``rows`` sizes the passes (the same for every batch: a sample's groups are
        summed in the same order alone or in a batch)."""
        x = take(a, b, _scratch("x", (self.height, b - a)))                      # (features, batch rows)
        out = _scratch("out", (self.out_features + 1, b - a))                    # outputs x batch rows
        out[...] = 0
        for i, r in enumerate(self.readouts):
            span = max(1, CHUNK_SUMS // (rows * max(1, r.width)))                # groups per pass
            r.add(x, out, span, read_noise, keys[i] if keys is not None else _QUIET)
        for target, first in parts:
            if target.ndim == 3:                                                 # whole images' planes
                images, outputs, positions = target.shape
                planes = out[:outputs, first:first + images * positions].reshape(outputs, images, positions)
                np.multiply(planes.transpose(1, 0, 2), self.scale[:, None], out=target)
            else:
                np.multiply(out[:self.out_features, first:first + target.shape[1]], self.scale[:, None], out=target)
            if epilogue is not None:
                epilogue.apply(target)


def _plane_parts(y: np.ndarray, a: int, b: int) -> list[tuple[np.ndarray, int]]:
    """Where batch rows a..b of a CONV go in its output planes y (N, out, positions): (view, the
    first of its rows counted from a), a part image's (out, k) view, a run of whole images' (k, out, positions)."""
    positions = y.shape[2]
    parts, row = [], a
    while row < b:
        n, at = divmod(row, positions)
        if at == 0 and b - row >= positions:                                  # whole images
            k = (b - row) // positions
            parts.append((y[n:n + k], row - a))
            row += k * positions
        else:
            end = min(b, (n + 1) * positions)
            parts.append((y[n, :, at:end - n * positions], row - a))
            row = end
    return parts


def _transposed(x: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``out`` (height, P) = x (P, in) transposed: the batch along the last axis, zero rows below the inputs."""
    out[:x.shape[1]] = x.T
    out[x.shape[1]:] = 0
    return out


def weight_bounds(program: Program, conductance: TileConductance, arrays: int,
                  shift_add: np.ndarray | None = None, units: list[list[Unit]] | None = None) -> np.ndarray:
    """Each array's ADC weight bound: max over the units its ADCs read (``units``, default every tile
    alone) of max_j sum_i |g_ij| / g_max, of a differential unit's difference, for an array in
    ``shift_add`` of its fused columns (``fused_cells``)."""
    g_max = float((1 << program.cell_bits) - 1)
    bound = np.zeros(arrays, np.float64)
    if units is None:
        units = pair_units(program, np.zeros(arrays, bool))
    for li, layer_units in enumerate(units):
        for unit in layer_units:
            g = unit_cells(unit, lambda i, li=li: conductance(li, i))
            a = unit.array
            if shift_add is not None and shift_add[a]:
                g = fused_cells(g.astype(np.float64), program.slices, program.cell_bits)
            if g.size:
                bound[a] = max(bound[a], float(np.abs(g).sum(axis=0, dtype=np.float64).max()) / g_max)
    return bound


class ConverterPath:
    """A program's layers prepared for products through their arrays' converters.

    Valid for one set of cells and settings: ``conductance(layer, tile)`` returns the
    tile's cells (in_count, out_count * S). The arrays' weight bounds are found once, each
    layer is prepared on its first product.
    """

    def __init__(self, program: Program, conductance: TileConductance, settings: ConverterSettings,
                 units: list[list[Unit]] | None = None):
        self.program, self.conductance, self.settings = program, conductance, settings
        self.units = pair_units(program, settings.differential) if units is None else units
        self.bound = weight_bounds(program, conductance, len(settings.dac_bits), settings.shift_add, self.units)
        self._layers: dict[int, LayerConverters] = {}

    def layer(self, index: int) -> LayerConverters:
        plan = self._layers.get(index)
        if plan is None:
            plan = self._layers[index] = LayerConverters(
                self.program, index, lambda i: self.conductance(index, i), self.settings, self.bound,
                self.units[index])
        return plan

    def product(self, read_noise: float = 0.0, noise: NoiseStream | None = None) -> LayerProduct:
        """The layer product of one run: its read noise from ``noise``, layer after layer."""
        if read_noise > 0 and noise is None:
            raise ValueError("read noise needs a NoiseStream")
        return lambda index, x, epilogue=None: self.layer(index).product(x, read_noise, noise, epilogue)


class ReadNoiseMap:
    """Read noise of a layer read through ideal converters, collapsed to one Gaussian per output.

    With ideal converters every column sum's noise passes linearly to the output, so the
    noise on output o is Gaussian with variance
        (scale_o * read_noise * g_max)^2 * sum over tiles t covering o of sum_j 4^(jK) * ||x_rows(t)||^2
    (each tile read, positive and negative alike, adds its own). ``rows`` (in, R) sums x^2
    over each distinct row block of the tiles, ``cover`` (R, out) counts the tiles of each
    row block over each output times sum_j 4^(jK); std = scale * read_noise * g_max * sqrt(x^2 @ rows @ cover).
    In differential readout a tile without a mirror still has its partner bit lines read:
    ``doubled`` lists those tiles, each counted twice.
    """

    def __init__(self, program: Program, layer_index: int, doubled: frozenset[int] = frozenset()):
        layer = program.layers[layer_index]
        k, s = program.cell_bits, program.slices
        self.g_max = float((1 << k) - 1)
        blocks = sorted({(t.in_start, t.in_count) for t in layer.tiles})
        where = {b: i for i, b in enumerate(blocks)}
        self.rows = np.zeros((layer.in_features, len(blocks)), np.float32)
        for i, (start, count) in enumerate(blocks):
            self.rows[start:start + count, i] = 1
        places = float(sum(4.0 ** (j * k) for j in range(s)))
        self.cover = np.zeros((len(blocks), layer.out_features), np.float32)
        for i, t in enumerate(layer.tiles):
            self.cover[where[(t.in_start, t.in_count)], t.out_start:t.out_start + t.out_count] += \
                places * (2 if i in doubled else 1)
        self.scale = np.broadcast_to(np.asarray(layer.scale, np.float32), (layer.out_features,))

    def std(self, x: np.ndarray, read_noise: float) -> np.ndarray:
        """Per-output noise std (..., out) for inputs x (..., in)."""
        return self.std_from_norms(np.square(x, dtype=np.float32) @ self.rows, read_noise)

    def std_from_norms(self, norms: np.ndarray, read_noise: float) -> np.ndarray:
        """Per-output noise std (..., out) from the inputs' squared norms over the row blocks (..., R)."""
        return np.sqrt(norms @ self.cover) * (self.scale * np.float32(read_noise * self.g_max))


@dataclass
class ReadNoise:
    """Read noise of one run through ideal converters: one Gaussian per output of every
    crossbar product (``ReadNoiseMap``), drawn from ``stream`` product after product."""

    sigma: float
    stream: NoiseStream
    maps: Callable[[int], ReadNoiseMap]

    def draw(self, std: np.ndarray) -> np.ndarray:
        """Noise of the given std (any shape), float32."""
        torch = _torch()
        z = torch.empty(std.shape).normal_(generator=self.stream.generator())
        return z.mul_(torch.from_numpy(np.ascontiguousarray(std, dtype=np.float32))).numpy()
