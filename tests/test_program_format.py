import numpy as np
import pytest

from nvcim.compiler import Target, compile_model
from nvcim.firmware_emu.contract.program_format import (
    HEADER_SIZE,
    Program,
    ProgramFormatError,
    pack_cells,
    unpack_cells,
)


def test_pack_unpack_roundtrip_for_every_cell_width():
    rng = np.random.default_rng(0)
    for k in (1, 2, 4, 8):
        t = rng.integers(0, 1 << k, size=(7, 13), dtype=np.uint8)
        data = pack_cells(t, k)
        assert len(data) == -(-t.size * k // 8)
        assert (unpack_cells(data, 0, t.shape, k) == t).all()


def test_two_bit_cells_pack_four_per_byte_lsb_first():
    assert pack_cells(np.array([1, 2, 3, 0, 3]), 2) == bytes([0b00111001, 0b11])


def test_program_roundtrip(mlp_path):
    p = compile_model(mlp_path, Target())
    q = Program.from_bytes(p.to_bytes())
    assert q.code_bytes() == p.code_bytes() and q.cells == p.cells
    assert [layer.name for layer in q.layers] == [layer.name for layer in p.layers]


def test_corruption_is_reported_with_its_offset(mlp_path):
    data = bytearray(compile_model(mlp_path, Target()).to_bytes())
    data[HEADER_SIZE + 10] ^= 0xFF
    with pytest.raises(ProgramFormatError, match=f"code section CRC mismatch \\(bytes {HEADER_SIZE}\\.\\."):
        Program.from_bytes(bytes(data))
    with pytest.raises(ProgramFormatError, match="truncated"):
        Program.from_bytes(bytes(data[:HEADER_SIZE + 5]))
    with pytest.raises(ProgramFormatError, match="bad magic"):
        Program.from_bytes(b"ONNX" + bytes(data[4:]))
