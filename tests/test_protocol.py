from nvcim.firmware_emu.contract.protocol import MAX_PAYLOAD, ErrorCode, Frame, FrameError, FrameReader, encode


def test_frames_split_across_feeds_and_garbage_are_recovered():
    a, b = encode(0x01, 1, b"hello"), encode(0x02, 2, bytes(range(256)) * 10)
    stream = b"\x00junk\xA5" + a + b"\xA5\x5Anoise" + b
    reader = FrameReader()
    got = []
    for i in range(0, len(stream), 7):
        got += reader.feed(stream[i:i + 7])
    frames = [g for g in got if isinstance(g, Frame)]
    assert [(f.command, f.seq) for f in frames] == [(1, 1), (2, 2)]
    assert frames[1].payload == bytes(range(256)) * 10


def test_payload_corruption_is_a_bad_crc_error_naming_the_sequence():
    frame = bytearray(encode(0x10, 42, b"\x00\x00\x00\x00"))
    frame[13] ^= 1
    got = FrameReader().feed(bytes(frame))
    assert len(got) == 1 and isinstance(got[0], FrameError)
    assert got[0].code == ErrorCode.BAD_CRC and got[0].seq == 42


def test_a_frame_that_lost_a_byte_does_not_swallow_the_retransmission_after_it():
    payload = bytes(range(200))
    short = bytearray(encode(0x30, 7, payload))
    del short[40]                                        # one payload byte dropped on the wire
    reader = FrameReader()
    got = reader.feed(bytes(short))
    assert got == []                                     # still waiting for the byte it lacks
    got = reader.feed(encode(0x30, 7, payload))          # the host's retransmission, intact
    assert [type(g) for g in got] == [FrameError, Frame]
    assert got[0].code == ErrorCode.BAD_CRC and got[1].payload == payload and got[1].seq == 7


def test_oversized_length_is_refused_without_waiting_for_the_payload():
    import binascii
    import struct
    head = struct.pack("<2sBBHI", b"\xA5\x5A", 0, 0x20, 9, MAX_PAYLOAD + 1)
    head += binascii.crc_hqx(head, 0xFFFF).to_bytes(2, "little")
    got = FrameReader().feed(head)
    assert got[0].code == ErrorCode.FRAME_TOO_LARGE and got[0].seq == 9
