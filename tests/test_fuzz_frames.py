"""Property tests of the chip's frame parser and command handlers, fed whole byte streams.

A stream is a sequence of pieces: well-formed requests of every command with payloads of
random or plausible field values (register addresses from the map, regions near the
chip's size, batches, buffer ranges), the same frames damaged (a flipped bit in the header,
payload or CRC, a wrong length, cut short), and garbage. Each piece is fed on its own, cut
at random points, to a chip holding a small program. Asserted for every piece:

* ``feed`` returns (never raises) and every reply is a well-formed response frame;
* no reply is INTERNAL (the chip's own traceback), every error reply carries an ErrorCode;
* every intact request gets exactly one reply with its sequence number;
* a piece answered by error replies alone (or by none: a damaged or partial frame) changes
  no state: registers (but the error ones), cells, staging buffer, loaded program, counters.

And through an emulated noisy link (bytes flipped, dropped, duplicated at a given rate):
results equal the clean link's bit for bit, or the call raises a LinkError.

The fast profile runs in the default suite; ``NVCIM_FUZZ=long`` the long one
(docs/reliability.md#bounded-inputs gives its figures; ``-s`` prints the tallies).
"""

from __future__ import annotations

import collections
import hashlib

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nvcim.firmware_emu.contract.protocol import (
    FLAG_ERROR,
    FLAG_RESPONSE,
    HEADER_SIZE,
    SYNC,
    BufReadArgs,
    BufWriteHeader,
    CellsEraseArgs,
    CellsReadArgs,
    CellsWriteArgs,
    Command,
    ErrorCode,
    ErrorReply,
    Frame,
    FrameError,
    FrameReader,
    ProgramLoadArgs,
    RegReadArgs,
    RegWriteArgs,
    RunArgs,
    encode,
)
from nvcim.firmware_emu.contract.registers import REGISTERS

from chip_programs import load, new_chip, small_model, small_program
from fuzzing import LONG, fuzz
from polling import poll_until

PIECES_PER_STREAM = 50
FUZZ = fuzz(fast=30, long=2100)  # x 50 pieces: >= 100,000 frames in the long profile
TALLY: collections.Counter = collections.Counter()
ERROR_REGISTERS = ("STATUS", "ERROR_CODE", "ERROR_ADDR", "IRQ_FLAGS")

u32 = st.integers(0, 2 ** 32 - 1)
near = st.one_of(st.integers(0, 40), st.sampled_from([2 ** 31 - 1, 2 ** 32 - 1, 1 << 16, 1 << 20]))
region = st.fixed_dictionaries(dict(array=near, row=near, col=near, height=near, width=near))


def _args(command: Command):
    """Payloads for ``command``: its struct with plausible or random fields, or random bytes."""
    plausible = {
        Command.REG_READ: st.builds(lambda a: RegReadArgs.build(dict(addr=a)),
                                    st.one_of(st.sampled_from([r.offset for r in REGISTERS]), u32)),
        Command.REG_WRITE: st.builds(lambda a, v: RegWriteArgs.build(dict(addr=a, value=v)),
                                     st.sampled_from([r.offset for r in REGISTERS]), st.one_of(near, u32)),
        Command.BUF_WRITE: st.builds(lambda o, d: BufWriteHeader.build(dict(offset=o)) + d,
                                     st.one_of(st.integers(0, 70000), u32), st.binary(max_size=64)),
        Command.BUF_READ: st.builds(lambda o, n: BufReadArgs.build(dict(offset=o, length=n)), near, near),
        Command.PROGRAM_LOAD: st.builds(lambda n, c, m, k, r, w: ProgramLoadArgs.build(dict(
            length=n, crc=c, weight_bits=m, cell_bits=k, array_rows=r, array_cols=w)),
            st.one_of(near, u32), u32, st.sampled_from([8, 4, 0, 255]), st.sampled_from([2, 1, 0, 3]),
            st.sampled_from([32, 0, 2 ** 32 - 1]), st.sampled_from([32, 16])),
        Command.CELLS_WRITE: st.builds(lambda r, m, k: CellsWriteArgs.build(dict(region=r, mode=m, masked=k)),
                                       region, st.integers(0, 3), st.integers(0, 2)),
        Command.CELLS_READ: st.builds(lambda r, q: CellsReadArgs.build(dict(region=r, quantity=q)),
                                      region, st.integers(0, 4)),
        Command.CELLS_ERASE: st.builds(lambda r, n: CellsEraseArgs.build(dict(region=r, arrays=n)), region, near),
        Command.RUN: st.builds(lambda b: RunArgs.build(dict(batch=b)), near),
        Command.INFER: st.builds(lambda b, d: RunArgs.build(dict(batch=b)) + d, near,
                                 st.one_of(st.binary(max_size=16), st.just(bytes(4 * 128)))),
    }.get(command)
    return st.binary(max_size=48) if plausible is None else st.one_of(plausible, st.binary(max_size=48))


@st.composite
def requests(draw) -> tuple[int, int, bytes]:
    command = draw(st.one_of(st.sampled_from(list(Command)), st.integers(0, 255)))
    known = command in Command._value2member_map_
    payload = draw(_args(Command(command))) if known else draw(st.binary(max_size=32))
    return command, draw(st.integers(0, 0xFFFF)), payload


@st.composite
def pieces(draw) -> tuple[str, bytes, tuple[int, int] | None]:
    """(kind, bytes, (seq, command) of the intact request or None)."""
    command, seq, payload = draw(requests())
    flags = draw(st.sampled_from([0, 0, 0, FLAG_RESPONSE, 0x80]))  # never ASYNC: each piece settles
    frame = encode(command, seq, payload, flags)
    kind = draw(st.sampled_from(["intact"] * 5 + ["bit", "length", "short", "garbage"]))
    if kind == "intact":
        return kind, frame, (seq, command)
    if kind == "bit":
        at = draw(st.integers(0, len(frame) - 1))
        damaged = bytearray(frame)
        damaged[at] ^= 1 << draw(st.integers(0, 7))
        return kind, bytes(damaged), None
    if kind == "length":  # LENGTH field rewritten (header CRC then wrong, or right when resealed)
        from nvcim.firmware_emu.contract.protocol import HEADER

        length = draw(st.one_of(near, u32))
        head = HEADER.pack(SYNC, flags, command, seq, length, 0)[:HEADER_SIZE - 2]
        import binascii

        sealed = draw(st.booleans())
        crc = binascii.crc_hqx(head, 0xFFFF) if sealed else 0
        return kind, head + crc.to_bytes(2, "little") + frame[HEADER_SIZE:], None
    if kind == "short":
        return kind, frame[:draw(st.integers(0, len(frame) - 1))], None
    return kind, draw(st.binary(min_size=1, max_size=64)).replace(SYNC[:1], b"\x00"), None


def _state(chip) -> str:
    regs = sorted((k, v) for k, v in chip.registers.regs.items() if k not in ERROR_REGISTERS)
    h = hashlib.sha256(repr((regs, sorted(chip.registers.counters.items()))).encode())
    for part in (chip.cells.g, chip.cells.target, chip.cells.noise, chip.buffer, chip.program_code or b""):
        h.update(memoryview(part).cast("B"))
    return h.hexdigest()


@pytest.fixture(scope="module", autouse=True)
def _tallies():
    yield
    if TALLY:
        print("\nframe fuzz:", dict(sorted(TALLY.items())))


@pytest.fixture(scope="module")
def code() -> bytes:
    return small_program().code_bytes()


def _replies(data: bytes) -> list[Frame]:
    out = FrameReader(1 << 24).feed(data)
    assert all(isinstance(f, Frame) for f in out), f"a reply is no well-formed frame: {out}"
    return out


@FUZZ
@given(stream=st.lists(pieces(), min_size=PIECES_PER_STREAM, max_size=PIECES_PER_STREAM),
       cuts=st.lists(st.integers(1, 40), min_size=1, max_size=4))
def test_any_byte_stream_gets_well_formed_replies_and_refusals_change_nothing(code, stream, cuts):
    chip = new_chip()
    load(chip, code)
    for kind, data, request in stream:
        before = _state(chip)
        out, pos = [], 0
        for cut in cuts:
            out.append(chip.feed(data[pos:pos + cut]))
            pos += cut
        out.append(chip.feed(data[pos:]))
        assert kind != "intact" or not chip.frames.mid_frame, (data.hex(), cuts)
        if chip.frames.mid_frame:  # a frame cut short (or a LENGTH past the piece) waits for bytes that
            chip.frames.reset()    # never come: what a host's new connection discards
            TALLY["left mid-frame"] += 1
        poll_until(lambda: not chip.busy, "the chip settles after a piece")
        replies = _replies(b"".join(out))
        TALLY["frames"] += 1
        TALLY[kind] += 1
        for reply in replies:
            assert reply.flags & FLAG_RESPONSE  # (FLAG_ASYNC too where CONTROL.START began a run)
            if reply.flags & FLAG_ERROR:
                code_ = ErrorReply.parse(bytes(reply.payload)).code
                assert code_ in ErrorCode._value2member_map_ and code_ != ErrorCode.INTERNAL, \
                    (kind, request, ErrorReply.parse(bytes(reply.payload)))
                TALLY[f"error {ErrorCode(code_).name}"] += 1
        if request is not None:
            assert [(r.seq, r.command) for r in replies] == [request], (request, replies)
        if all(r.flags & FLAG_ERROR for r in replies):
            assert _state(chip) == before, (kind, request, replies)
            TALLY["refused, state unchanged"] += 1
        else:
            TALLY["served"] += 1


def test_reader_reports_damage_as_frame_errors():
    """The parser itself: a flipped header bit is BAD_HEADER, a payload bit BAD_CRC, an
    oversize LENGTH FRAME_TOO_LARGE; the next intact frame after each still parses."""
    good = encode(Command.PING, 7, b"hello")
    for at, code_ in ((3, ErrorCode.BAD_HEADER), (HEADER_SIZE + 1, ErrorCode.BAD_CRC)):
        bad = bytearray(good)
        bad[at] ^= 0x10
        items = FrameReader().feed(bytes(bad) + good)
        assert isinstance(items[0], FrameError) and items[0].code == code_
        assert isinstance(items[-1], Frame) and bytes(items[-1].payload) == b"hello"
    items = FrameReader(max_payload=4).feed(good)
    assert isinstance(items[0], FrameError) and items[0].code == ErrorCode.FRAME_TOO_LARGE


def test_a_frame_ending_in_the_first_sync_byte_leaves_nothing_behind():
    """Found by the fuzz test: a frame whose CRC ends in 0xA5 (SYNC's first byte) left that
    byte in the parser, as if a new frame had begun (the server then saw a half frame)."""
    frame = bytes.fromhex("a55a014288f60d00000024f5013275b9b857d6f29d8381a703be8fb2a5")
    reader = FrameReader()
    items = reader.feed(frame)
    assert len(items) == 1 and isinstance(items[0], Frame) and items[0].command == 0x42
    assert not reader.buf and reader.discarded == 0


LINK_RUNS = 600 if LONG else 12  # runs per link error rate


@pytest.mark.parametrize("rate", [1e-4, 1e-3, 1e-2])
def test_a_noisy_link_gives_the_clean_results_or_a_named_link_error(rate):
    """INFER/RUN through an emulated link that flips, drops or duplicates each byte with
    probability ``rate`` (both ways): every result equals the clean link's bit for bit, or
    the call raises a LinkError after its retries; never a wrong result, never a hang."""
    from nvcim import driver
    from nvcim.driver import LinkError

    url = "emu://?arrays=16&rows=32&cols=32&buffer_size=65536&sigma=0"
    x = np.random.default_rng(2).standard_normal((4, 2, 8, 8)).astype(np.float32)
    with driver.load(small_model(), device=url) as sess:
        clean = sess.run(None, {"x": x})[0]
    try:
        sess = driver.load(small_model(), device=f"{url}&link_faults={rate}&link_seed=7")
    except LinkError:  # programming through the link failed after all retries: a named error too
        TALLY[f"link {rate:g}: LinkError while programming"] += 1
        assert rate > 1e-3
        return
    with sess:
        for _ in range(LINK_RUNS):
            try:
                got = sess.run(None, {"x": x})[0]
            except LinkError:
                TALLY[f"link {rate:g}: LinkError"] += 1
                continue
            assert np.array_equal(got, clean)
            TALLY[f"link {rate:g}: same result"] += 1
        link = sess.device.link
        port = link.port
        TALLY[f"link {rate:g}: faults injected"] += port.faults_to_chip.injected + port.faults_from_chip.injected
        TALLY[f"link {rate:g}: retransmissions"] += link.retransmissions
    if rate <= 1e-4:  # at 1e-3, a call in some hundreds runs out of retries (a LinkError, not a wrong result)
        assert TALLY[f"link {rate:g}: LinkError"] == 0
