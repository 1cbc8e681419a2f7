"""Pictures of a chip and of a compiled program, for when looking beats reading.

* ``deviation``: per-array heatmaps of programmed conductance minus target.
* ``noise``: histogram of the captured read-after-write noise against the device model's
  curve, a normal of std sigma * g_max (read noise added in quadrature).
* ``verify_iterations``: how many corrective pulses write-verify gave each cell. The
  protocol reports pulses per write, not per cell, so the probe writes one region with
  VERIFY_MAX_ITER = 0, 1, 2, ... from the same SEED: the cells still failing after k
  iterations are exactly those that need more than k, so their differences are the
  per-cell histogram. The last write (the chip's own limit) must then account for every
  corrective pulse; if it does not, the histogram is marked approximate.
* ``tile_usage``: which rows and columns of which arrays each layer's tiles occupy.

Figures are drawn with matplotlib's object API on an Agg canvas (no pyplot, no global
backend, no display needed) and written as PNG.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from nvcim.firmware_emu.contract.program_format import Program
from nvcim.firmware_emu.contract.protocol import CellQuantity
from nvcim.firmware_emu.contract.registers import Q16, DeviceModelCode, field

from .regs import identity_fields

MAX_PANELS = 16  # arrays drawn in one deviation figure
FREE_COLOUR = (0.93, 0.93, 0.93)
_PROGRAM_LOADED = field("STATUS", "PROGRAM_LOADED").mask


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110)
    return path


def g_max(dev) -> float:
    return float((1 << identity_fields(dev)["cell_bits"]) - 1)


@dataclass(frozen=True)
class Region:
    row: int
    col: int
    rows: int
    cols: int

    @classmethod
    def whole(cls, dev) -> Region:
        ident = identity_fields(dev)
        return cls(0, 0, ident["rows"], ident["cols"])

    def label(self) -> str:
        return f"rows {self.row}..{self.row + self.rows - 1}, cols {self.col}..{self.col + self.cols - 1}"


@dataclass(frozen=True)
class ChipSettings:
    """The registers a picture's caption needs."""

    seed: int
    sigma: float
    read_noise: float
    model: str

    @classmethod
    def read(cls, dev) -> ChipSettings:
        code = dev.read_register("DEVICE_MODEL")
        model = DeviceModelCode(code).name if code in DeviceModelCode._value2member_map_ else str(code)
        return cls(dev.read_register("SEED"), dev.read_register("SIGMA") / Q16,
                   dev.read_register("READ_NOISE") / Q16, model)

    def caption(self) -> str:
        noise = f", read noise {self.read_noise:g}" if self.read_noise else ""
        return f"{self.model}, sigma {self.sigma:.3f}{noise}, seed {self.seed}"


def program_arrays(dev) -> list[int]:
    """Arrays the chip's loaded program occupies (empty when none is loaded)."""
    if not dev.read_register("STATUS") & _PROGRAM_LOADED:
        return []
    program = dev.fetch_program()
    return sorted({t.array for layer in program.layers for t in layer.tiles})


def read_region(dev, array: int, region: Region, quantity: CellQuantity) -> np.ndarray:
    return dev.read_cells(array, region.row, region.col, region.rows, region.cols, quantity)


# -- deviation heatmaps ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ArrayDeviation:
    array: int
    deviation: np.ndarray   # (g - target) / g_max
    programmed: int         # cells with a target or a captured deviation

    @property
    def std(self) -> float:
        return float(self.deviation.std())

    @property
    def max_abs(self) -> float:
        return float(np.abs(self.deviation).max())


def deviations(dev, arrays: list[int], region: Region) -> list[ArrayDeviation]:
    """Conductance minus target of each array's region, in units of g_max (a real read of every cell)."""
    gm = g_max(dev)
    out = []
    for a in arrays:
        g = read_region(dev, a, region, CellQuantity.CONDUCTANCE)
        t = read_region(dev, a, region, CellQuantity.TARGET)
        noise = read_region(dev, a, region, CellQuantity.NOISE)
        out.append(ArrayDeviation(a, (g - t) / gm, int(np.count_nonzero((t != 0) | (noise != 0)))))
    return out


def plot_deviation(devs: list[ArrayDeviation], region: Region, settings: ChipSettings, path: Path) -> Path:
    """One heatmap per array on a shared, symmetric colour scale."""
    n = len(devs)
    ncols = min(4, n)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(3.6 * ncols + 1.4, 3.4 * nrows + 0.9), layout="constrained")
    limit = max(max(d.max_abs for d in devs), 1e-6)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    image = None
    for ax, d in zip(axes.flat, devs):
        extent = (region.col - 0.5, region.col + region.cols - 0.5, region.row + region.rows - 0.5, region.row - 0.5)
        image = ax.imshow(d.deviation, cmap="RdBu_r", vmin=-limit, vmax=limit, extent=extent,
                          interpolation="nearest", aspect="auto")
        ax.set_title(f"array {d.array}: std {d.std:.3f}, max |dev| {d.max_abs:.3f}", fontsize=9)
        ax.set_xlabel("column (bit line)", fontsize=8)
        ax.set_ylabel("row (word line)", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    bar = fig.colorbar(image, ax=axes, shrink=0.9)
    bar.set_label("g - target  (units of g_max)")
    fig.suptitle(f"Conductance deviation, {region.label()}\n{settings.caption()}", fontsize=10)
    return _save(fig, path)


# -- noise histogram -------------------------------------------------------------------------------
@dataclass(frozen=True)
class NoiseSample:
    values: np.ndarray     # captured noise of pulsed cells, units of g_max
    model_std: float       # the device model's std, units of g_max

    @property
    def std(self) -> float:
        return float(self.values.std()) if self.values.size else 0.0


def captured_noise(dev, arrays: list[int], region: Region, settings: ChipSettings) -> NoiseSample:
    """The read-after-write deviations of the region's pulsed cells (a never-pulsed cell reads exactly 0)."""
    gm = g_max(dev)
    parts = [read_region(dev, a, region, CellQuantity.NOISE) for a in arrays]
    values = np.concatenate([p[p != 0] for p in parts]) / gm
    return NoiseSample(values.astype(np.float64), math.hypot(settings.sigma, settings.read_noise))


def plot_noise(sample: NoiseSample, settings: ChipSettings, path: Path) -> Path:
    fig = Figure(figsize=(7, 4.4), layout="constrained")
    ax = fig.subplots()
    if sample.values.size:
        span = max(4 * sample.model_std, float(np.abs(sample.values).max()), 1e-3)
        ax.hist(sample.values, bins=80, range=(-span, span), density=True, color="tab:blue", alpha=0.6,
                label=f"captured, {sample.values.size} cells (std {sample.std:.3f})")
        if sample.model_std > 0:
            x = np.linspace(-span, span, 400)
            pdf = np.exp(-0.5 * (x / sample.model_std) ** 2) / (sample.model_std * math.sqrt(2 * math.pi))
            ax.plot(x, pdf, color="tab:red", lw=2, label=f"device model N(0, {sample.model_std:.3f}^2)")
        ax.legend(fontsize=8, loc="upper right")
    else:
        ax.text(0.5, 0.5, "no pulsed cell in the region", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("captured noise: read-after-write g - target (units of g_max)")
    ax.set_ylabel("probability density")
    note = "" if settings.model == "GAUSSIAN" else " (preset: state-dependent; the curve has its average variance)"
    ax.set_title(f"Programming noise vs the device model\n{settings.caption()}{note}", fontsize=10)
    return _save(fig, path)


# -- verify iterations -------------------------------------------------------------------------------
@dataclass(frozen=True)
class VerifyHistogram:
    counts: np.ndarray     # counts[j]: cells that settled after exactly j corrective pulses
    never: int             # cells still outside tolerance after VERIFY_MAX_ITER
    max_iter: int
    cells: int
    corrective_pulses: int  # what the chip reported for the write with its own limit
    exact: bool            # the histogram accounts for exactly that many pulses

    @property
    def mean(self) -> float:
        j = np.arange(self.counts.size)
        return float((j * self.counts).sum() + self.never * self.max_iter) / max(1, self.cells)


def verify_iterations(dev, array: int, row: int, col: int, targets: np.ndarray) -> VerifyHistogram:
    """Write-verify ``targets`` with VERIFY_MAX_ITER = 0, 1, ... from the same SEED (see the module doc).

    The region is left programmed as one write-verify from that SEED would leave it;
    SEED and VERIFY_MAX_ITER are restored (writing SEED reseeds the chip's random state).
    """
    seed, max_iter = dev.read_register("SEED"), dev.read_register("VERIFY_MAX_ITER")
    failing: list[int] = []
    try:
        for k in range(max_iter + 1):
            dev.write_register("VERIFY_MAX_ITER", k)
            dev.write_register("SEED", seed)
            stats = dev.write_cells(array, row, col, targets, verify=True)
            failing.append(stats.verify_failures)
            if stats.verify_failures == 0:
                break
    finally:
        dev.write_register("VERIFY_MAX_ITER", max_iter)
        dev.write_register("SEED", seed)
    cells = targets.size
    before = np.array([cells] + failing[:-1])
    counts = before - np.array(failing)
    never = failing[-1]
    corrective = stats.write_pulses - stats.cells
    accounted = int((np.arange(counts.size) * counts).sum()) + never * max_iter
    return VerifyHistogram(counts, never, max_iter, cells, corrective, accounted == corrective)


def plot_verify(hist: VerifyHistogram, settings: ChipSettings, tol: float, path: Path) -> Path:
    fig = Figure(figsize=(7, 4.4), layout="constrained")
    ax = fig.subplots()
    j = np.arange(hist.counts.size)
    ax.bar(j, hist.counts, color="tab:blue", label="settled")
    for x, c in zip(j, hist.counts):
        if c:
            ax.annotate(str(int(c)), (x, c), ha="center", va="bottom", fontsize=8)
    if hist.never:
        ax.bar([hist.counts.size], [hist.never], color="tab:red",
               label=f"still out of tolerance after {hist.max_iter}")
        ax.annotate(str(hist.never), (hist.counts.size, hist.never), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(j) + ([hist.counts.size] if hist.never else []),
                  [str(x) for x in j] + (["fail"] if hist.never else []))
    ax.set_xlabel("corrective pulses per cell (write-verify iterations)")
    ax.set_ylabel("cells")
    ax.legend(fontsize=8)
    exact = "" if hist.exact else "  [approximate: the chip did not reproduce the writes]"
    ax.set_title(f"Write-verify iterations of {hist.cells} cells: mean {hist.mean:.2f}, tolerance "
                 f"{tol:.3f} g_max{exact}\n{settings.caption()}", fontsize=10)
    return _save(fig, path)


# -- tile usage ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerUsage:
    name: str
    tiles: int
    arrays: tuple[int, ...]
    cells: int


def tile_usage(program: Program) -> tuple[np.ndarray, list[LayerUsage]]:
    """Per used array, the layer (index + 1, 0 = free) owning each cell; and per-layer totals."""
    used = sorted({t.array for layer in program.layers for t in layer.tiles})
    index = {a: i for i, a in enumerate(used)}
    owner = np.zeros((len(used), program.array_rows, program.array_cols), dtype=np.int32)
    usage = []
    s = program.slices
    for li, layer in enumerate(program.layers):
        cells = 0
        for t in layer.tiles:
            owner[index[t.array], t.row:t.row + t.in_count, t.col:t.col + t.out_count * s] = li + 1
            cells += t.in_count * t.out_count * s
        usage.append(LayerUsage(layer.name, len(layer.tiles), tuple(sorted({t.array for t in layer.tiles})), cells))
    return owner, usage


def plot_tiles(program: Program, path: Path, title: str) -> Path:
    owner, usage = tile_usage(program)
    arrays = sorted({t.array for layer in program.layers for t in layer.tiles})
    n = len(arrays)
    if n == 0:
        raise ValueError("the program places no layer on the crossbars: no tile to draw")
    ncols = min(8, math.ceil(math.sqrt(n)))
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(max(6.0, 2.2 * ncols + 0.6), 2.2 * nrows + 1.2 + 0.2 * math.ceil(len(usage) / 3)),
                 layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    tab20 = colormaps["tab20"].colors
    palette = tab20[0::2] + tab20[1::2]  # strong colours first: neighbouring layers stay apart
    colours = [FREE_COLOUR] + [palette[i % len(palette)] for i in range(len(usage))]
    slot = {a: i for i, a in enumerate(arrays)}
    s = program.slices
    cmap = ListedColormap(colours)
    for ax, (i, a) in zip(axes.flat, enumerate(arrays)):
        ax.imshow(owner[i], cmap=cmap, vmin=-0.5, vmax=len(usage) + 0.5, interpolation="nearest")
        for layer in program.layers:  # outline every tile, so a layer's tiles stay apart
            for t in layer.tiles:
                if slot[t.array] == i:
                    ax.add_patch(Rectangle((t.col - 0.5, t.row - 0.5), t.out_count * s, t.in_count, fill=False,
                                           edgecolor="white", linewidth=0.8))
        share = np.count_nonzero(owner[i]) / owner[i].size
        ax.set_title(f"array {a} ({share:.0%})", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    handles = [Patch(color=colours[li + 1], label=f"{u.name}: {u.tiles} tile{'s' * (u.tiles != 1)}, {u.cells} cells")
               for li, u in enumerate(usage)]
    handles.append(Patch(color=colours[0], label="free"))
    fig.legend(handles=handles, loc="outside lower center", ncols=min(3, len(handles)), fontsize=7,
               title="layer (white outlines: tiles)", title_fontsize=8)
    fig.suptitle(f"{title}: tiles of {len(usage)} layers on {n} arrays of {program.array_rows}x{program.array_cols}\n"
                 f"rows: inputs, columns: outputs x {program.slices} cell slices", fontsize=9)
    return _save(fig, path)
