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


def read(xr, g, settings, a, bound, noise=None):
    """Array ``a`` reading cells g (rows, columns) for the input rows xr, in float64 as the datasheet
    states it: the DAC (fixed or per-vector full scale), the column sums plus ``noise(u)``, the ADC
    (fixed full scale, else ``bound[a]``); in output units (times the DAC scale and g_max)."""
    xr = xr.astype(np.float64)
    fs = settings.dac_fs[a] if settings.dac_fs[a] > 0 else np.abs(xr).max(axis=1, keepdims=True)
    fs = np.where(fs > 0, fs, 1.0)
    u = xr / fs
    if settings.dac_bits[a]:
        top = max(1, 2 ** (int(settings.dac_bits[a]) - 1) - 1)
        u = np.rint(np.clip(u, -1, 1) * top) / top
    s = u @ g / G_MAX
    if noise is not None:
        s = s + noise(u)
    if settings.adc_bits[a]:
        full = settings.adc_fs[a] if settings.adc_fs[a] > 0 else bound[a]
        top = max(1, 2 ** (int(settings.adc_bits[a]) - 1) - 1)
        s = np.rint(np.clip(s, -full, full) / full * top) * full / top
    return s * fs * G_MAX


def assert_same_alone_or_in_a_batch(plan, seed: int) -> None:
    """A layer plan gives a sample the same bits alone as inside a batch of 256 with a loud neighbour."""
    x = np.random.default_rng(seed).standard_normal((256, plan.in_features)).astype(np.float32)
    x[17] *= 40                                               # an outlier in the batch must not move the others
    batch = plan.product(x)
    for i in (0, 17, 255):
        assert np.array_equal(plan.product(x[i:i + 1])[0], batch[i])
