"""A model bigger than one chip, split over several: compiler partition, driver pipeline,
selective verify and an incremental (TSB-style) layer on a partitioned model, CLI.

The model is a chain of 18 64x64 layers with a skip connection from chip 0 to chip 2 and
an output taken on chip 0: on chips of 4 arrays of 256x256 it needs 9 arrays, 3 chips.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from nvcim import driver
from nvcim.compiler import CapacityError, Target, compile_model, lower_model, quantized_model, reference
from nvcim.compiler.partition import partition
from nvcim.driver.multichip import MultiChipSession
from nvcim.tools.cli import main

SMALL = Target(arrays=4)
CHIP = "emu://?arrays=4&sigma=0"
LAYERS = 18


def chain(layers: int = LAYERS, extra: bool = False, at: int = 16) -> onnx.ModelProto:
    """x -> [MatMul 64x64, Relu] * layers, r3 added back before the last layer; outputs y and r2.
    ``extra``: one more 64x64 layer ("tsb") added to r<at> (a new layer next to a deployed model's)."""
    rng = np.random.default_rng(5)
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        inits.append(numpy_helper.from_array((rng.standard_normal((64, 64)) / 8).astype(np.float32), f"W{i}"))
        if i == layers - 1:
            nodes.append(helper.make_node("Add", [x, "r3"], ["skip"]))
            x = "skip"
        nodes += [helper.make_node("MatMul", [x, f"W{i}"], [f"h{i}"]), helper.make_node("Relu", [f"h{i}"], [f"r{i}"])]
        x = f"r{i}"
        if extra and i == at:
            tsb = np.random.default_rng(6).standard_normal((64, 64)) / 8
            inits.append(numpy_helper.from_array(tsb.astype(np.float32), "tsb"))
            nodes += [helper.make_node("MatMul", [x, "tsb"], ["t"]), helper.make_node("Add", [x, "t"], [f"r{i}t"])]
            x = f"r{i}t"
    nodes.append(helper.make_node("Identity", [x], ["y"]))
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 64]),
                               helper.make_tensor_value_info("r2", TensorProto.FLOAT, ["N", 64])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.fixture(scope="module")
def chain_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("multichip") / "chain.onnx"
    onnx.save(chain(), path)
    return path


def onnxruntime_outputs(model, x: np.ndarray) -> list[np.ndarray]:
    return ort.InferenceSession(quantized_model(model).SerializeToString()).run(None, {"x": x})


def inputs(n: int = 20) -> np.ndarray:
    return np.random.default_rng(1).standard_normal((n, 64)).astype(np.float32)


def test_capacity_error_says_how_many_chips_hold_the_model():
    with pytest.raises(CapacityError, match="needs 9 arrays of 256x256 cells; the chip has 4; it fits 3 chips "
                                            "of this geometry.*--chips 3"):
        compile_model(chain(), SMALL)


def test_stages_fit_their_chips_and_compute_what_one_chip_does():
    part = partition(*lower_model(chain()), SMALL)
    assert len(part) == 3 and all(p.arrays_used <= 4 for p in part.programs)
    assert sorted(part.inputs[2]) == ["r15", "r3"] and "r2" in part.outputs[0] and "r3" in part.outputs[0]
    whole = compile_model(chain(), Target(arrays=16))
    x = inputs()
    env = {"x": x}
    for program, takes, gives in zip(part.programs, part.inputs, part.outputs):
        env.update(zip(gives, reference.run(program, [env[name] for name in takes])))
    for got, want in zip([env[name] for name in part.model_outputs], reference.run(whole, [x]), strict=True):
        np.testing.assert_array_equal(got, want)
    # one weight per layer name, on exactly one chip, with the single-chip program's scale
    held = [layer for p in part.programs for layer in p.layers]
    assert sorted(layer.name for layer in held) == sorted(layer.name for layer in whole.layers)
    scales = {layer.name: layer.scale for layer in whole.layers}
    assert all(np.array_equal(layer.scale, scales[layer.name]) for layer in held)


def test_more_chips_balance_the_stages_and_too_few_are_refused():
    lowered = lower_model(chain())
    assert [p.arrays_used for p in partition(*lowered, Target(arrays=16), chips=3).programs] == [3, 3, 3]
    assert [p.arrays_used for p in partition(*lowered, SMALL, chips=3).programs] == [4, 4, 1]  # filled in turn
    with pytest.raises(CapacityError, match="needs 3 chips of 4 arrays of 256x256 cells; 2 given"):
        partition(*lowered, SMALL, chips=2)


def test_session_over_three_chips_one_served_on_a_pty_matches_onnxruntime(chain_path, serve):
    served = serve("--pty", "--arrays", "4", "--sigma", "0")
    x = inputs(20)
    with driver.load(chain_path, device=[CHIP, served.address, CHIP]) as sess:
        assert isinstance(sess, MultiChipSession) and len(sess.devices) == 3
        assert [d.identity.geometry.arrays for d in sess.devices] == [4, 4, 4]
        got = sess.run(None, {"x": x})
        assert [o.name for o in sess.get_outputs()] == ["y", "r2"]
        early, = sess.run(["r2"], {"x": x[:1]})  # a batch of one: one micro-batch
    for g, w in zip(got, onnxruntime_outputs(chain(), x), strict=True):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-5 * float(np.abs(w).max()))
    np.testing.assert_array_equal(early, got[1][:1])


def test_nvcim_device_with_a_list_splits_and_single_device_calls_refuse_it(chain_path, monkeypatch):
    monkeypatch.setenv("NVCIM_DEVICE", ",".join([CHIP] * 3))
    with driver.load(chain_path) as sess:
        assert len(sess.devices) == 3
    with pytest.raises(ValueError, match="NVCIM_DEVICE names 3 devices.*this call talks to one"):
        driver.open()


def test_selective_verify_goes_to_the_chip_holding_the_layer(chain_path):
    noisy = "emu://?arrays=4&sigma=0.3&seed={}"
    mask = {"W16": np.ones((64, 64), bool)}
    with driver.load(chain_path, device=[noisy.format(k) for k in range(3)], policy="selective",
                     verify_mask=mask) as sess:
        assert sess.layer_chip("W16") == [2]
        iterations = [d.counters()["verify_iters"] for d in sess.devices]
    assert iterations[2] > 0 and iterations[:2] == [0, 0]
    with pytest.raises(driver.InvalidArgument, match="no verify_mask layer\\(s\\) W99"):
        driver.load(chain_path, device=[CHIP] * 3, policy="selective", verify_mask={"W99": np.ones((64, 64), bool)})


def test_a_new_layer_on_a_partitioned_model_goes_to_the_chip_of_its_neighbours(chain_path):
    """As a TSB is added next to a deployed backbone: the grown model is compiled against the
    chips' programs, the new layer lands on the chip its instruction runs on, every deployed
    layer keeps its tiles, and only the new cells are written (write-verified)."""
    def cells(program):  # where each layer's tiles lie (not where their bytes are in the file)
        return {layer.name: [(t.sign, t.array, t.row, t.col, t.in_start, t.in_count, t.out_start, t.out_count)
                             for t in layer.tiles] for layer in program.layers}

    with driver.load(chain_path, device=[CHIP] * 3) as sess:
        before = [cells(p) for p in sess.programs]
        writes = [d.counters()["write_pulses"] for d in sess.devices]
        with pytest.raises(CapacityError, match="more than chip 0 \\(with the layers its base program holds\\)"):
            sess.extend(chain(extra=True, at=3))  # chip 0 is full: refused, nothing written
        grown = chain(extra=True)
        added = sess.extend(grown)
        assert [[layer.name for layer in p.layers if layer.name == "tsb"] for p in sess.programs] == [[], [], ["tsb"]]
        assert all(old.items() <= cells(new).items() for old, new in zip(before, sess.programs))
        after = [d.counters()["write_pulses"] for d in sess.devices]
        assert after[:2] == writes[:2] and added.cells > 0 and added.write_pulses == after[2] - writes[2] > 0
        x = inputs(8)
        for g, w in zip(sess.run(None, {"x": x}), onnxruntime_outputs(grown, x), strict=True):
            np.testing.assert_allclose(g, w, rtol=0, atol=1e-5 * float(np.abs(w).max()))


def test_compile_with_chips_writes_one_program_each_and_disasm_shows_the_partition(chain_path, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["compile", str(chain_path), "-o", str(tmp_path / "chain.bin"), "--arrays", "4"])
    assert result.exit_code == 1 and "it fits 3 chips" in result.output
    result = runner.invoke(main, ["compile", str(chain_path), "-o", str(tmp_path / "chain.bin"), "--arrays", "4",
                                  "--chips", "3"])
    assert result.exit_code == 0, result.output
    paths = [tmp_path / f"chain-chip{k}.bin" for k in range(3)]
    assert all(p.is_file() for p in paths)
    listing = runner.invoke(main, ["disasm", *map(str, paths)])
    assert listing.exit_code == 0, listing.output
    assert "; partition: 3 chips, 9 arrays of 256x256" in listing.output
    assert "r3 (N, 64) <- chip 0" in listing.output and "x (N, 64) <- host" in listing.output
    assert listing.output.count("; nvcim program") == 3


def test_a_layer_bigger_than_a_chip_is_cut_by_output_columns():
    """A 3x3 conv of 8 -> 512 channels needs 16 tiles of 72 rows (6 arrays): on chips of 4
    it runs as column parts on two chips joined by a CONCAT, with the layer's one scale."""
    rng = np.random.default_rng(2)
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["y"])]
    inits = [numpy_helper.from_array(rng.standard_normal((512, 8, 3, 3)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal(512).astype(np.float32), "B")]
    graph = helper.make_graph(nodes, "wide", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 512, 5, 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    part = partition(*lower_model(model), SMALL)
    assert len(part) == 2 and all(p.arrays_used <= 4 for p in part.programs)
    names = [layer.name for p in part.programs for layer in p.layers]
    assert len(names) == 2 and all(n.startswith("W#cols") for n in names)
    assert len({float(layer.scale) for p in part.programs for layer in p.layers}) == 1
    x = np.random.default_rng(3).standard_normal((3, 8, 5, 5)).astype(np.float32)
    env = {"x": x}
    for program, takes, gives in zip(part.programs, part.inputs, part.outputs):
        env.update(zip(gives, reference.run(program, [env[name] for name in takes])))
    whole, = reference.run(compile_model(model, Target(arrays=16)), [x])
    np.testing.assert_allclose(env[part.model_outputs[0]], whole, rtol=0, atol=1e-5 * float(np.abs(whole).max()))


def test_verify_mask_of_a_split_layer_goes_to_its_parts():
    from nvcim.driver.multichip import stage_masks

    rng = np.random.default_rng(4)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "wide",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 256])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 512])],
                              [numpy_helper.from_array(rng.standard_normal((256, 512)).astype(np.float32), "W")])
    part = partition(*lower_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                                                    ir_version=8)), SMALL)
    mask = rng.random((256, 512)) < 0.5
    routed = stage_masks(part, {"W": mask})
    assert len(part) == 4 and [list(m) for m in routed] == [[f"W#cols{a}:{a + 128}"] for a in range(0, 512, 128)]
    parts = [m[f"W#cols{a}:{a + 128}"] for m, a in zip(routed, range(0, 512, 128))]
    np.testing.assert_array_equal(np.concatenate(parts, axis=1), mask)
