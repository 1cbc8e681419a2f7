"""ONNX in -> compiler -> program -> driver -> link -> emulated chip -> outputs."""

import numpy as np
import onnxruntime as ort
import pytest

from nvcim import driver
from nvcim.compiler import quantized_model


def _quantized_reference(path, x):
    return ort.InferenceSession(quantized_model(path).SerializeToString()).run(None, {"x": x})[0]


def _device(kind: str, serve, options: str) -> str:
    if kind == "emu":
        return "emu://?" + options.replace(" ", "&")
    args = []
    for opt in options.split():
        key, value = opt.split("=")
        args += [f"--{key}", value]
    return serve("--pty", *args).address


@pytest.mark.parametrize("kind", ["emu", "pty"])
def test_ideal_chip_matches_onnxruntime_on_the_quantised_model(kind, serve, mlp_path, batch):
    with driver.load(mlp_path, device=_device(kind, serve, "sigma=0")) as sess:
        y, = sess.run(None, {"x": batch})
    ref = _quantized_reference(mlp_path, batch)
    # float32 sums in another order: a few ulps of the largest logit
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("kind", ["emu", "pty"])
def test_noisy_chip_differs_and_is_reproducible_by_seed(kind, serve, mlp_path, batch):
    outs = []
    for seed in (11, 11, 12):
        with driver.load(mlp_path, device=_device(kind, serve, f"sigma=0.3 seed={seed}")) as sess:
            outs.append(sess.run(["y"], {"x": batch})[0])
    ref = _quantized_reference(mlp_path, batch)
    assert np.abs(outs[0] - ref).max() > 1e-2
    assert np.array_equal(outs[0], outs[1])
    assert not np.array_equal(outs[0], outs[2])


def test_session_describes_inputs_and_outputs_like_onnxruntime(mlp_path):
    ref = ort.InferenceSession(str(mlp_path))
    with driver.load(mlp_path) as sess:
        for mine, theirs in ((sess.get_inputs(), ref.get_inputs()), (sess.get_outputs(), ref.get_outputs())):
            assert [(a.name, a.shape, a.type) for a in mine] == [(a.name, a.shape, a.type) for a in theirs]


def test_wrong_feeds_are_clear_errors(mlp_path, batch):
    with driver.load(mlp_path) as sess:
        with pytest.raises(driver.InvalidArgument, match="invalid input name: 'z'"):
            sess.run(None, {"z": batch})
        with pytest.raises(driver.InvalidArgument, match="dimension 1 = 63, expected 64"):
            sess.run(None, {"x": batch[:, :63]})
        with pytest.raises(driver.InvalidArgument, match="actual float64"):
            sess.run(None, {"x": batch.astype(np.float64)})
        with pytest.raises(driver.InvalidArgument, match="invalid output name: 'q'"):
            sess.run(["q"], {"x": batch})
        # the session still works after refused calls
        assert sess.run(None, {"x": batch})[0].shape == (16, 10)
