"""The converter path's two per-element passes, each one compiled loop (numba).

A layer's product through its converters is a batched matrix product (torch, in
``converters``) between two passes: the DAC over every input element (the vector's full
scale, quantisation, the read noise's gain) and the ADC side over every column sum (read
noise, rounding and clipping, shift-add, digital scaling, the sum into the outputs). The
ADC pass draws each sample's read noise where it adds it (``gaussian_source``), so the
draws never go through memory.
Written as torch operations each pass took ten sweeps over memory, and on layers of a few
rows and columns far more time than the product itself. Here each is one loop nest that
reads its inputs once; the batch runs along the innermost axis, so the loops vectorise
however few rows or columns a layer has.

The loops release the GIL (the worker threads run chunks in parallel) and are compiled
without fastmath: every float32 operation happens in the written order, so the same inputs
give the same bits on any machine, and a vector's result never depends on the others in
its batch. numba caches the machine code beside this file, so only a machine's first run
pays the compile (a few seconds).
"""

from __future__ import annotations

import numba
import numpy as np

from .gaussian_source import normals, workspace

__all__ = ["convert", "drive"]


@numba.njit(nogil=True, cache=True)
def drive(x: np.ndarray, gather: np.ndarray, top: np.ndarray, fs: np.ndarray,
          u: np.ndarray, scale: np.ndarray, norm: np.ndarray) -> None:  # pragma: no cover - compiled
    """The DAC's drive of every group of rows, for every input vector.

    x (features, P) float32: the batch's inputs, one column per vector; gather (G, R): the
    row of x each of group g's R rows reads (x's zero row for padding); top (G,): the
    group's DAC's largest level (0: ideal DAC); fs (G,): its input full scale (0: per
    vector, the vector's largest |x| over the group's rows, 1 if they are all 0).
    Writes u (G, R, P): round(clip(x * top / scale, -top, top)), in levels (x / scale for an
    ideal DAC); scale (G, P): what each vector was divided by; norm (G, P): ||u|| / top
    (||u|| for an ideal DAC), each vector's read-noise gain on every column of the group.
    """
    groups, rows = gather.shape
    vectors = x.shape[1]
    gain = np.empty(vectors, np.float32)
    for g in range(groups):
        s, n, level = scale[g], norm[g], top[g]
        if fs[g] > 0:
            s[:] = fs[g]
        else:
            s[:] = 0
            for r in range(rows):
                xr = x[gather[g, r]]
                for p in range(vectors):                 # np.maximum vectorises; a compare and store did not
                    s[p] = np.maximum(s[p], np.abs(xr[p]))
            for p in range(vectors):
                if s[p] == 0:
                    s[p] = 1
        n[:] = 0
        for p in range(vectors):
            gain[p] = (level if level > 0 else 1) / s[p]
        for r in range(rows):
            xr, ur = x[gather[g, r]], u[g, r]
            if level > 0:
                for p in range(vectors):
                    v = np.rint(np.minimum(np.maximum(xr[p] * gain[p], -level), level))
                    ur[p] = v
                    n[p] += v * v
            else:
                for p in range(vectors):
                    v = xr[p] * gain[p]
                    ur[p] = v
                    n[p] += v * v
        for p in range(vectors):
            n[p] = np.sqrt(n[p]) / (level if level > 0 else 1)


@numba.njit(nogil=True, cache=True)
def convert(sums: np.ndarray, key: np.ndarray, first_group: int, sigma: np.ndarray, column_noise: np.ndarray,
            rounded: np.ndarray, adc_top: np.ndarray, place: np.ndarray, post: np.ndarray,
            scale: np.ndarray, out_index: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover - compiled
    """Every column sum through read noise and its ADC, shift-added, scaled and summed into the outputs.

    sums (G, W, P) float32: the column sums in ADC steps; key (2,) uint32: the read noise's
    key (``gaussian_source``; empty: no read noise): column w of group g draws stream
    (w, first_group + g); sigma (G, P): the read noise's std on a column of unit gain;
    column_noise (G, W): each column's gain. rounded (G, W): the
    column's ADC is finite (its sum is rounded to a level); adc_top (G, W): the largest
    level it clips to (inf where ideal). place (S,): the place values the S slice columns of
    a weight (consecutive) are added with (S = 1: fused columns). post (G, W / S): sign x
    ADC step x g_max of each weight column; scale (G, P): each vector's input scale.
    out (outputs + 1, P) += each weight column at its row out_index (G, W / S) (the last
    row: padding columns' sink), groups in order, then columns in order.
    """
    groups, width, vectors = sums.shape
    slices = place.shape[0]
    noisy = key.size > 0
    column = np.empty(vectors, np.float32)
    z = np.zeros(vectors if noisy else 0, np.float32)
    words = np.empty(workspace(vectors) if noisy else 0, np.uint32)
    for g in range(groups):
        spread = sigma[g]
        factor = scale[g]
        for o in range(width // slices):
            for j in range(slices):
                w = o * slices + j
                sw, top, gain, weight = sums[g, w], adc_top[g, w], column_noise[g, w], place[j]
                if noisy:
                    normals(z, words, w, first_group + g, key)
                for p in range(vectors):
                    s = sw[p]
                    if noisy:
                        s += z[p] * spread[p] * gain
                    if rounded[g, w]:
                        s = np.rint(s)
                    if s > top:
                        s = top
                    if s < -top:
                        s = -top
                    if j == 0:
                        column[p] = s * weight
                    else:
                        column[p] += s * weight
            target, k = out[out_index[g, o]], post[g, o]
            for p in range(vectors):
                target[p] += column[p] * k * factor[p]
