"""PROGRAM_LOAD checks every index, id, size and cell range against the chip.

Every numeric field of a valid program's code section is set, one at a time, to values
around and far outside its range (the CRC fixed up, so only the value is wrong). A value
outside the range must be refused with BAD_PROGRAM naming where it is, and leave the
chip as it was; a value that happens to be valid may be accepted, and the program must
then run (or its run be refused with a named error, never INTERNAL).
"""

from __future__ import annotations

import math
import re
import zlib

import pytest

from nvcim.firmware_emu.chip import ChipError
from nvcim.firmware_emu.contract.program_format import FORMAT_VERSION, HeaderStruct
from nvcim.firmware_emu.contract.protocol import Command, ErrorCode, ProgramLoadArgs

from chip_programs import build, load, new_chip, parse, refused, run, small_program, state

# fields whose every value is valid to the chip: free text, and where the host's program
# file keeps a tile's cells (the chip gets cells by CELLS_WRITE, never from the code)
FREE = {"name", "cells_offset"}
SIGNED = {"layer", "shape", "ints"}   # Int32sl / Int64sl fields; the rest are unsigned
WHERE = ("tensor", "layer", "instruction", "constant", "input", "output")


def leaves(node, path=()):
    """(path, value) of every number in a parsed code section."""
    if isinstance(node, dict):
        for key, value in node.items():
            if not key.startswith("_"):
                yield from leaves(value, path + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from leaves(value, path + (i,))
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        yield path, node


def candidates(path: tuple, value) -> list:
    field = next(p for p in reversed(path) if isinstance(p, str))
    if field == "op":
        return [0, 3, 0xFFFF]
    if isinstance(value, float):
        return [math.nan, math.inf]
    if field in SIGNED:
        top = 2 ** 63 - 1 if field == "ints" else 2 ** 31 - 1
        return sorted({-top - 1, -2, value + 1, top})
    return sorted({0, value + 1, 2 ** 32 - 1})


def built_with(container, path, value) -> bytes:
    """The code section with the field at ``path`` set to ``value`` (the container is left as it was)."""
    node = container
    for key in path[:-1]:
        node = node[key]
    old, node[path[-1]] = node[path[-1]], value
    try:
        return build(container)
    finally:
        node[path[-1]] = old


def numeric_fields(code: bytes) -> list[tuple[tuple, object]]:
    return [(path, v) for path, v in leaves(parse(code)) if path[-1] not in FREE and
            not (len(path) > 1 and path[-2] in FREE)]


@pytest.fixture(scope="module")
def valid():
    program = small_program()
    return program, program.code_bytes()


def test_every_field_out_of_range_is_refused_by_name_and_changes_nothing(valid):
    _, code = valid
    chip = new_chip()
    load(chip, code)
    reference = run(chip)
    before = state(chip)
    tree = parse(code)
    fields = numeric_fields(code)
    assert len(fields) > 150  # every tensor dim, layer size, tile, instruction and attribute value
    refused_fields, accepted = set(), 0
    for path, value in fields:
        for bad in candidates(path, value):
            try:
                mutated = built_with(tree, path, bad)
            except Exception:  # noqa: BLE001 - a value the field's type cannot hold is no test
                continue
            error = refused(chip, mutated)
            if error is not None:
                assert error.code == ErrorCode.BAD_PROGRAM, (path, bad, error)
                assert any(w in str(error) for w in WHERE), (path, bad, str(error))
                assert state(chip) == before, (path, bad)
                refused_fields.add(path)
                continue
            accepted += 1  # a value that is valid: the program must run, or be refused by name
            try:
                run(chip)
            except ChipError as e:
                assert e.code != ErrorCode.INTERNAL, (path, bad, e)
            load(chip, code)
            assert run(chip) == reference
            before = state(chip)
    missed = [path for path, _ in fields if path not in refused_fields]
    assert not missed, f"no out-of-range value refused for {missed[:10]}"


def test_names_and_cell_offsets_are_free(valid):
    """What the chip does not check changes nothing it computes."""
    _, code = valid
    chip = new_chip()
    load(chip, code)
    reference = run(chip)
    tree = parse(code)
    tree.layers[2].tiles[0].cells_offset = 2 ** 32 - 1
    tree.instructions[0].name = "renamed"
    tree.tensors[0].name = ""
    load(chip, build(tree))
    assert run(chip) == reference


@pytest.mark.parametrize("mutate, message", [
    # the three accepted before: RUN then failed with INTERNAL or asked for 128 GiB-1 TiB
    (lambda t: setattr(t.instructions[0], "layer", -2), "uses layer -2"),
    (lambda t: t.outputs.__setitem__(0, len(t.tensors)), "program output 0 is tensor"),
    (lambda t: setattr(t.layers[2], "in_features", 2 ** 32 - 1), "layer 2 .* is 4294967295x5"),
    (lambda t: setattr(t.layers[2], "out_features", 2 ** 31), "layer 2 .* is 200x2147483648"),
    (lambda t: setattr(t.tensors[t.outputs[0]], "shape", [-1, 2 ** 31 - 1, 2 ** 31 - 1]), "tensor .* has shape"),
    (lambda t: setattr(t.layers[2].tiles[0], "array", 16), "array 16 are outside the chip's 16 arrays"),
    (lambda t: t.layers[2].tiles[1].update({k: t.layers[2].tiles[0][k] for k in ("array", "row", "col")}),
     "tile 1: shares cells of array"),
])
def test_named_refusals(valid, mutate, message):
    _, code = valid
    chip = new_chip()
    load(chip, code)
    before = state(chip)
    tree = parse(code)
    mutate(tree)
    error = refused(chip, build(tree))
    assert error is not None and error.code == ErrorCode.BAD_PROGRAM
    assert re.search(message, str(error)), str(error)
    assert state(chip) == before


def test_code_longer_than_the_buffer_is_refused_before_reading_it(valid):
    _, code = valid
    chip = new_chip()
    with pytest.raises(ChipError) as e:
        chip.execute(Command.PROGRAM_LOAD, ProgramLoadArgs.build(dict(
            length=2 ** 32 - 1, crc=0, weight_bits=8, cell_bits=2, array_rows=32, array_cols=32)))
    assert e.value.code == ErrorCode.BAD_ADDRESS
    assert chip.program is None


# -- deploy: the host checks before it sends anything ------------------------------
def _unloaded(dev) -> bool:
    from nvcim.firmware_emu.register_file import STATUS_PROGRAM_LOADED

    return not dev.read_register("STATUS") & STATUS_PROGRAM_LOADED


@pytest.mark.parametrize("damage, message", [
    (lambda p: setattr(p.layers[2].tiles[-1], "array", 16), "outside the chip's 16 arrays"),
    (lambda p: setattr(p, "cells", p.cells[:-1]), "beyond the .*-byte cell image"),
    (lambda p: setattr(p.layers[0], "in_features", 10 ** 9), "layer 0 .* is 1000000000x2"),
])
def test_deploy_refuses_a_program_that_does_not_fit_before_sending_anything(damage, message):
    from nvcim import driver
    from nvcim.driver.session import deploy

    program = small_program()
    damage(program)
    with driver.open("emu://?arrays=16&rows=32&cols=32&buffer_size=65536") as dev:
        sent = []
        transact = dev.link.transact
        dev.link.transact = lambda command, *a, **k: (sent.append(command), transact(command, *a, **k))[1]
        with pytest.raises(driver.InvalidArgument, match=message):
            deploy(dev, program)
        assert sent == []
        assert _unloaded(dev)


# -- the compiler: shapes, sizes and attributes before anything is allocated ---------
def _model(nodes, inputs, output, inits=(), opset=13):
    """A model of ``nodes``; ``output`` is (name, rank)."""
    from onnx import TensorProto, helper

    output, rank = output
    graph = helper.make_graph(nodes, "bounds", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s)
                                                for n, s in inputs],
                              [helper.make_tensor_value_info(output, TensorProto.FLOAT,
                                                             [f"d{i}" for i in range(rank)])],
                              list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _weight(name, *shape):
    import numpy as np
    from onnx import numpy_helper

    return numpy_helper.from_array(np.random.default_rng(0).standard_normal(shape).astype(np.float32), name)


def _compile_peak(model) -> tuple[Exception, int]:
    """The error compiling ``model`` raises, and the most memory Python allocated meanwhile."""
    import tracemalloc

    from nvcim.compiler import compile_model

    tracemalloc.start()
    try:
        compile_model(model)
    except Exception as e:  # noqa: BLE001 - the test inspects it
        error = e
    else:
        error = None
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return error, peak


def _gemm(**attrs):
    from onnx import helper

    return _model([helper.make_node("Gemm", ["x", "w"], ["y"], name="fc", **attrs)], [("x", ["N", 4])], ("y", 2),
                  [_weight("w", 4, 3) if not attrs.get("transB") else _weight("w", 3, 4)])


def _pool(**attrs):
    from onnx import helper

    return _model([helper.make_node("MaxPool", ["x"], ["y"], name="pool", kernel_shape=[2, 2], **attrs)],
                  [("x", ["N", 1, 4, 4])], ("y", 4))


def _node(op, inputs, **attrs):
    from onnx import helper

    return helper.make_node(op, inputs, ["y"], name="node", **attrs)


@pytest.mark.parametrize("model, message", [
    (lambda: _gemm(alpha=math.nan), r"node 'fc' \(Gemm\): attribute alpha=nan is not finite"),
    (lambda: _gemm(beta=math.inf), r"node 'fc' \(Gemm\): attribute beta=inf is not finite"),
    (lambda: _gemm(transB=2), r"node 'fc' \(Gemm\): attribute transB=2; a flag is 0 or 1"),
    (lambda: _pool(ceil_mode=-1), r"node 'pool' \(MaxPool\): attribute ceil_mode=-1; a flag is 0 or 1"),
    (lambda: _pool(strides=[0, 1]), r"node name: pool.*strides must only contain positive values"),
    (lambda: _model([_node("Conv", ["x", "w"], group=0)], [("x", ["N", 2, 4, 4])], ("y", 4),
                    [_weight("w", 2, 1, 3, 3)]),
     r"node 'node' \(Conv\): attribute group=0; it must be >= 1"),
    (lambda: _model([_node("Relu", ["x"])], [("x", ["N", 10 ** 9])], ("y", 2)),
     r"input 'x' has shape \[N, 1000000000\]; the chip takes at most 16 axes and 16777216 values per sample"),
    (lambda: _model([_node("Pad", ["x", "p"], mode="constant")], [("x", ["N", 4])], ("y", 2),
                    [__import__("onnx").numpy_helper.from_array(__import__("numpy").array([0, 0, 0, 10 ** 9]), "p")]),
     r"node 'node' \(Pad\): would compute 1000000004 values per sample"),
    (lambda: _model([_node("Add", ["x", "c"])], [("x", ["N", 4097, 1])], ("y", 3), [_weight("c", 1, 4097)]),
     r"node 'node' \(Add\): would compute 16785409 values per sample"),
])
def test_compiler_refuses_by_node_before_allocating(model, message):
    """Each of these was accepted, or allocated gigabytes and raised MemoryError: a CompileError
    naming the node (or input) comes first, with little memory used."""
    from nvcim.compiler import CompileError

    error, peak = _compile_peak(model())
    assert isinstance(error, CompileError), repr(error)
    assert re.search(message, str(error)), str(error)
    assert peak < 64 << 20


def test_a_folded_constant_larger_than_any_weight_is_refused_before_evaluating():
    import numpy as np
    from onnx import helper, numpy_helper

    from nvcim.compiler import CompileError

    model = _model([helper.make_node("ConstantOfShape", ["s"], ["big"], name="fill"),
                    helper.make_node("Add", ["x", "big"], ["y"], name="add")], [("x", ["N", 1])], ("y", 2),
                   [numpy_helper.from_array(np.array([1, 10 ** 9], np.int64), "s")])
    error, peak = _compile_peak(model)
    assert isinstance(error, CompileError) and "node 'fill' (ConstantOfShape) would fold" in str(error), error
    assert peak < 64 << 20


def test_capacity_is_refused_before_any_cell_is_sliced(monkeypatch):
    """The model needs more arrays than the chip has: CapacityError before the per-tile slicing
    and packing (what took 21 s on a large model before the error)."""
    import nvcim.compiler as compiler
    from nvcim.compiler import CapacityError, Target, compile_model

    def never(*args, **kwargs):
        raise AssertionError("cells sliced for a model that does not fit")

    monkeypatch.setattr(compiler, "slice_levels", never)
    monkeypatch.setattr(compiler, "pack_cells", never)
    from onnx import helper

    model = _model([helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")], [("x", ["N", 256])], ("y", 2),
                   [_weight("w", 256, 256)])
    with pytest.raises(CapacityError, match="needs 512 arrays of 32x32 cells; the chip has 4"):
        compile_model(model, Target(arrays=4, rows=32, cols=32))


# -- the CLI: one line per error, a traceback only with --debug ---------------------
def _cli(*args):
    from click.testing import CliRunner

    from nvcim.tools.cli import main

    return CliRunner().invoke(main, list(map(str, args)))


def _one_line(result, pattern: str) -> None:
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert "Traceback" not in result.output and re.search(pattern, lines[0]), lines[0]


def test_cli_errors_are_one_line(tmp_path, valid):
    from onnx import helper, save

    big = tmp_path / "big.onnx"
    save(_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")], [("x", ["N", 256])], ("y", 2),
                [_weight("w", 256, 256)]), big)
    _one_line(_cli("compile", big, "-o", tmp_path / "p.bin", "--arrays", 4, "--rows", 32, "--cols", 32),
              "needs 512 arrays")
    _one_line(_cli("compile", big, "-o", tmp_path / "p.bin", "--arrays", 0), "arrays=0 must be in 1..65535")
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(bytes(range(256)) * 3)
    _one_line(_cli("disasm", garbage), "garbage.bin: bad magic")
    program, code = valid
    tree = parse(code)
    tree.outputs[0] = 10 ** 6
    program_file = tmp_path / "bad_id.bin"
    program_file.write_bytes(_program_file(program, build(tree)))
    _one_line(_cli("disasm", program_file), "program output 0 is tensor 1000000, which is beyond the")


def _program_file(program, code: bytes) -> bytes:
    """A program file holding ``code`` as its code section, every CRC right."""
    header = HeaderStruct.build(dict(
        version=FORMAT_VERSION, weight_bits=program.weight_bits, cell_bits=program.cell_bits,
        array_rows=program.array_rows, array_cols=program.array_cols, arrays_used=program.arrays_used,
        code_size=len(code), code_crc=zlib.crc32(code), cells_size=len(program.cells),
        cells_crc=zlib.crc32(program.cells)))
    return header + zlib.crc32(header).to_bytes(4, "little") + code + program.cells


def test_an_unexpected_error_is_one_line_and_its_traceback_shows_with_debug(monkeypatch, tmp_path):
    """The group catches for every command, the bring-up ones included."""
    from nvcim import driver

    def broken(*args, **kwargs):
        raise RuntimeError("link driver fell over")

    monkeypatch.setattr(driver, "open", broken)
    _one_line(_cli("identify", "--device", "emu://"), "RuntimeError: link driver fell over .*--debug")
    result = _cli("--debug", "identify", "--device", "emu://")
    assert isinstance(result.exception, RuntimeError)
