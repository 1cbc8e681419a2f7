"""Cell physics: what one write pulse, one read and one write-verify loop do to a cell.

Conductances are in units where one cell's maximum conductance g_max = 2^K - 1, so an
ideal cell programmed to state t reads exactly t. A write pulse aimed at target t lands
at g = t + dg with dg ~ N(0, (sigma_t * g_max)^2) (the seeds' Gaussian model).

Write-verify follows the two-step program-and-verify scheme of real multilevel devices
(Shim et al. 2020): after the first pulse the cell is read; while it is out of
tolerance, a corrective pulse aims at the remaining error e and lands with an error of
std VERIFY_STEP_REL * |e| + VERIFY_FLOOR * g_max. With sigma = 0.3 and the default
tolerance 0.06 * g_max, a cell takes 2.1 write pulses (and as many verify reads) on
average, 99.9 % settle within 4, and the post-verify std is 0.030 * g_max.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .contract.device import DeviceSettings

VERIFY_STEP_REL = 0.2  # a corrective pulse's error std, relative to the step it takes
VERIFY_FLOOR = 0.01    # ... plus this floor, in units of g_max

# Modelled cost of one pulse, accumulated in the CNT_BUSY_NS / CNT_ENERGY_PJ counters.
# Cells are pulsed one at a time (no row-parallel programming): the figures compare
# programming policies, they do not claim a particular silicon's speed.
WRITE_PULSE_NS, WRITE_PULSE_PJ = 100, 10   # a SET/RESET pulse, typical of filamentary RRAM
READ_PULSE_NS, READ_PULSE_PJ = 10, 1       # a verify read or read-after-write


def pulse_cost(write_pulses: int, read_pulses: int) -> tuple[int, int]:
    """(busy ns, energy pJ) of the given numbers of write and read pulses."""
    return (write_pulses * WRITE_PULSE_NS + read_pulses * READ_PULSE_NS,
            write_pulses * WRITE_PULSE_PJ + read_pulses * READ_PULSE_PJ)


@dataclass(frozen=True)
class DeviceModel(DeviceSettings):
    """The device settings (contract.device) with what they do to cells: pulse, settle, read."""

    def pulse(self, targets: np.ndarray, rng: np.random.Generator, stuck: np.ndarray | None = None,
              levels: np.ndarray | None = None) -> np.ndarray:
        """One open-loop write pulse per cell: the conductances the cells land at.

        ``stuck``: per cell, NaN for a healthy cell, else the conductance it is stuck at.
        ``levels``: per cell, the level of its weight (the per-weight-magnitude presets need it).
        """
        t = targets.astype(np.float32)
        noise = rng.standard_normal(t.shape, dtype=np.float32)
        return self.settle(t + noise * np.float32(self.g_max) * self.cell_sigmas(targets, levels), stuck)

    def settle(self, g: np.ndarray, stuck: np.ndarray | None) -> np.ndarray:
        """Apply the device's limits to freshly pulsed conductances: clipping, stuck cells."""
        if self.clip:
            g = np.clip(g, np.float32(0), np.float32(self.g_max))
        if stuck is not None:
            g = np.where(np.isnan(stuck), g, stuck)
        return g

    def read(self, g: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """What a read pulse returns: the conductance plus read noise, if any."""
        if self.read_noise == 0.0:
            return g
        return g + rng.standard_normal(g.shape, dtype=np.float32) * np.float32(self.read_noise * self.g_max)


@dataclass
class VerifyResult:
    g: np.ndarray           # final conductances
    pulses: np.ndarray      # write pulses per cell (first pulse included)
    reads: np.ndarray       # verify reads per cell
    last_read: np.ndarray   # what each cell's last verify read returned (its captured value)
    failed: np.ndarray      # bool, cells still out of tolerance after max_iter


def write_verify(model: DeviceModel, targets: np.ndarray, tol: float, max_iter: int,
                 rng: np.random.Generator, stuck: np.ndarray | None = None,
                 levels: np.ndarray | None = None) -> VerifyResult:
    """Program cells with write-verify; vectorised over the cells still out of tolerance.

    Each round reads every pending cell (one read pulse each) and re-pulses those
    outside +-tol*g_max; ``max_iter`` bounds the corrective pulses per cell.
    """
    g_max = np.float32(model.g_max)
    t = targets.astype(np.float32).ravel()
    g = model.pulse(targets, rng, stuck, levels).ravel()
    stuck = None if stuck is None else stuck.ravel()
    pulses = np.ones(t.shape, dtype=np.int32)
    reads = np.zeros(t.shape, dtype=np.int32)
    pending = np.arange(t.size)
    last_read = np.empty_like(g)
    for round_ in range(max_iter + 1):
        seen = model.read(g[pending], rng)
        last_read[pending] = seen
        err = t[pending] - seen
        reads[pending] += 1
        out = np.abs(err) > tol * g_max
        pending, err = pending[out], err[out]
        if pending.size == 0 or round_ == max_iter:
            break
        step_std = (VERIFY_STEP_REL * np.abs(err) + VERIFY_FLOOR * g_max).astype(np.float32)
        g[pending] = model.settle(g[pending] + err + rng.standard_normal(pending.size, dtype=np.float32) * step_std,
                                  None if stuck is None else stuck[pending])
        pulses[pending] += 1
    failed = np.zeros(t.shape, dtype=bool)
    failed[pending] = True
    shape = targets.shape
    return VerifyResult(g.reshape(shape), pulses.reshape(shape), reads.reshape(shape), last_read.reshape(shape),
                        failed.reshape(shape))
