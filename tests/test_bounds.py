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

import pytest
from chip_programs import build, load, new_chip, parse, refused, run, small_program, state

from nvcim.firmware_emu.chip import ChipError
from nvcim.firmware_emu.contract.protocol import Command, ErrorCode, ProgramLoadArgs

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
        return [math.nan, math.inf, -math.inf, -value]
    if field in SIGNED:
        top = 2 ** 63 - 1 if field == "ints" else 2 ** 31 - 1
        return sorted({-top - 1, -2, -1, 0, value - 1, value + 1, top})
    return sorted({0, value - 1, value + 1, 2 ** 31 - 1, 2 ** 32 - 1} - {-1})


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
