"""What the per-tile references of the converter tests share: the cell geometry they are
written for (M = 8-bit weights in S = 4 slices of K = 2 bits, g_max = 3), analog shift-add
written out with loops, and the comparison they make against the batched product."""

import numpy as np

K, M = 2, 8
S = M // K
G_MAX = 3.0
PLACE = 4.0 ** np.arange(S)


def fused_columns(g):
    """A tile's weight columns as analog shift-add sums them: column o = sum_j 4^j g[:, o*S + j]."""
    g = g.astype(np.float64)
    w = np.zeros((g.shape[0], g.shape[1] // S))
    for o in range(w.shape[1]):
        for j in range(S):
            w[:, o] += 4.0 ** j * g[:, o * S + j]
    return w


def agree(got, want, step):
    """Equal to float rounding: everywhere within 1e-4 relative of the range, except a few
    elements at most a couple of ADC steps (``step``, in output units) apart."""
    off = np.abs(got - want) > 1e-4 * np.abs(want).max()
    assert off.mean() < 0.01, f"{off.mean():.2%} of outputs disagree"
    assert np.abs(got - want).max() <= 2.01 * step
