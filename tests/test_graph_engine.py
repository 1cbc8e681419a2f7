"""The graph engine: a loaded program run as one onnxruntime graph of the programmed weights.

It must compute what the interpreter computes from the same conductances (never the
targets), follow the cells when they are reprogrammed, and free its sessions with the
program and weights they were built from.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest

from nvcim import driver
from nvcim.compiler import compile_model, reference
from nvcim.firmware_emu import executor, graph_engine

from zoo import LeNet3, export, randomised


@pytest.fixture(scope="module")
def lenet(tmp_path_factory):
    return export(randomised(LeNet3), tmp_path_factory.mktemp("lenet") / "lenet3.onnx", (1, 28, 28), dynamo=False)


def _interpreted(chip, x: np.ndarray) -> np.ndarray:
    """What the chip computes, op by op, from its current conductances."""
    return executor.run(chip.program, [x], chip.weights.layer, engine=False)[0]


def test_engine_computes_the_programmed_conductances_not_the_targets(lenet):
    x = np.random.default_rng(0).standard_normal((8, 1, 28, 28)).astype(np.float32)
    with driver.load(lenet, device="emu://?sigma=0.3&seed=4&arrays=4") as sess:
        chip = sess.device.link.port.chip
        got, = sess.run(None, {"x": x})
        assert graph_engine.graph_for(chip.program, chip.weights.layer) is not None
        want = _interpreted(chip, x)
        ideal, = reference.run(sess.program, [x])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    assert np.abs(got - ideal).max() > 1e-2 * np.abs(ideal).max()  # sigma 0.3 moved the outputs


def test_graph_is_reused_between_runs_and_rebuilt_after_reprogramming(lenet):
    x = np.random.default_rng(1).standard_normal((4, 1, 28, 28)).astype(np.float32)
    with driver.load(lenet, device="emu://?sigma=0.3&seed=5&arrays=4") as sess:
        chip = sess.device.link.port.chip
        before, = sess.run(None, {"x": x})
        graph = graph_engine.graph_for(chip.program, chip.weights.layer)
        again, = sess.run(None, {"x": x})
        assert graph_engine.graph_for(chip.program, chip.weights.layer) is graph
        np.testing.assert_array_equal(before, again)

        tile = sess.program.layers[0].tiles[0]  # reflash conv1's positive tile: new noise draws
        targets = sess.program.tile_cells(tile)
        sess.device.write_cells(tile.array, tile.row, tile.col, targets)
        after, = sess.run(None, {"x": x})
        assert graph_engine.graph_for(chip.program, chip.weights.layer) is not graph
        assert not np.array_equal(after, before)
        np.testing.assert_allclose(after, _interpreted(chip, x), rtol=0, atol=1e-5 * np.abs(after).max())


def test_sessions_are_freed_with_their_program(mlp_path):
    program = compile_model(mlp_path)
    weights = [reference.ideal_weights(program, i) for i in range(len(program.layers))]
    gc.collect()  # entries of earlier tests' programs go first: only this program's is counted
    graph_engine.graph_for(program, weights.__getitem__)
    held = graph_engine.cached_graphs()
    del program, weights
    gc.collect()
    assert graph_engine.cached_graphs() == held - 1


def test_a_graph_that_fails_is_declined_once_and_the_interpreter_runs(mlp_path, batch, monkeypatch, caplog):
    program = compile_model(mlp_path)
    weights = [reference.ideal_weights(program, i) for i in range(len(program.layers))]
    want = executor.run(program, [batch], weights.__getitem__, engine=False)
    graph = graph_engine.graph_for(program, weights.__getitem__)
    calls = []

    def broken(feeds):
        calls.append(1)
        raise RuntimeError("simulated onnxruntime failure")

    monkeypatch.setattr(graph, "run", broken)
    with caplog.at_level("WARNING", logger="nvcim.firmware_emu.graph_engine"):
        first = executor.run(program, [batch], weights.__getitem__)
        second = executor.run(program, [batch], weights.__getitem__)
    np.testing.assert_array_equal(first[0], want[0])
    np.testing.assert_array_equal(second[0], want[0])
    assert len(calls) == 1  # declined after the first failure, not retried on every run
    assert graph_engine.graph_for(program, weights.__getitem__) is None
    assert "simulated onnxruntime failure" in caplog.text
