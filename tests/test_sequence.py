"""Programming sequences as data: the shipped examples over a real pty, TCP and in process; every
bad file, value or failing step named by file, line and step."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from nvcim import driver
from nvcim.driver.trace import read_trace
from nvcim.tools import sequence
from nvcim.tools.cli import main

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "sequences"
SMALL = "emu://?arrays=4&rows=64&cols=64&seed=1"


def _run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert "Traceback" not in result.output
    return result


def test_examples_pass_over_a_real_pty_with_a_trace(serve, tmp_path):
    chip = serve("--pty", "--arrays", "4", "--rows", "64", "--cols", "64")
    trace = tmp_path / "run.jsonl"
    result = _run("seq", "run", EXAMPLES / "bringup.yaml", EXAMPLES / "program_verify.yaml",
                  EXAMPLES / "noise_capture.yaml", "--device", chip.address, "--out", tmp_path, "--trace", trace)
    assert result.exit_code == 0, result.output
    assert [line.split()[0] for line in result.output.splitlines() if line.startswith(("PASS", "FAIL"))] == \
        ["PASS:"] * 3
    assert "4.1    line 11   cells_write [block=3]: wrote array 0 rows 24..31" in result.output
    noise = np.load(tmp_path / "noise_array1.npy")
    assert noise.shape == (64, 64) and 0.85 <= noise.std() <= 0.95  # SIGMA 0.3 x g_max 3
    deviation = np.loadtxt(tmp_path / "deviation_array1.csv", delimiter=",")
    np.testing.assert_allclose(deviation, noise, atol=1e-5)  # no read noise: g - target is what was captured
    commands = {r.command_name for _, r in read_trace(trace)}
    assert {"IDENTIFY", "REG_WRITE", "CELLS_WRITE", "CELLS_ERASE", "CELLS_READ", "BUF_READ"} <= commands


def test_the_same_file_runs_over_tcp_and_in_process(serve):
    chip = serve("--tcp", "0", "--arrays", "2", "--rows", "16", "--cols", "16")
    for device in (chip.address, SMALL):
        result = _run("seq", "run", "-q", EXAMPLES / "bringup.yaml", "--device", device)
        assert result.exit_code == 0 and result.output.startswith("PASS:"), result.output


def test_abort_example_on_its_own_device():
    result = _run("seq", "run", EXAMPLES / "abort_write.yaml")
    assert result.exit_code == 0, result.output
    assert "(on emu://?arrays=1&rows=4096&cols=1024)" in result.output
    assert "CELLS_WRITE aborted: CELLS_WRITE aborted after" in result.output


def test_every_example_is_well_formed():
    for path in sorted(EXAMPLES.glob("*.yaml")):
        assert sequence.load(path).steps


def _file(tmp_path, text: str) -> Path:
    path = tmp_path / "seq.yaml"
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


@pytest.mark.parametrize("text, message", [
    ("steps:\n  - read: STATUS\n   expect: 1\n", "seq.yaml:3: not valid YAML"),
    ("steps:\n  - read: STATUS\n  - poke: {SIGMA: 1}\n", "seq.yaml:3: step 2: no action; a step has exactly one of"),
    ("steps:\n  - read: STATUS\n    wait: STATUS\n", "seq.yaml:2: step 1: several actions (read, wait)"),
    ("steps:\n  - read: STATUS\n    expcet: 1\n",
     "seq.yaml:3: step 1 (read STATUS): option 'expcet' is not known for read (known: expect, mask, name"),
    ("steps:\n  - write:\n      SIGMA: 0.3\n      SIGMAA: 1\n",
     "seq.yaml:2: step 1 (write): no register SIGMAA in the nvcim register map (did you mean SIGMA?)"),
    ("steps:\n  - read: STATUS.BUSSY\n", "step 1 (read STATUS.BUSSY): register STATUS has no field BUSSY"),
    ("steps:\n  - reset:\n  - write: {VERIFY_MAX_ITER: 300}\n",
     "seq.yaml:3: step 2 (write): VERIFY_MAX_ITER: value 300 out of range 0..255"),
    ("steps:\n  - write: {CHIP_ID: 1}\n", "step 1 (write): CHIP_ID is read-only (RO)"),
    ("steps:\n  - wait: STATUS.BUSY\n    timeout: 1\n", "step 1 (wait STATUS.BUSY): wait: needs 'equals:'"),
    ("steps:\n  - cells_read: {array: 0, quantity: charge}\n", "quantity 'charge' is not one of conductance"),
    ("steps:\n  - counters: {pulses: 3}\n", "counters: 'pulses' is not one of write_pulses"),
    ("steps:\n  - read: STATUS\n    expect_error: OOPS\n", "'OOPS' is not a chip error code"),
    ("steps:\n  - repeat: 2\n", "step 1 (repeat 2): repeat needs 'steps:'"),
    ("steps:\n  - repeat: 2\n    steps:\n      - sleep: 0\n      - read: NOPE\n",
     "seq.yaml:5: step 1.2 (read NOPE): no register NOPE"),
    ("steps:\n  - read: STATUS\n    read: SEED\n", "seq.yaml:3: not valid YAML: key 'read' appears twice"),
    ("name: x\nstep:\n  - reset:\n", "seq.yaml:2: unknown top-level key 'step'"),
    ("- 1\n- 2\n", "seq.yaml:1: step 1: each step is a mapping"),
])
def test_malformed_files_are_named_by_file_line_and_step(tmp_path, text, message):
    path = _file(tmp_path, text)
    with pytest.raises(sequence.SequenceError) as e:
        sequence.load(path)
    assert message in str(e.value) and str(path) in str(e.value)
    result = _run("seq", "check", path)
    assert result.exit_code == 1 and message in result.output


def test_a_malformed_file_touches_no_chip(tmp_path):
    ok = _file(tmp_path, "steps:\n  - write: {SIGMA: 0.5}\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps:\n  - write: {SIGMA: 5.0}\n")
    chip = "emu://seq-untouched?arrays=1&rows=8&cols=8"
    result = _run("seq", "run", ok, bad, "--device", chip)
    assert result.exit_code == 1 and "bad.yaml:2: step 1 (write): SIGMA: value 327680 = 5 in Q16.16 out of range" \
        in result.output
    with driver.open(chip) as dev:
        assert dev.read_register("SIGMA") == round(0.3 * 65536)  # the good file did not run either


def test_failing_steps_report_file_line_step_and_why(tmp_path):
    path = _file(tmp_path, """
        name: failing
        steps:
          - write: {SIGMA: 0.5}
          - name: sigma as written
            read: SIGMA
            expect: 0.5
          - cells_write: {array: 0, rows: 4, cols: 4, targets: 3, verify: true}
          - wait: STATUS.PROGRAM_LOADED
            equals: 1
            timeout: 0.05
    """)
    dev = driver.open("emu://?arrays=1&rows=8&cols=8")
    report = sequence.run(sequence.load(path), dev)
    assert not report.passed and [r.ok for r in report.results] == [True, True, True, False]
    failure = report.failure
    assert failure.where == f"{path}:8: step 4 (wait STATUS.PROGRAM_LOADED)"
    assert failure.detail == "timed out after 0.05 s: STATUS.PROGRAM_LOADED is still 0x0, waited for 0x1"
    assert report.summary().startswith(f"FAIL: {path}:8: step 4 (wait STATUS.PROGRAM_LOADED): timed out after")
    dev.close()

    mismatch = _file(tmp_path, "steps:\n  - read: CAP_GEOMETRY.ROWS\n    expect: 16\n")
    result = _run("seq", "run", mismatch, "--device", "emu://?arrays=1&rows=8&cols=8")
    assert result.exit_code == 1
    assert f"FAIL: {mismatch}:2: step 1 (read CAP_GEOMETRY.ROWS): CAP_GEOMETRY.ROWS = 0x8, expected 0x10" \
        in result.output


def test_expected_refusals_masks_ranges_and_loop_variables(tmp_path):
    path = _file(tmp_path, """
        steps:
          - write: {ARRAY_SELECT: 5}
            expect_error: BAD_ARGUMENT
          - read: STATUS
            expect: 0x1
            mask: 0x3
          - repeat: 3
            as: i
            steps:
              - cells_write: {array: "${i}", row: "${i * 2}", rows: 2, cols: 8, targets: "${i + 1}"}
                expect: {cells: 16, write_pulses: [16, 16]}
          - counters: {cells_written: 48}
          - cells_read: {array: 2, row: 4, rows: 2, cols: 8, quantity: target}
            expect: {min: 3, max: 3}
          - name: a write the chip accepts fails a step that expects a refusal
            write: {SEED: 1}
            expect_error: BAD_ARGUMENT
    """)
    with driver.open("emu://?arrays=3&rows=8&cols=8") as dev:
        report = sequence.run(sequence.load(path), dev)
    assert [r.ok for r in report.results] == [True, True, True, True, True, True, True, False]
    assert report.results[4].where.endswith("step 3.1 (cells_write) [i=2]")
    assert "expected the chip to refuse with BAD_ARGUMENT, it accepted: SEED=0x1" in report.failure.detail


def test_a_loop_variable_that_is_not_defined_is_named(tmp_path):
    path = _file(tmp_path, "steps:\n  - cells_write: {array: \"${j}\", targets: 1}\n")
    with driver.open("emu://?arrays=1&rows=8&cols=8") as dev:
        report = sequence.run(sequence.load(path), dev)
    assert report.failure.where == f"{path}:2: step 1 (cells_write)"
    assert report.failure.detail == "${j}: no loop variable 'j' here"
