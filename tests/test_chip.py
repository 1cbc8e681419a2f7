"""The emulated chip seen through the low-level driver API, as a firmware developer sees it."""

import numpy as np
import pytest

from nvcim import driver
from nvcim.compiler import Target, compile_model
from nvcim.firmware_emu.contract.program_format import effective_weights
from nvcim.firmware_emu.contract.protocol import CellQuantity, Command, ErrorCode
from nvcim.firmware_emu.contract.registers import CHIP_ID_VALUE, OpState

from polling import poll_until
from zoo import export, export_mlp


def test_identity_and_capabilities():
    with driver.open("emu://?arrays=8&rows=128&cols=64") as dev:
        assert dev.read_register("CHIP_ID") == CHIP_ID_VALUE
        assert dev.read_register("CAP_ARRAYS") == 8
        assert dev.read_register("CAP_GEOMETRY") == 128 | (64 << 16)
        assert dev.identity.geometry == Target(8, 128, 64, 8, 2)


def test_write_to_read_only_register_is_a_bus_error_and_changes_nothing():
    with driver.open("emu://") as dev:
        with pytest.raises(driver.DeviceError) as e:
            dev.write_register("CHIP_ID", 0)
        assert e.value.code == ErrorCode.READ_ONLY and "CHIP_ID" in str(e.value)
        assert dev.read_register("CHIP_ID") == CHIP_ID_VALUE
        assert dev.read_register("STATUS") & 0x10  # BUS_ERROR
        assert dev.read_register("ERROR_ADDR") == 0x000


def test_unmapped_address_is_a_bus_error():
    with driver.open("emu://") as dev:
        with pytest.raises(driver.DeviceError, match="unmapped address 0x3FC") as e:
            dev.read_register(0x3FC)
        assert e.value.code == ErrorCode.BUS_ERROR
        assert e.value.status & 0x10


def test_irq_flags_are_write_one_to_clear():
    with driver.open("emu://") as dev:
        dev.write_cells(0, 0, 0, np.ones((2, 2), np.uint8))
        assert dev.read_register("IRQ_FLAGS") & 1
        dev.write_register("IRQ_FLAGS", 1)
        assert dev.read_register("IRQ_FLAGS") & 1 == 0


def test_out_of_range_region_is_refused_and_cells_stay():
    with driver.open("emu://?arrays=2&sigma=0") as dev:
        dev.write_cells(1, 0, 0, np.full((4, 4), 3, np.uint8))
        with pytest.raises(driver.DeviceError, match="outside array 1"):
            dev.write_cells(1, 254, 0, np.zeros((4, 4), np.uint8))
        assert (dev.read_cells(1, 0, 0, 4, 4) == 3).all()


def test_same_seed_gives_bit_identical_cells_and_another_seed_does_not():
    t = np.random.default_rng(0).integers(0, 4, (64, 64)).astype(np.uint8)
    reads = []
    for seed in (5, 5, 6):
        with driver.open(f"emu://?seed={seed}") as dev:
            dev.write_cells(0, 0, 0, t)
            reads.append(dev.read_cells(0, 0, 0, 64, 64))
    assert np.array_equal(reads[0], reads[1])
    assert not np.array_equal(reads[0], reads[2])


def test_read_after_write_noise_dump_equals_the_deviation():
    t = np.random.default_rng(1).integers(0, 4, (32, 32)).astype(np.uint8)
    with driver.open("emu://?sigma=0.3&seed=2") as dev:
        dev.write_cells(3, 10, 20, t)
        g = dev.read_cells(3, 10, 20, 32, 32)
        noise = dev.read_cells(3, 10, 20, 32, 32, CellQuantity.NOISE)
        np.testing.assert_allclose(noise, g - t, atol=1e-6)


def test_per_weight_noise_std_matches_the_design_formula(tmp_path):
    """std(w_p - w_q) = 0.78 * sigma * max|W| for M = 8, K = 2 (docs/device-model.md), over 102,400 weights."""
    path = export_mlp(tmp_path / "wide.onnx", in_features=400, hidden=256, out=4)
    sigma = 0.3
    with driver.load(path, device=f"emu://?sigma={sigma}&seed=3") as sess:
        program, dev = sess.program, sess.device
        layer = program.layers[0]
        assert layer.in_features * layer.out_features == 102_400
        s = program.slices

        def read_tile(i):
            t = layer.tiles[i]
            return dev.read_cells(t.array, t.row, t.col, t.in_count, t.out_count * s)

        w_p = effective_weights(program, 0, read_tile)
        w_q = effective_weights(program, 0, lambda i: program.tile_cells(layer.tiles[i]).astype(np.float32))
    wmax = np.abs(w_q).max()
    programmed = w_q != 0
    ratio = (w_p - w_q)[programmed].std() / (sigma * wmax)
    expected = 3 * np.sqrt(sum(16 ** j for j in range(4))) / 255  # = 0.7776
    assert abs(ratio / expected - 1) < 0.02, ratio
    assert (w_p[~programmed] == 0).all()  # erased cells are never pulsed


def test_soft_reset_keeps_cells_clears_counters():
    with driver.open("emu://?sigma=0") as dev:
        dev.write_cells(0, 0, 0, np.full((8, 8), 2, np.uint8))
        assert dev.counters()["write_pulses"] == 64
        dev.reset()
        assert dev.counters()["write_pulses"] == 0
        assert (dev.read_cells(0, 0, 0, 8, 8) == 2).all()


def test_settings_out_of_range_are_refused_and_kept():
    with driver.open("emu://") as dev:
        for name, value, why in (("VERIFY_MAX_ITER", 1000, "exceeds the maximum 255"),
                                 ("VERIFY_TOL", 0, "must be > 0"),
                                 ("DEVICE_MODEL", 9, "is not a device model"),
                                 ("STUCK_RATE", 2 << 16, "exceeds the maximum")):
            before = dev.read_register(name)
            with pytest.raises(driver.DeviceError, match=f"{name} value {value} {why}") as e:
                dev.write_register(name, value)
            assert e.value.code == ErrorCode.BAD_ARGUMENT
            assert dev.read_register(name) == before


def test_register_level_run_matches_the_run_command(mlp_path, batch):
    with driver.load(mlp_path, device="emu://?sigma=0.2&seed=3") as sess:
        dev = sess.device
        expected, = dev.run([batch])
        dev.buffer_write(batch.tobytes())
        dev.write_register("RUN_BATCH", len(batch))
        dev.write_register("CONTROL", 0b10)  # START: the run goes on in the background
        poll_until(lambda: not dev.read_register("STATUS") & 0b10, "the CONTROL.START run left BUSY")
        assert dev.read_register("STATUS") & 1  # READY again
        got = np.frombuffer(dev.buffer_read(expected.nbytes), dtype="<f4").reshape(expected.shape)
        assert np.array_equal(got, expected)
        assert dev.read_register("IRQ_FLAGS") & 1  # DONE
        assert dev.counters()["mvm_ops"] == 2 * 2 * len(batch)
        assert dev.read_register("OP_STATUS") == Command.RUN | OpState.DONE << 8
        assert dev.read_register("OP_PROGRESS") == dev.read_register("OP_TOTAL") == len(batch)
        # the driver's form: stage, START, wait for the outputs
        got, = dev.start([batch]).wait(timeout=5)
        assert np.array_equal(got, expected)


def test_program_for_another_geometry_is_refused(mlp_path):
    program = compile_model(mlp_path, Target(rows=128))
    with driver.open("emu://") as dev:
        with pytest.raises(driver.DeviceError, match="arrays of 128x256; this chip has .* arrays of 256x256"):
            dev.load_code(program)
        assert not dev.read_register("STATUS") & 0b100  # no program loaded


def test_run_larger_than_the_buffer_is_refused_before_touching_it(mlp_path):
    with driver.load(mlp_path, device="emu://?buffer_size=65536") as sess:
        dev = sess.device
        dev.buffer_write(b"\x01" * 16)
        with pytest.raises(driver.DeviceError, match="exceed the 65536-byte staging buffer"):
            dev.link.transact(Command.RUN, (1000).to_bytes(4, "little"))
        assert dev.buffer_read(16) == b"\x01" * 16


def test_malformed_cell_commands_are_refused_with_the_reason():
    with driver.open("emu://?arrays=4") as dev:
        with pytest.raises(driver.DeviceError, match="CELLS_ERASE: array 4 does not exist") as e:
            dev.erase(2, arrays=3)
        assert e.value.code == ErrorCode.BAD_ADDRESS
        with pytest.raises(driver.DeviceError, match="CELLS_ERASE: array count 0"):
            dev.erase(0, arrays=0)
        with pytest.raises(driver.DeviceError, match="CELLS_READ: payload is 3 bytes, expected 21") as e:
            dev.link.transact(Command.CELLS_READ, b"abc")
        assert e.value.code == ErrorCode.BAD_LENGTH


def test_refused_start_does_not_reset_the_chip():
    with driver.open("emu://") as dev:
        dev.write_register("VERIFY_TOL", 1000)
        with pytest.raises(driver.DeviceError, match="CONTROL.START: no program loaded"):
            dev.write_register("CONTROL", 0b11)  # SOFT_RESET | START
        assert dev.read_register("VERIFY_TOL") == 1000


def _staged_run(dev, x: np.ndarray, out_features: int) -> tuple[bytes, bytes]:
    """A run the way BUF_WRITE, RUN, BUF_READ do it: (RUN reply, output bytes)."""
    dev.buffer_write(x.tobytes())
    shapes = dev.link.transact(Command.RUN, len(x).to_bytes(4, "little"))
    return shapes, dev.buffer_read(len(x) * out_features * 4)


def test_infer_is_buf_write_run_buf_read_in_one_exchange(mlp_path, batch, monkeypatch):
    with driver.load(mlp_path, device="emu://?sigma=0.2&seed=3") as sess:
        dev = sess.device
        shapes, staged = _staged_run(dev, batch, 10)
        mvm = dev.counters()["mvm_ops"]
        dev.buffer_write(b"\x01" * len(staged))
        reply = dev.link.transact(Command.INFER, len(batch).to_bytes(4, "little") + batch.tobytes())
        assert reply == shapes + staged  # the RUN reply, then the outputs, bit for bit
        assert dev.buffer_read(len(staged)) == staged  # and the outputs where RUN leaves them
        assert dev.counters()["mvm_ops"] == 2 * mvm
        sent = _record_commands(dev, monkeypatch)
        got, = dev.run([batch])  # the driver's run takes this path: one exchange
        assert sent == [Command.INFER]
        assert got.tobytes() == staged and got.flags.writeable


def test_infer_with_wrong_input_size_is_refused_before_touching_the_buffer(mlp_path, batch):
    with driver.load(mlp_path, device="emu://") as sess:
        dev = sess.device
        dev.buffer_write(b"\x01" * 16)
        with pytest.raises(driver.DeviceError, match=r"batch 16 takes 4096 bytes of inputs .* got 4092") as e:
            dev.link.transact(Command.INFER, (16).to_bytes(4, "little") + batch.tobytes()[:-4])
        assert e.value.code == ErrorCode.BAD_LENGTH
        assert dev.buffer_read(16) == b"\x01" * 16


def test_outputs_too_big_for_one_reply_go_through_the_staging_buffer(tmp_path, monkeypatch):
    """A model that widens (8 -> 256 features): 4,096 samples give 4 MiB of outputs, over
    the 1 MiB a frame carries. INFER refuses; the driver's run stages instead."""
    import torch

    torch.manual_seed(0)
    path = export(torch.nn.Linear(8, 256).eval(), tmp_path / "wide.onnx", (8,), dynamo=False)
    x = np.random.default_rng(0).standard_normal((4096, 8)).astype(np.float32)
    with driver.load(path, device="emu://?sigma=0&buffer_size=8388608") as sess:
        dev = sess.device
        with pytest.raises(driver.DeviceError, match="would exceed the 1048576-byte frame limit") as e:
            dev.link.transact(Command.INFER, (4096).to_bytes(4, "little") + x.tobytes())
        assert e.value.code == ErrorCode.FRAME_TOO_LARGE
        sent = _record_commands(dev, monkeypatch)
        for _ in range(2):
            got, = sess.run(None, {"x": x})
        assert sent.count(Command.INFER) == 1  # the refusal is remembered for this batch size
        assert got.shape == (4096, 256)
        assert got.tobytes() == _staged_run(dev, x, 256)[1]


def _record_commands(dev, monkeypatch) -> list[Command]:
    """The commands the device sends from now on."""
    sent: list[Command] = []
    exchange = dev.link.exchange

    def recording(command, *args, **kwargs):
        sent.append(command)
        return exchange(command, *args, **kwargs)

    monkeypatch.setattr(dev.link, "exchange", recording)
    return sent


def test_a_chip_without_infer_runs_staged(mlp_path, batch, monkeypatch):
    """Older firmware answers INFER with UNKNOWN_COMMAND: the driver stages, and stops asking."""
    with driver.load(mlp_path, device="emu://?sigma=0") as sess:
        del sess.device.link.port.chip.handlers[Command.INFER]  # the chip now answers INFER as unknown
        sent = _record_commands(sess.device, monkeypatch)
        first, = sess.run(None, {"x": batch})
        second, = sess.run(None, {"x": batch})
    assert sent.count(Command.INFER) == 1 and sent.count(Command.RUN) == 2
    assert np.array_equal(first, second)
