"""Property tests of the program parser and PROGRAM_LOAD, on mutations of a valid program.

Mutations: any field of the code section set to any value its type holds, bytes of the
code section flipped, overwritten, cut or inserted (its CRC always fixed up, so only the
content is wrong), and the same on a whole program file. Asserted for each:

* ``Program.from_bytes`` returns a program or raises ProgramFormatError, nothing else;
* PROGRAM_LOAD is accepted or refused with BAD_PROGRAM (never another exception, never
  INTERNAL), and a refusal changes no state: program, cells, registers but the error ones,
  counters;
* an accepted program runs, or its run is refused with a named error (never INTERNAL).

The fast profile runs in the default suite; ``NVCIM_FUZZ=long`` the long one
(docs/reliability.md#bounded-inputs gives its figures; ``-s`` prints the tallies).
"""

from __future__ import annotations

import collections
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nvcim.firmware_emu.chip import ChipError
from nvcim.firmware_emu.contract.program_format import FORMAT_VERSION, HeaderStruct, Program, ProgramFormatError
from nvcim.firmware_emu.contract.protocol import ErrorCode

from chip_programs import build, load, new_chip, parse, refused, run, small_program, state
from fuzzing import fuzz

FUZZ = fuzz(fast=60, long=4000)  # per test; two tests: 8,000 program mutations in the long profile
TALLY: collections.Counter = collections.Counter()


def _leaves(node, path=()):
    if isinstance(node, dict):
        for key, value in node.items():
            if not key.startswith("_"):
                yield from _leaves(value, path + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _leaves(value, path + (i,))
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        yield path


@pytest.fixture(scope="module")
def valid():
    program = small_program()
    code = program.code_bytes()
    chip = new_chip()
    load(chip, code)
    yield program, code, list(_leaves(parse(code))), run(chip)
    if TALLY:
        print("\nprogram fuzz:", dict(sorted(TALLY.items())))


any_int = st.one_of(st.integers(-3, 300), st.integers(-2 ** 63, 2 ** 64), st.sampled_from(
    [-2 ** 31, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1, 2 ** 63 - 1, -2 ** 63]))
any_float = st.floats(allow_nan=True, allow_infinity=True, width=32)


@st.composite
def field_mutations(draw, leaves, code: bytes) -> bytes | None:
    tree = parse(code)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(leaves))
        node = tree
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = draw(any_float if isinstance(node[path[-1]], float) else any_int)
    try:
        return build(tree)
    except Exception:  # noqa: BLE001 - a value its field cannot hold: no program to send
        return None


@st.composite
def byte_mutations(draw, data: bytes) -> bytes:
    data = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "set", "cut", "insert", "delete"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and data:
            data[at] = draw(st.sampled_from([0, 0xFF, 0x7F, 0x80, 1]))
        elif kind == "cut":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[at:at + draw(st.integers(1, 8))]
    return bytes(data)


def sealed_file(program: Program, code: bytes, cells: bytes) -> bytes:
    """A program file of ``code`` and ``cells`` with the header's sizes and every CRC right."""
    header = HeaderStruct.build(dict(
        version=FORMAT_VERSION, weight_bits=program.weight_bits, cell_bits=program.cell_bits,
        array_rows=program.array_rows, array_cols=program.array_cols, arrays_used=program.arrays_used,
        code_size=len(code), code_crc=zlib.crc32(code), cells_size=len(cells), cells_crc=zlib.crc32(cells)))
    return header + zlib.crc32(header).to_bytes(4, "little") + code + cells


def _load_and_run(code: bytes, reference: bytes) -> None:
    chip = new_chip()
    before = state(chip)
    error = refused(chip, code)
    if error is not None:
        assert error.code == ErrorCode.BAD_PROGRAM, error
        assert state(chip) == before
        TALLY["load refused (BAD_PROGRAM), state unchanged"] += 1
        return
    TALLY["load accepted"] += 1
    try:
        reply = run(chip)
    except ChipError as e:
        assert e.code != ErrorCode.INTERNAL, e
        TALLY[f"run refused ({e.code.name})"] += 1
    else:
        TALLY["run ok" + (" (same outputs)" if reply == reference else "")] += 1


@FUZZ
@given(data=st.data())
def test_mutated_code_sections_are_loaded_or_refused_by_name(valid, data):
    program, code, leaves, reference = valid
    mutated = data.draw(st.one_of(field_mutations(leaves, code), byte_mutations(code)))
    TALLY["code mutations"] += 1
    if mutated is None:
        TALLY["unbuildable field value"] += 1
        return
    _load_and_run(mutated, reference)


@FUZZ
@given(data=st.data())
def test_mutated_program_files_parse_or_raise_program_format_error(valid, data):
    program, code, leaves, reference = valid
    if data.draw(st.booleans()):  # bytes of the file as it is
        mutated = data.draw(byte_mutations(program.to_bytes()))
    else:  # the code section or cell image changed, every size and CRC made right again
        new_code, cells = code, program.cells
        if data.draw(st.booleans()):
            new_code = data.draw(st.one_of(byte_mutations(code), field_mutations(leaves, code))) or code
        else:
            cells = data.draw(byte_mutations(cells))
        mutated = sealed_file(program, new_code, cells)
    TALLY["file mutations"] += 1
    try:
        parsed = Program.from_bytes(mutated)
    except ProgramFormatError:
        TALLY["file refused (ProgramFormatError)"] += 1
        return
    TALLY["file parsed"] += 1
    _load_and_run(parsed.code_bytes(), reference)
