"""Background operations (FLAG_ASYNC, CONTROL.START), STATUS.BUSY, OP_RESULT and CONTROL.ABORT.

The big write-verify is one 4096 x 1024 region: 64 chunks of 64 rows, about half a second
on two cores, so an abort sent right after the ACK arrives long before it could finish.
Frames written to an in-process port in one write() are served in one turn of the chip
lock, before any chunk: that makes "START, then read STATUS" deterministic.
"""

from __future__ import annotations

import re
import struct

import numpy as np
import pytest

from nvcim import driver
from nvcim.firmware_emu.cell_commands import WRITE_CHUNK_CELLS
from nvcim.firmware_emu.contract.program_format import pack_cells
from nvcim.firmware_emu.contract.protocol import (
    FLAG_ASYNC,
    CellQuantity,
    CellsEraseArgs,
    CellsReadArgs,
    CellsWriteArgs,
    CellsWriteReply,
    Command,
    ErrorCode,
    Frame,
    FrameReader,
    encode,
)
from nvcim.firmware_emu.contract.registers import BY_NAME, OpState
from nvcim.firmware_emu.run_commands import RUN_SLICE

from polling import poll_until

ROWS, COLS = 4096, 1024
BIG = f"arrays=1&rows={ROWS}&cols={COLS}"
CHUNK_ROWS = WRITE_CHUNK_CELLS // COLS
QUANTITIES = (CellQuantity.CONDUCTANCE, CellQuantity.NOISE, CellQuantity.TARGET)
STATUS_READY, STATUS_BUSY, STATUS_ERROR = 0x1, 0x2, 0x8
IRQ_DONE, IRQ_ERROR, IRQ_ABORTED = 0x1, 0x2, 0x8
ALL_IRQ = 0xF


def _targets(seed: int, shape: tuple[int, int] = (ROWS, COLS)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 4, shape).astype(np.uint8)


def _cells(dev: driver.Device, array: int = 0, rows: int = ROWS, cols: int = COLS) -> list[np.ndarray]:
    """Conductance, captured noise and target of a region (read_noise is 0: the reads draw nothing)."""
    return [dev.read_cells(array, 0, 0, rows, cols, q) for q in QUANTITIES]


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after}


def _reg(name: str) -> bytes:
    return struct.pack("<I", BY_NAME[name].offset)


def _reg_write(name: str, value: int) -> bytes:
    return struct.pack("<II", BY_NAME[name].offset, value)


class Raw:
    """Raw frames on an in-process port, with sequence numbers the driver's link never uses."""

    def __init__(self, dev: driver.Device):
        self.port, self.seq, self.reader = dev.link.port, 0x8000, FrameReader()

    def frame(self, command: int, payload: bytes = b"", flags: int = 0) -> bytes:
        self.seq += 1
        return encode(command, self.seq, payload, flags)

    def send(self, *frames: bytes) -> list[Frame]:
        """Write the frames in one write() (served in one turn of the chip lock), return the replies."""
        self.port.write(b"".join(frames))
        replies = self.reader.feed(self.port.read(self.port.in_waiting))
        assert len(replies) == len(frames) and all(isinstance(r, Frame) for r in replies), replies
        return replies

    def ask(self, command: int, payload: bytes = b"", flags: int = 0) -> Frame:
        return self.send(self.frame(command, payload, flags))[0]


def _value(reply: Frame) -> int:
    assert not reply.is_error, reply.error()
    return struct.unpack("<I", reply.payload)[0]


def test_write_verify_aborted_right_after_the_ack_keeps_whole_chunks_and_nothing_else():
    url = f"emu://?{BIG}&sigma=0.3&seed=11&stuck_rate=0.01"
    with driver.open(url) as dev, driver.open(url) as ref:
        for d in (dev, ref):
            d.write_cells(0, 0, 0, _targets(1))  # what the cells held before: an open-loop image
        before = _cells(dev)
        dev.write_register("IRQ_FLAGS", ALL_IRQ)
        counts = dev.counters()
        op = dev.write_cells(0, 0, 0, _targets(2), verify=True, background=True)
        op.abort()
        assert not dev.busy  # took effect before the write ended: progress < total and the rest untouched, below
        with pytest.raises(driver.DeviceError, match=r"CELLS_WRITE aborted after \d+ of 4096 rows") as e:
            op.wait(timeout=5)
        assert e.value.code == ErrorCode.ABORTED and e.value.command == "CELLS_WRITE (background)"
        rows = int(re.search(r"after (\d+) of", e.value.chip_message).group(1))
        assert rows < ROWS and rows % CHUNK_ROWS == 0, rows  # whole chunks only, far from the end
        spent = _delta(dev.counters(), counts)
        status, irq = dev.read_register("STATUS"), dev.read_register("IRQ_FLAGS")
        assert status & STATUS_READY and not status & STATUS_BUSY
        assert irq & IRQ_ABORTED and not irq & IRQ_DONE and not irq & IRQ_ERROR
        assert dev.read_register("ERROR_CODE") == ErrorCode.ABORTED
        assert dev.read_register("OP_STATUS") == Command.CELLS_WRITE | OpState.ABORTED << 8
        assert dev.read_register("OP_PROGRESS") == rows * COLS
        assert dev.read_register("OP_TOTAL") == ROWS * COLS
        after = _cells(dev)
        for b, a in zip(before, after):  # unfinished rows: bit for bit as before
            assert np.array_equal(a[rows:], b[rows:])
        assert np.array_equal(after[2][:rows], _targets(2)[:rows])  # finished rows: programmed
        # the same chip history with a synchronous write of exactly the finished rows
        ref_counts = ref.counters()
        stats = ref.write_cells(0, 0, 0, _targets(2)[:rows], verify=True) if rows else driver.WriteStats()
        assert spent == _delta(ref.counters(), ref_counts)  # counters: exactly the pulses done
        assert spent["write_pulses"] == stats.write_pulses and spent["cells_written"] == rows * COLS
        assert f"{stats.write_pulses} write pulses" in e.value.chip_message
        for a, r in zip(after, _cells(ref)):
            assert np.array_equal(a, r)
        # the chip takes commands again
        assert dev.write_cells(0, 0, 0, np.full((2, 2), 3, np.uint8)).cells == 4
        assert dev.read_register("OP_STATUS") >> 8 == OpState.ABORTED  # a synchronous write is not an operation


def test_driver_background_write_shows_progress_and_aborts_mid_way():
    url = f"emu://?{BIG}&sigma=0.3&seed=4"
    with driver.open(url) as dev:
        op = dev.write_cells(0, 0, 0, _targets(5), verify=True, background=True)
        assert op.busy and dev.busy
        poll_until(lambda: op.progress[0] >= 3 * CHUNK_ROWS * COLS, "three chunks written")
        done, total = op.progress
        assert total == ROWS * COLS and done % (CHUNK_ROWS * COLS) == 0
        op.abort()
        assert not op.busy and not dev.busy
        with pytest.raises(driver.DeviceError) as e:
            op.wait()
        assert e.value.code == ErrorCode.ABORTED
        rows = op.progress[0] // COLS
        assert 3 * CHUNK_ROWS <= rows < ROWS
        target = dev.read_cells(0, 0, 0, ROWS, COLS, CellQuantity.TARGET)
        assert np.array_equal(target[:rows], _targets(5)[:rows]) and not target[rows:].any()


def test_commands_while_busy_are_refused_with_busy_and_change_nothing():
    url = f"emu://?{BIG}&sigma=0.3&seed=5"
    t = _targets(3)
    with driver.open(url) as dev, driver.open(url) as ref:
        dev.write_register("VERIFY_TOL", 3000)
        ref.write_register("VERIFY_TOL", 3000)
        op = dev.write_cells(0, 0, 0, t, verify=True, background=True)
        raw = Raw(dev)
        region = dict(array=0, row=0, col=0, height=2, width=2)
        refused = {
            Command.BUF_WRITE: struct.pack("<I", 0) + b"\xff" * 64,
            Command.BUF_READ: struct.pack("<II", 0, 16),
            Command.PROGRAM_FETCH: b"",
            Command.CELLS_WRITE: CellsWriteArgs.build(dict(region=region, mode=0, masked=0)),
            Command.CELLS_READ: CellsReadArgs.build(dict(region=region, quantity=0)),
            Command.CELLS_ERASE: CellsEraseArgs.build(dict(region=region, arrays=1)),
            Command.RUN: struct.pack("<I", 1),
        }
        for command, payload in refused.items():
            reply = raw.ask(command, payload)
            code, message = reply.error()
            assert code == ErrorCode.BUSY and message.startswith(f"{command.name} refused: CELLS_WRITE ("), message
        for name, value in (("SIGMA", 0), ("SEED", 99), ("VERIFY_TOL", 1), ("STUCK_RATE", 100)):
            kept = dev.read_register(name)
            with pytest.raises(driver.DeviceError, match=f"{name} is in use by the running CELLS_WRITE") as e:
                dev.write_register(name, value)
            assert e.value.code == ErrorCode.BUSY and dev.read_register(name) == kept
        dev.write_register("RUN_BATCH", 7)  # not used by a write: accepted
        with pytest.raises(driver.DeviceError, match="CONTROL.SOFT_RESET while CELLS_WRITE") as e:
            dev.reset()
        assert e.value.code == ErrorCode.BUSY and dev.read_register("RUN_BATCH") == 7  # no reset took place
        assert raw.ask(Command.PING, b"still here").payload == b"still here"
        assert raw.ask(Command.IDENTIFY).payload
        assert raw.ask(Command.OP_RESULT).error()[0] == ErrorCode.BUSY
        dev.write_register("IRQ_FLAGS", ALL_IRQ)  # W1C works while busy
        stats = op.wait(timeout=10)
        assert dev.read_register("IRQ_FLAGS") & IRQ_DONE
        # nothing the refused commands carried took effect: same cells, pulses and buffer as an undisturbed write
        assert stats == ref.write_cells(0, 0, 0, t, verify=True)
        assert dev.counters() == ref.counters()
        assert dev.buffer_read(len(pack_cells(t, 2))) == pack_cells(t, 2)
        for a, b in zip(_cells(dev), _cells(ref)):
            assert np.array_equal(a, b)


@pytest.mark.parametrize("verify", [False, True], ids=["open-loop", "write-verify"])
def test_sync_and_async_writes_and_erases_are_bit_identical(verify):
    url = "emu://?arrays=3&rows=1024&cols=512&sigma=0.3&seed=7&stuck_rate=0.02&read_noise=0.01"
    t = _targets(8, (1024, 512))
    mask = np.random.default_rng(9).random((1024, 512)) < 0.7
    results = []
    for background in (False, True):
        with driver.open(url) as dev:
            dev.write_register("VERIFY_MAX_ITER", 2)  # leaves some verify failures
            out = dev.write_cells(1, 0, 0, t, verify=verify, mask=mask, background=background)
            stats = out.wait(timeout=10) if background else out
            dev.write_cells(2, 0, 0, t)
            erased = dev.erase(2, row=100, height=600, background=background)
            if background:
                erased.wait(timeout=10)
            cells = _cells(dev, 1, 1024, 512) + _cells(dev, 2, 1024, 512)  # read noise: the reads draw too
            results.append((stats, dev.counters(), cells))
    (s_sync, c_sync, sync), (s_async, c_async, asynchronous) = results
    assert s_sync == s_async and c_sync == c_async
    assert s_sync.cells == mask.sum() and (s_sync.verify_failures > 0) == verify
    for a, b in zip(sync, asynchronous):
        assert np.array_equal(a, b)
    assert not sync[5][100:700].any() and sync[5][:100].any()  # the erase took rows 100..699 only


def test_control_start_runs_in_the_background_and_its_outputs_follow(mlp_path):
    x = np.random.default_rng(3).standard_normal((4 * RUN_SLICE + 5, 64)).astype(np.float32)
    with driver.load(mlp_path, device="emu://?sigma=0.2&seed=3") as sess:
        dev = sess.device
        expected, = dev.run([x])
        dev.buffer_write(x.tobytes())
        dev.write_register("RUN_BATCH", len(x))
        raw = Raw(dev)
        mvm = dev.counters()["mvm_ops"]
        ack, status, progress, total = raw.send(raw.frame(Command.REG_WRITE, _reg_write("CONTROL", 0b10)),
                                                raw.frame(Command.REG_READ, _reg("STATUS")),
                                                raw.frame(Command.REG_READ, _reg("OP_PROGRESS")),
                                                raw.frame(Command.REG_READ, _reg("OP_TOTAL")))
        assert ack.flags & FLAG_ASYNC and ack.payload == b""  # the REG_WRITE returned before the run
        assert _value(status) & STATUS_BUSY and not _value(status) & STATUS_READY
        assert _value(progress) == 0 and _value(total) == len(x)
        poll_until(lambda: not dev.busy, "the CONTROL.START run finished")
        got = np.frombuffer(dev.buffer_read(expected.nbytes), dtype="<f4").reshape(expected.shape)
        assert np.array_equal(got, expected)
        assert dev.counters()["mvm_ops"] - mvm == 2 * len(x)
        reply = raw.ask(Command.OP_RESULT).payload  # the RUN reply: one output of shape (batch, 10)
        assert reply == struct.pack("<BB2I", 1, 2, len(x), 10)


def test_an_aborted_run_writes_no_output_and_counts_no_operation(mlp_path):
    x = np.random.default_rng(4).standard_normal((3 * RUN_SLICE, 64)).astype(np.float32)
    with driver.load(mlp_path, device="emu://?sigma=0.2&seed=3") as sess:
        dev = sess.device
        dev.buffer_write(x.tobytes())
        dev.write_register("RUN_BATCH", len(x))
        raw = Raw(dev)
        mvm = dev.counters()["mvm_ops"]
        start, abort = raw.send(raw.frame(Command.REG_WRITE, _reg_write("CONTROL", 0b10)),
                                raw.frame(Command.REG_WRITE, _reg_write("CONTROL", 0b100)))
        assert not start.is_error and not abort.is_error
        code, message = raw.ask(Command.OP_RESULT).error()
        assert code == ErrorCode.ABORTED
        assert message == (f"CONTROL.START aborted after 0 of {len(x)} samples (0 slices of {RUN_SLICE}); "
                           f"no output written, buffer unchanged")
        assert dev.buffer_read(x.nbytes) == x.tobytes()
        assert dev.counters()["mvm_ops"] == mvm
        # the same staged inputs run to the end through the driver
        assert np.array_equal(dev.start().wait(timeout=5)[0], dev.run([x])[0])


def test_op_result_is_idempotent_and_a_retransmission_gets_the_same_bytes():
    with driver.open(f"emu://?{BIG}&seed=2") as dev:
        raw = Raw(dev)
        code, message = raw.ask(Command.OP_RESULT).error()
        assert code == ErrorCode.BAD_ARGUMENT and "no background operation since power-on" in message
        assert dev.read_register("ERROR_CODE") == 0  # OP_RESULT reports, it records no error
        t = _targets(6)
        dev.buffer_write(pack_cells(t, 2))
        args = CellsWriteArgs.build(dict(region=dict(array=0, row=0, col=0, height=ROWS, width=COLS),
                                         mode=1, masked=0))
        ack = raw.ask(Command.CELLS_WRITE, args, FLAG_ASYNC)
        assert ack.flags & FLAG_ASYNC and ack.payload == b""
        assert raw.ask(Command.OP_RESULT).error()[0] == ErrorCode.BUSY
        assert not raw.ask(Command.REG_WRITE, _reg_write("CONTROL", 0b100)).is_error
        frame = raw.frame(Command.OP_RESULT)
        first, again = raw.send(frame)[0], raw.send(frame)[0]  # the same frame, same SEQ: a retransmission
        assert first == again and first.error()[0] == ErrorCode.ABORTED
        assert raw.ask(Command.OP_RESULT).payload == first.payload  # a new SEQ: the same answer
        # a finished operation: OP_RESULT is the CELLS_WRITE reply, as often as asked
        dev.erase(0)
        small = pack_cells(t[:64], 2)
        dev.buffer_write(small)
        args = CellsWriteArgs.build(dict(region=dict(array=0, row=0, col=0, height=64, width=COLS), mode=0, masked=0))
        raw.ask(Command.CELLS_WRITE, args, FLAG_ASYNC)
        poll_until(lambda: not dev.busy, "the 64-row write finished")
        results = {raw.ask(Command.OP_RESULT).payload for _ in range(3)}
        assert len(results) == 1
        reply = CellsWriteReply.parse(results.pop())
        assert (reply.cells, reply.write_pulses, reply.read_pulses) == (64 * COLS,) * 3


def test_abort_with_nothing_running_is_a_no_op():
    with driver.open("emu://") as dev:
        dev.write_cells(0, 0, 0, np.ones((2, 2), np.uint8))
        irq, counts = dev.read_register("IRQ_FLAGS"), dev.counters()
        dev.abort()
        assert dev.read_register("IRQ_FLAGS") == irq and dev.read_register("ERROR_CODE") == 0
        assert dev.counters() == counts and not dev.busy


def test_an_aborted_write_is_committed_to_the_image(tmp_path):
    url = f"emu://?image={tmp_path / 'chip.nvm'}&arrays=1&rows=2048&cols={COLS}&sigma=0.3&seed=8"
    with driver.open(url) as dev:
        op = dev.write_cells(0, 0, 0, _targets(7, (2048, COLS)), verify=True, background=True)
        op.abort()
        with pytest.raises(driver.DeviceError):
            op.wait()
        rows = op.progress[0] // COLS
        kept = _cells(dev, rows=2048)
    with driver.open(f"emu://?image={tmp_path / 'chip.nvm'}") as dev:  # a power cycle
        for a, b in zip(_cells(dev, rows=2048), kept):
            assert np.array_equal(a, b)
    assert np.array_equal(kept[2][:rows], _targets(7, (2048, COLS))[:rows]) and not kept[2][rows:].any()


def test_abort_over_a_served_pty(serve):
    server = serve("--pty", "--arrays", "1", "--rows", str(ROWS), "--cols", str(COLS), "--seed", "2")
    with driver.open(server.address) as dev:
        t = _targets(9)
        op = dev.write_cells(0, 0, 0, t, verify=True, background=True)
        assert dev.busy
        op.abort()
        assert not dev.busy  # took effect before the write ended: rows < ROWS and the rest untouched, below
        with pytest.raises(driver.DeviceError, match="CELLS_WRITE aborted after") as e:
            op.wait(timeout=5)
        assert e.value.code == ErrorCode.ABORTED
        assert dev.read_register("ERROR_CODE") == ErrorCode.ABORTED
        assert dev.read_register("IRQ_FLAGS") & IRQ_ABORTED
        rows = op.progress[0] // COLS
        assert rows < ROWS
        target = dev.read_cells(0, 0, 0, ROWS, COLS, CellQuantity.TARGET)
        assert np.array_equal(target[:rows], t[:rows]) and not target[rows:].any()
        assert dev.write_cells(0, 0, 0, np.full((4, 4), 2, np.uint8)).cells == 16  # serves commands again


def test_a_background_run_that_fails_reports_its_error_and_leaves_the_buffer(mlp_path, monkeypatch):
    """A failure inside the worker (here the executor refusing the program) ends the
    operation FAILED: ERROR set, DONE not, OP_RESULT and wait() give the chip's error."""
    from nvcim.firmware_emu import executor

    def refuse(*args, **kwargs):
        raise executor.ExecutionError("instruction 3 cannot run (simulated)")

    x = np.random.default_rng(5).standard_normal((8, 64)).astype(np.float32)
    with driver.load(mlp_path, device="emu://?sigma=0.2&seed=3") as sess:
        dev = sess.device
        dev.write_register("IRQ_FLAGS", ALL_IRQ)
        monkeypatch.setattr(executor, "run", refuse)
        op = dev.run([x], background=True)
        with pytest.raises(driver.DeviceError, match=r"RUN \(background\).*instruction 3 cannot run") as e:
            op.wait(timeout=5)
        assert e.value.code == ErrorCode.BAD_ARGUMENT
        state = (dev.read_register("OP_STATUS") >> 8) & 0xFF
        assert state == OpState.FAILED
        assert dev.read_register("IRQ_FLAGS") & (IRQ_DONE | IRQ_ERROR) == IRQ_ERROR
        assert dev.read_register("ERROR_CODE") == ErrorCode.BAD_ARGUMENT
        assert dev.buffer_read(x.nbytes) == x.tobytes()  # no output written over the inputs
        assert not dev.busy
