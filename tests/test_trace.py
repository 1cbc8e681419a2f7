"""Link traces: every frame recorded and decoded (trace:// URLs, wrapped ports), shown and replayed."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import serial
from click.testing import CliRunner

from nvcim import driver
from nvcim.driver.link import Link
from nvcim.driver.trace import TracingSerial, read_trace, replay
from nvcim.tools.cli import main

SMALL = "emu://?arrays=2&rows=16&cols=16&seed=3"


def _session(dev) -> None:
    """A little of everything: registers, a refused write, cells written and read back."""
    dev.read_register("STATUS")
    dev.write_register("SIGMA", 0x4000)
    with pytest.raises(driver.DeviceError):
        dev.write_register("CHIP_ID", 1)
    dev.write_cells(0, 0, 0, np.array([[1, 2], [3, 0]]), verify=True)
    dev.read_cells(0, 0, 0, 2, 2)


def test_trace_url_records_every_frame_decoded(tmp_path):
    path = tmp_path / "t.jsonl"
    with driver.open(f"trace://{SMALL}#file={path}") as dev:
        _session(dev)
    lines = path.read_text().splitlines()
    header = json.loads(lines[0])
    assert header["nvcim_trace"] == 1 and header["port"] == SMALL
    records = [r for _, r in read_trace(path)]
    requests = [r for r in records if r.direction == "tx"]
    replies = [r for r in records if r.direction == "rx"]
    # one reply per request, in order, echoing its sequence number and command
    assert [(r.seq, r.command) for r in requests] == [(r.seq, r.command) for r in replies]
    assert [r.seq for r in requests] == list(range(1, len(requests) + 1))
    assert [r.t for r in records] == sorted(r.t for r in records)
    summaries = [f"{r.command_name} {r.summary}" for r in records]
    assert "IDENTIFY chip_id=0x4E564331 version=0x100 arrays=2 rows=16 cols=16" in summaries[1]
    assert "REG_READ STATUS = 0x00000001" in summaries
    assert "REG_WRITE SIGMA <- 0x00004000" in summaries
    refused = next(r for r in replies if r.error is not None)
    assert refused.command_name == "REG_WRITE" and refused.summary.startswith("ERROR READ_ONLY: write to read-only")
    assert refused.flags == 0x3  # RESPONSE | ERROR
    assert "CELLS_WRITE array 0 rows 0..1 cols 0..1 VERIFY" in summaries
    write_reply = next(r for r in replies if r.command_name == "CELLS_WRITE")
    assert write_reply.summary.startswith("cells=4 write_pulses=")
    assert all(r.length == len(r.payload) for r in requests)  # requests keep their whole payload


def test_live_lines_and_a_function_as_sinks():
    text, seen = io.StringIO(), []
    dev = driver.Device(Link(TracingSerial.around(serial.serial_for_url(SMALL), text)))
    dev.read_register("SEED")
    dev.close()
    lines = text.getvalue().splitlines()
    assert lines[0].split()[1:3] == ["->", "IDENTIFY"] and lines[1].split()[1:4] == ["<-", "IDENTIFY", "#1"]
    assert lines[-1].split()[1:] == ["<-", "REG_READ", "#2", "RESP", "4", "B", "SEED", "=", "0x00000003"]
    port = TracingSerial.around(serial.serial_for_url(SMALL), seen.append)
    driver.Device(Link(port)).close()
    assert [r.command_name for r in seen] == ["IDENTIFY", "IDENTIFY"]


def test_bad_trace_url_options_are_named():
    with pytest.raises(driver.LinkError, match="unknown trace option.*colour"):
        driver.open(f"trace://{SMALL}#colour=1")
    with pytest.raises(driver.LinkError, match="name the device to trace"):
        driver.open("trace://")


def test_replay_matches_the_same_chip_and_names_the_first_difference(tmp_path):
    path = tmp_path / "t.jsonl"
    with driver.open(f"trace://{SMALL}#file={path}") as dev:
        _session(dev)
    same = replay(path, serial.serial_for_url(SMALL))
    assert same.difference is None and same.requests == 9  # the STATUS read after the refusal included
    another_board = replay(path, serial.serial_for_url(SMALL.replace("seed=3", "seed=4"))).difference
    assert another_board is not None and another_board.request.startswith("IDENTIFY")  # its unique ID differs
    with driver.open(SMALL) as dev:
        uid = dev.identity.unique_id
    other = replay(path, serial.serial_for_url(SMALL.replace("seed=3", f"seed=4&uid={uid}")))
    diff = other.difference
    # the same board reseeded: the seed shows first in the cells written (pulse counts, or the read-back)
    assert diff is not None and diff.request.startswith(("CELLS_WRITE", "BUF_READ"))
    lines = path.read_text().splitlines()
    assert json.loads(lines[diff.line - 1])["cmd"] == diff.request.split()[0]
    assert "recorded: [RESP]" in str(diff) and "replayed: [RESP]" in str(diff)


def test_cli_show_and_replay(tmp_path):
    path = tmp_path / "t.jsonl"
    runner = CliRunner()
    out = runner.invoke(main, ["regs", "read", "STATUS", "--device", SMALL, "--trace", str(path)])
    assert out.exit_code == 0, out.output
    shown = runner.invoke(main, ["trace", "show", str(path)]).output.splitlines()
    assert [line.split()[2] for line in shown] == ["IDENTIFY", "IDENTIFY", "REG_READ", "REG_READ"]
    ok = runner.invoke(main, ["trace", "replay", str(path), "--device", SMALL])
    assert ok.exit_code == 0 and "2 requests replayed" in ok.output and "every reply as recorded" in ok.output
    other = runner.invoke(main, ["trace", "replay", str(path), "--device", "emu://?arrays=3&rows=16&cols=16"])
    assert other.exit_code == 1 and "reply 1 of 1 differs" in other.output and "arrays=3" in other.output


def test_a_file_that_is_not_a_trace_is_named_with_its_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"nvcim_trace": 1}\n{"dir": "tx"}\n')
    result = CliRunner().invoke(main, ["trace", "show", str(bad)])
    assert result.exit_code == 1 and f"{bad}:2: not a trace record" in result.output
    (tmp_path / "plain.txt").write_text("hello\n")
    result = CliRunner().invoke(main, ["trace", "show", str(tmp_path / "plain.txt")])
    assert result.exit_code == 1 and "plain.txt:1: not an nvcim trace" in result.output
