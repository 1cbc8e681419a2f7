"""``nvcim identify`` and ``nvcim regs``: registers by name, checked values, one-line errors."""

from __future__ import annotations

import json
import uuid

import pytest
from click.testing import CliRunner

from nvcim import driver
from nvcim.firmware_emu.contract.registers import REGISTERS
from nvcim.tools.cli import main


@pytest.fixture
def bench_chip() -> str:
    """A named in-process chip: every command of the test reaches the same cells and registers."""
    return f"emu://regs-{uuid.uuid4().hex[:8]}?arrays=2&rows=16&cols=16&seed=5"


def _run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert "Traceback" not in result.output
    return result


def _ok(*args) -> str:
    result = _run(*args)
    assert result.exit_code == 0, result.output
    return result.output


def test_identify_shows_every_field(bench_chip):
    out = _ok("identify", "--device", bench_chip)
    fields = dict(line.split() for line in out.splitlines())
    assert fields["chip_id"] == "0x4E564331"
    assert (fields["arrays"], fields["rows"], fields["cols"]) == ("2", "16", "16")
    assert {"weight_bits", "cell_bits", "buffer_size", "max_payload", "version"} <= set(fields)


def test_read_by_name_field_and_address(bench_chip):
    out = _ok("regs", "read", "STATUS", "status.ready", "0x4C", "OP_STATUS.STATE", "--device", bench_chip)
    lines = out.splitlines()
    assert lines[0].startswith("STATUS ") and "READY=1 BUSY=0" in lines[0]
    assert lines[1].split()[:3] == ["STATUS.READY", "0x00000001", "1"]
    assert lines[2].split()[:3] == ["SEED", "0x00000005", "5"]  # 0x04C by address
    assert lines[3].endswith("NONE")


def test_write_values_fields_and_read_back(bench_chip):
    out = _ok("regs", "write", "SIGMA=0.25", "DEVICE_MODEL=rram4", "ARRAY_CONVERTERS.DAC_BITS=4",
              "ARRAY_CONVERTERS.ADC_BITS=6", "--device", bench_chip)
    assert "SIGMA <- 0x4000; reads back 0x4000 0.2500" in out
    assert "DEVICE_MODEL <- 0x3; reads back 0x3 RRAM4" in out
    dev = driver.open(bench_chip)
    assert dev.read_register("SIGMA") == 0x4000
    assert dev.read_register("ARRAY_CONVERTERS") == 0x0604  # a field write kept the other field
    dev.close()


def test_field_of_a_write_one_to_clear_register_clears_only_that_bit(bench_chip):
    dev = driver.open(bench_chip)
    with pytest.raises(driver.DeviceError):
        dev.write_register("ARRAY_SELECT", 7)       # refused: sets IRQ_FLAGS.ERROR
    dev.erase(0)                                    # sets IRQ_FLAGS.DONE
    assert dev.read_register("IRQ_FLAGS") & 0b11 == 0b11
    _ok("regs", "write", "IRQ_FLAGS.DONE=1", "--device", bench_chip)
    assert dev.read_register("IRQ_FLAGS") & 0b11 == 0b10
    dev.close()


@pytest.mark.parametrize("args, message", [
    (("read", "STATSU"), "no register STATSU in the nvcim register map (did you mean STATUS"),
    (("read", "STATUS.BUSSY"), "register STATUS has no field BUSSY (fields: READY, BUSY, PROGRAM_LOADED"),
    (("read", "0x3FC"), "no register at address 0x3FC in the nvcim register map"),
    (("write", "SIGMA=2.5"), "SIGMA: value 163840 = 2.5 in Q16.16 out of range 0..131072 (0x20000, 2 in Q16.16)"),
    (("write", "VERIFY_MAX_ITER=256"), "VERIFY_MAX_ITER: value 256 out of range 0..255"),
    (("write", "ARRAY_CONVERTERS.DAC_BITS=0x100"), "ARRAY_CONVERTERS.DAC_BITS: value 256 out of range 0..255"),
    (("write", "SEED=1.5"), "SEED: 1.5 is not an integer"),
    (("write", "DEVICE_MODEL=MRAM"), "DEVICE_MODEL: 'MRAM' is not a number, or one of GAUSSIAN, RRAM1"),
    (("write", "CHIP_ID=1"), "CHIP_ID is read-only (RO)"),
    (("write", "SIGMA"), "'SIGMA': expected NAME=VALUE or NAME.FIELD=VALUE"),
])
def test_bad_input_is_one_line_naming_register_field_and_range(bench_chip, args, message):
    dev = driver.open(bench_chip)
    before = dev.read_register("SIGMA")
    result = _run("regs", *args, "--device", bench_chip)
    assert result.exit_code == 1
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert dev.read_register("SIGMA") == before  # nothing was written
    dev.close()


def test_a_write_the_chip_refuses_is_one_line(bench_chip):
    result = _run("regs", "write", "ARRAY_SELECT=9", "--device", bench_chip)
    assert result.exit_code == 1
    assert "BAD_ARGUMENT: ARRAY_SELECT value 9 is not an array (chip has 2" in result.output


def test_dump_lists_the_whole_map_with_values(bench_chip):
    dev = driver.open(bench_chip)
    dev.write_cells(0, 0, 0, [[1, 2], [3, 0]])
    dev.close()
    out = _ok("regs", "dump", "--device", bench_chip)
    names = [line.split()[1] for line in out.splitlines() if line.startswith("0x")]
    assert names == [r.name for r in sorted(REGISTERS, key=lambda r: r.offset)]
    assert "CONTROL" in out and "(write-only)" in out
    assert "CNT_CELLS_WRITTEN" in out and out.split("CNT_CELLS_WRITTEN ")[-1].split()[0] == "4"
    data = json.loads(_ok("regs", "dump", "--json", "--device", bench_chip))
    by_name = {r["name"]: r for r in data["registers"]}
    assert set(by_name) == {r.name for r in REGISTERS}
    assert by_name["CAP_GEOMETRY"]["fields"] == {"ROWS": 16, "COLS": 16}
    assert by_name["CONTROL"]["value"] is None and data["counters"]["CNT_WRITE_PULSES"] == 4


def test_list_needs_no_chip():
    out = _ok("regs", "list")
    assert all(r.name in out for r in REGISTERS)
    assert ".BUSY" in out and "[1]" in out
