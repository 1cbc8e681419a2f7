"""The read noise's Gaussian source: a counter-based generator and a ziggurat, compiled.

Every ADC sample of a product through the converters needs its own standard normal draw,
so on the converter path the draws cost as much as the multiply-adds. torch's generator
(mt19937 and Box-Muller, about 4 ns a draw here) writes them to memory and the ADC pass
reads them back. Here each draw is made where it is used, inside the ADC pass
(``converter_kernels.convert``), from a counter:

* **Philox4x32-10** (Salmon, Moraes, Dror, Shaw: "Parallel random numbers: as easy as
  1, 2, 3", SC 2011; the generator behind cuRAND's and JAX's streams) maps a 128-bit
  counter and a 64-bit key to four 32-bit words through ten rounds of multiplies and
  xors. Word i of counter (b, column, group, 0) under a chunk's key is the draw of batch
  vector i * q + b of that column, q = ceil(vectors / 4). A draw depends on its position
  and the key only, never on which thread makes it or in what order, and the loop over b
  vectorises (AVX2 has the 32 x 32 -> 64-bit multiply).
* **Ziggurat** (Marsaglia and Tsang, "The ziggurat method for generating random
  variables", J. Stat. Softw. 5(8), 2000; 256 layers, with the layer index and the
  uniform taken from separate bits of the word as Doornik, "An improved ziggurat method
  to generate normal random samples", 2005, recommends): bits 0-7 pick a layer, bit 8
  the sign, bits 9-31 a 23-bit uniform. 98.5 % of words are accepted by one compare and
  one multiply in float32; the rest (a wedge, or the tail beyond R = 3.654) take the
  exact rejection tests in float64, the k-th rejected draw of a stream with further words
  from counters (k, column, group, 1), (k, column, group, 2), ...

The integer steps and the float32 fast path are exact IEEE operations, so a draw has the
same bits on any machine; the rare slow path calls the C library's exp and log.
"""

from __future__ import annotations

import math

import numba
import numpy as np

__all__ = ["LAYERS", "TAIL", "normals", "philox", "workspace"]

LAYERS = 256
TAIL = 3.6541528853610088            # R: where the base layer's tail starts (Marsaglia and Tsang, 256 layers)
_AREA = 0.00492867323399             # V: the area of each layer, tail included


def _edges() -> np.ndarray:
    """x[0..256]: layer i spans [0, x[i]] between the density's heights at x[i] and x[i + 1]; x[0] = V / f(R)."""
    f = lambda v: math.exp(-0.5 * v * v)  # noqa: E731 - the unnormalised density
    x = np.zeros(LAYERS + 1)
    x[0], x[1] = _AREA / f(TAIL), TAIL
    for i in range(1, LAYERS - 1):
        x[i + 1] = math.sqrt(-2.0 * math.log(_AREA / x[i] + f(x[i])))
    return x                                                             # x[256] = 0: the top layer's apex


_X = _edges()
_HEIGHT = np.exp(-0.5 * _X * _X)                                         # f(x[i])
# the fast path, by the word's low 9 bits (layer, sign): the layer's signed width / 2^23
_STEP = (np.concatenate([_X[:LAYERS], -_X[:LAYERS]]).astype(np.float32) * np.float32(2.0 ** -23))
# and by its layer: the 23-bit uniforms u below this one give points inside the next layer's width
# (u / 2^23 < x[i + 1] / x[i] in float32), accepted outright
_INNER = np.ceil((_X[1:] / _X[:-1]).astype(np.float32).astype(np.float64) * 2.0 ** 23).astype(np.int32)

_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)                 # Philox4x32's multipliers
_W0, _W1 = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)                 # and its key increments
_LOW = np.uint64(0xFFFFFFFF)
_32 = np.uint64(32)


@numba.njit(inline="always", nogil=True, cache=True)
def philox(c0, c1, c2, c3, k0, k1):  # pragma: no cover - compiled
    """Philox4x32-10: four 32-bit words (as uint64) of counter (c0..c3) under key (k0, k1), all uint64 < 2^32."""
    for _ in range(10):
        p0 = _M0 * c0
        p1 = _M1 * c2
        c0, c1, c2, c3 = ((p1 >> _32) ^ c1 ^ k0) & _LOW, p1 & _LOW, ((p0 >> _32) ^ c3 ^ k1) & _LOW, p0 & _LOW
        k0 = (k0 + _W0) & _LOW
        k1 = (k1 + _W1) & _LOW
    return c0, c1, c2, c3


@numba.njit(nogil=True, cache=True)
def _rejected(k, word, r, c1, c2, k0, k1, step, inner, x, height):  # pragma: no cover - compiled
    """The k-th draw of a stream that the fast test rejected, ``word`` its first word, ``r`` the
    four words of counter (k, c1, c2, 1).

    Its layer's wedge is tested exactly; a rejected point starts over with a fresh word, as
    the ziggurat does; layer 0 beyond R samples the tail (Marsaglia's exponential test).
    Words beyond ``r`` come from counters (k, c1, c2, 2), (k, c1, c2, 3), ...; a fresh word
    takes the fast path's test (``step``, ``inner``) first.
    """
    call = 2
    while True:
        i = word & np.uint64(LAYERS - 1)
        sign = -1.0 if word & np.uint64(LAYERS) else 1.0
        mag = np.float32(word >> np.uint64(9)) * np.float32(2.0 ** -23)
        if i == 0:                                                       # the tail beyond R
            while True:
                t = -math.log((np.float64(r[1]) + 0.5) * 2.0 ** -32) / x[1]
                e = -math.log((np.float64(r[2]) + 0.5) * 2.0 ** -32)
                if e + e >= t * t:
                    return np.float32(sign * (x[1] + t))
                r = philox(np.uint64(k), c1, c2, np.uint64(call), k0, k1)
                call += 1
        v = np.float64(mag) * x[i]                                       # the wedge of layer i
        y = height[i] + (np.float64(r[1]) + 0.5) * 2.0 ** -32 * (height[i + 1] - height[i])
        if y < math.exp(-0.5 * v * v):
            return np.float32(sign * v)
        word = r[0]                                                      # start over
        r = philox(np.uint64(k), c1, c2, np.uint64(call), k0, k1)
        call += 1
        u = np.int32(word >> np.uint64(9))
        if u < inner[word & np.uint64(LAYERS - 1)]:
            return np.float32(u) * step[word & np.uint64(2 * LAYERS - 1)]


@numba.njit(nogil=True, cache=True)
def _normals(z, words, c1, c2, k0, k1, step, inner, x, height):  # pragma: no cover - compiled
    n = z.shape[0]
    q = (n + 3) // 4
    for b in range(q):                                                   # Philox, vectorised over b
        r0, r1, r2, r3 = philox(np.uint64(b), c1, c2, np.uint64(0), k0, k1)
        words[b], words[q + b], words[2 * q + b], words[3 * q + b] = r0, r1, r2, r3
    rejected = 0
    at = words[4 * q:]                                                   # where the rejected draws are
    for p in range(n):                                                   # the ziggurat's fast path
        r = words[p]
        u = np.int32(r >> np.uint32(9))
        z[p] = np.float32(u) * step[r & np.uint32(2 * LAYERS - 1)]
        at[rejected] = p
        rejected += np.int64(u >= inner[r & np.uint32(LAYERS - 1)])
    spare = words[4 * q + n:]
    for k in range(rejected):                                            # their next words, vectorised over k
        r0, r1, r2, r3 = philox(np.uint64(k), c1, c2, np.uint64(1), k0, k1)
        spare[4 * k], spare[4 * k + 1], spare[4 * k + 2], spare[4 * k + 3] = r0, r1, r2, r3
    for k in range(rejected):
        p = at[k]
        r = (np.uint64(spare[4 * k]), np.uint64(spare[4 * k + 1]), np.uint64(spare[4 * k + 2]), np.uint64(0))
        z[p] = _rejected(k, np.uint64(words[p]), r, c1, c2, k0, k1, step, inner, x, height)


@numba.njit(inline="always", nogil=True, cache=True)
def normals(z, words, c1, c2, key):  # pragma: no cover - compiled
    """z[:] = standard normal draws (float32) of stream (c1, c2) under ``key`` (2,) uint32;
    ``words`` is working space of at least ``workspace(len(z))`` uint32."""
    _normals(z, words, np.uint64(c1), np.uint64(c2), np.uint64(key[0]), np.uint64(key[1]),
             _STEP, _INNER, _X, _HEIGHT)


@numba.njit(inline="always", nogil=True, cache=True)
def workspace(n):  # pragma: no cover - compiled
    """uint32 words ``normals`` needs for n draws: their words, where rejected ones are, and those's next words."""
    return 4 * ((n + 3) // 4) + 5 * n
