import numpy as np

from nvcim.compiler.quantize import fake_quantize, quantize, slice_levels


def test_levels_follow_the_design_formula():
    w = np.array([[-1.0, 0.5], [0.25, 0.0]])
    q = quantize(w, 8)
    assert q.levels.tolist() == [[255, 128], [64, 0]]  # round(|w| / 1 * 255)
    assert q.signs.tolist() == [[-1, 1], [1, 0]]
    assert np.isclose(q.scale, 1 / 255)
    np.testing.assert_allclose(q.dequantize(), np.sign(w) * q.levels / 255, rtol=1e-6)


def test_quantisation_error_is_at_most_half_a_level():
    w = np.random.default_rng(0).standard_normal((50, 40))
    wq = fake_quantize(w, 8)
    step = np.abs(w).max() / 255
    assert np.abs(wq - w).max() <= step / 2 + 1e-6


def test_slices_recombine_to_the_level():
    levels = np.arange(256, dtype=np.uint16)
    s = slice_levels(levels, 8, 2)
    assert s.shape == (256, 4) and s.max() == 3
    assert ((s * (4 ** np.arange(4))).sum(axis=1) == levels).all()
