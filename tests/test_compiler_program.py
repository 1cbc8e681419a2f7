"""The compiled program as an artefact: reference executor, disassembly, format round trip."""

from __future__ import annotations

import re

import numpy as np
import pytest

from nvcim import driver
from nvcim.compiler import Target, compile_model, lower_model, reference
from nvcim.compiler.disasm import disassemble
from nvcim.firmware_emu.contract.program_format import FORMAT_VERSION, Program

from zoo import LeNet3, export, randomised


@pytest.fixture(scope="module")
def lenet(tmp_path_factory):
    return export(randomised(LeNet3), tmp_path_factory.mktemp("lenet") / "lenet3.onnx", (1, 28, 28), dynamo=False)


def test_ideal_chip_and_reference_executor_agree_bit_for_bit(lenet):
    """At sigma = 0 every cell sits on its target, so the chip's conductance-derived
    weights are the reference's: any difference would be a chip (cells, link) bug."""
    x = np.random.default_rng(0).standard_normal((6, 1, 28, 28)).astype(np.float32)
    with driver.load(lenet, device="emu://?sigma=0&arrays=4") as sess:
        chip, = sess.run(None, {"x": x})
        program = sess.program
    ref, = reference.run(program, {"x": x})
    np.testing.assert_array_equal(chip, ref)


def test_reference_noise_adds_to_the_named_layer(mlp_path, batch):
    program = compile_model(mlp_path)
    first, second = program.layers
    noise = np.random.default_rng(1).standard_normal((first.in_features, first.out_features)).astype(np.float32)
    noisy, = reference.run(program, [batch], noise={first.name: noise * 0.01})
    clean, = reference.run(program, [batch])
    # by hand: Gemm -> Relu -> Gemm with the first weight perturbed
    b1, b2 = (program.constants[program.instructions[i].inputs[1]] for i in (1, 4))
    w1, w2 = reference.ideal_weights(program, 0) + noise * 0.01, reference.ideal_weights(program, 1)
    np.testing.assert_allclose(noisy, np.maximum(batch @ w1 + b1, 0) @ w2 + b2, rtol=0, atol=1e-4)
    assert np.abs(noisy - clean).max() > 1e-3
    with pytest.raises(ValueError, match="noise names layers the program does not have: nope"):
        reference.run(program, [batch], noise={"nope": noise})
    with pytest.raises(ValueError, match=f"noise for layer '{second.name}' has shape"):
        reference.run(program, [batch], noise={second.name: noise})


def test_ideal_weights_are_the_quantised_weights(mlp_path):
    program = compile_model(mlp_path)
    lowered, _ = lower_model(mlp_path)
    for i, layer in enumerate(program.layers):
        w = lowered.weights[layer.name]
        np.testing.assert_allclose(reference.ideal_weights(program, i), w, rtol=0, atol=layer.scale / 2 * 1.0001)


def test_disassembly_lists_header_tensors_layers_tiles_and_every_instruction(lenet):
    program = compile_model(lenet, Target(rows=32, cols=64))
    text = disassemble(program)
    assert f"format version {FORMAT_VERSION}" in text
    assert f"{program.arrays_used} arrays used" in text and f"cell image {len(program.cells)} bytes" in text
    for layer in program.layers:
        assert f"{layer.name}: {layer.in_features}x{layer.out_features}" in text
    assert len(re.findall(r"^\s+tile \d+: [+-] array \d+ rows \d+\.\.\d+ cols \d+\.\.\d+ <- W\[", text, re.M)) == \
        sum(len(layer.tiles) for layer in program.layers)
    code = re.findall(r"^  (\d{4}) (\w+)", text, re.M)
    assert [op for _, op in code] == [ins.op.name for ins in program.instructions]
    assert "kernel=[3,3] strides=[1,1] pads=[1,1,1,1] dilations=[1,1] group=1" in text
    assert "(N, 1, 28, 28)" in text and "input  x" in text


def test_per_channel_program_round_trips(lenet):
    program = compile_model(lenet, per_channel=True)
    again = Program.from_bytes(program.to_bytes())
    for a, b in zip(program.layers, again.layers):
        assert isinstance(b.scale, np.ndarray) and b.scale.shape == (a.out_features,)
        np.testing.assert_array_equal(a.scale, b.scale)
    assert again.cells == program.cells and again.code_bytes() == program.code_bytes()
    assert [i.attrs for i in again.instructions] == [i.attrs for i in program.instructions]
