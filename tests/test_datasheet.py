"""The generated datasheet (registers.md, nvcim_regs.h, nvcim.svd, program-format.md) matches
the register map, the program format and its op table."""

from __future__ import annotations

import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from construct import Int8ul, Int16ul, Struct

from nvcim.firmware_emu import datasheet, program_format_doc
from nvcim.firmware_emu.contract.ops import OPS
from nvcim.firmware_emu.contract.protocol import Command, ErrorCode
from nvcim.firmware_emu.contract.registers import CHIP_ID_VALUE, REGISTERS, Access, Field, Register

DOCS = datasheet.DOCS_DIR


def test_committed_datasheet_files_are_not_stale():
    assert set(datasheet.render_all()) == {"registers.md", "nvcim_regs.h", "nvcim.svd", "program-format.md"}
    stale = [name for name, text in datasheet.render_all().items()
             if not (DOCS / name).is_file() or (DOCS / name).read_text(encoding="utf-8") != text]
    assert not stale, f"stale generated docs {stale}: run `python -m nvcim.firmware_emu.datasheet` and commit them"
    assert datasheet.main(["--check"]) == 0


def test_check_mode_names_a_stale_file_and_writes_nothing(tmp_path: Path, capsys):
    datasheet.write_all(tmp_path)
    (tmp_path / "nvcim.svd").write_text("<device/>\n")
    assert datasheet.main(["--check", "--docs", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "nvcim.svd" in err and "registers.md" not in err
    assert (tmp_path / "nvcim.svd").read_text() == "<device/>\n"


def _cc() -> str:
    cc = shutil.which("cc") or shutil.which("gcc")
    assert cc, "a C compiler (cc) is required to check the generated header"
    return cc


def test_c_header_compiles_and_its_values_agree_with_the_register_map(tmp_path: Path):
    cc = _cc()
    header = DOCS / "nvcim_regs.h"
    subprocess.run([cc, "-fsyntax-only", str(header)], check=True, capture_output=True, text=True)

    expected: dict[str, int] = {"NVCIM_CHIP_ID_VALUE": CHIP_ID_VALUE}
    for r in REGISTERS:
        expected[f"NVCIM_{r.name}_OFFSET"] = r.offset
        expected[f"NVCIM_{r.name}_RESET"] = int(r.reset)
        for f in r.fields:
            expected[f"NVCIM_{r.name}_{f.name}_SHIFT"] = f.lsb
            expected[f"NVCIM_{r.name}_{f.name}_MASK"] = f.mask
    expected.update({f"NVCIM_CMD_{c.name}": c.value for c in Command})
    expected.update({f"NVCIM_ERR_{e.name}": e.value for e in ErrorCode})

    prints = "\n".join(f'    printf("{name} %lu\\n", (unsigned long)({name}));' for name in expected)
    source = tmp_path / "offsets.c"
    source.write_text('#include <stdio.h>\n#include "nvcim_regs.h"\n#include "nvcim_regs.h"  /* guard */\n'
                      f"int main(void) {{\n{prints}\n    return 0;\n}}\n")
    exe = tmp_path / "offsets"
    build = subprocess.run([cc, "-std=c99", "-Wall", "-Wextra", "-pedantic", "-Werror", "-I", str(DOCS),
                            str(source), "-o", str(exe)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    got = {name: int(value) for name, value in (line.split() for line in out.splitlines())}
    assert got == expected


_SVD_ACCESS = {Access.RO: "read-only", Access.RW: "read-write", Access.WO: "write-only", Access.W1C: "read-write"}


def test_svd_has_one_register_per_declared_register_with_its_offset_reset_and_fields():
    root = ET.parse(DOCS / "nvcim.svd").getroot()
    assert root.tag == "device" and root.get("schemaVersion") == "1.3"
    peripherals = root.findall("./peripherals/peripheral")
    assert len(peripherals) == 1
    regs = peripherals[0].findall("./registers/register")
    assert [r.findtext("name") for r in regs] == [r.name for r in REGISTERS]
    for el, reg in zip(regs, REGISTERS):
        assert int(el.findtext("addressOffset"), 0) == reg.offset, reg.name
        assert int(el.findtext("resetValue"), 0) == int(reg.reset), reg.name
        assert el.findtext("size") == "32"
        assert el.findtext("access") == _SVD_ACCESS[reg.access], reg.name
        assert (el.findtext("modifiedWriteValues") == "oneToClear") == (reg.access == Access.W1C), reg.name
        fields = {f.findtext("name"): (int(f.findtext("bitOffset")), int(f.findtext("bitWidth")))
                  for f in el.findall("./fields/field")}
        assert fields == {f.name: (f.lsb, f.width) for f in reg.fields}, reg.name


def test_a_register_map_with_overlapping_fields_or_offsets_is_refused():
    bad_fields = (Register("R", 0x0, Access.RW, 0, "r", (Field("A", 0, 4, "a"), Field("B", 3, 2, "b"))),)
    with pytest.raises(ValueError, match="overlaps"):
        datasheet.check_map(bad_fields)
    same_offset = (Register("R", 0x0, Access.RW, 0, "r"), Register("S", 0x0, Access.RW, 0, "s"))
    with pytest.raises(ValueError, match="also used by R"):
        datasheet.check_map(same_offset)
    past_bit_31 = (Register("R", 0x0, Access.RW, 0, "r", (Field("A", 30, 4, "a"),)),)
    with pytest.raises(ValueError, match="outside the register"):
        datasheet.check_map(past_bit_31)


def test_protocol_doc_covers_every_command_and_error_code():
    text = (DOCS / "protocol.md").read_text(encoding="utf-8")
    missing = [m.name for m in (*Command, *ErrorCode) if f"`{m.name}`" not in text]
    assert not missing, f"docs/protocol.md does not document {missing}"


def test_program_format_doc_refuses_a_struct_whose_fields_it_does_not_document():
    declared = Struct("kind" / Int8ul, "count" / Int16ul)
    assert program_format_doc.fixed_struct_table(declared, {"kind": "k", "count": "c"}, "S")[2:] == [
        "| 0 | 1 | u8 | `kind` | k |", "| 1 | 2 | u16 | `count` | c |"]
    with pytest.raises(ValueError, match=r"S: declared fields \['kind', 'count'\] but documented \['kind'\]"):
        program_format_doc.fixed_struct_table(declared, {"kind": "k"}, "S")
    with pytest.raises(ValueError, match="declared fields"):
        program_format_doc.record_table(declared, {"count": ("u16", "c"), "kind": ("u8", "k")}, "S")


def test_program_format_doc_lists_every_opcode_with_its_number_and_attributes():
    text = (DOCS / "program-format.md").read_text(encoding="utf-8")
    for spec in OPS.values():
        assert f"| {int(spec.opcode)} | {spec.name} |" in text, spec.name
        for a in spec.attrs:
            assert f"| {spec.name} | `{a.name}` | {a.type} |" in text, (spec.name, a.name)
