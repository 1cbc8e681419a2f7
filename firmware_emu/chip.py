"""The emulated chip: its parts, wired together.

A transport hands raw bytes to ``Chip.feed`` and sends back what it returns. The parts,
each in the module named for its job:

* ``frame_server``: frames in, replies out, the reply cache that makes retransmission safe;
* ``register_file``: registers, settings limits, counters, STATUS / IRQ_FLAGS bookkeeping;
* ``commands``, ``cell_commands``, ``run_commands``: the command handlers (``Chip.handlers``);
* ``operations``: long commands in chunks, in the background on a worker thread, abortable;
* ``layer_weights``: the layers' effective weights from the programmed cells, for the executor;
* ``persistence``: the non-volatile image, powered up from and committed to;
* ``config``: the build options (``ChipConfig``); ``errors``: how a command is refused (``ChipError``).

The chip itself holds the state they share (cells, staging buffer, loaded program) and
decides what concerns all of them: the CONTROL strobes, and what happens around each
command (refusals while busy, background starts, image commits, STATUS.ERROR).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

from . import cell_commands, commands, persistence, run_commands
from .commands import Handler, parse_program
from .config import ChipConfig
from .contract.program_format import Program
from .contract.protocol import FLAG_ASYNC, Command, ErrorCode, Frame
from .contract.registers import Q16, OpState
from .converters import LayerProduct, PairingError, ReadNoise
from .crossbar import CellArrays
from .drift import Aging
from .errors import ChipError
from .frame_server import FrameServer
from .layer_weights import LayerWeights
from .nvm_image import NvmImage
from .operations import SERVED_WHILE_BUSY, SETTINGS_IN_USE, Operation, OperationEngine, run_to_end
from .register_file import (
    CONTROL_ABORT,
    CONTROL_SOFT_RESET,
    CONTROL_START,
    IRQ_ERROR,
    STATUS_BUSY,
    STATUS_PROGRAM_LOADED,
    STATUS_READY,
    RegisterFile,
)

__all__ = ["HANDLERS", "Chip", "ChipConfig", "ChipError"]

# What each command code runs; a chip serves a copy (``Chip.handlers``).
HANDLERS: dict[Command, Handler] = {
    Command.PING: commands.ping, Command.IDENTIFY: commands.identify,
    Command.REG_READ: commands.reg_read, Command.REG_WRITE: commands.reg_write,
    Command.BUF_WRITE: commands.buf_write, Command.BUF_READ: commands.buf_read,
    Command.PROGRAM_LOAD: commands.program_load, Command.PROGRAM_FETCH: commands.program_fetch,
    Command.CELLS_WRITE: cell_commands.cells_write, Command.CELLS_READ: cell_commands.cells_read,
    Command.CELLS_ERASE: cell_commands.cells_erase,
    Command.RUN: run_commands.run, Command.INFER: run_commands.infer, Command.OP_RESULT: commands.op_result,
}


def _weak(method: Callable) -> Callable:
    """``method`` of the chip, for a part to call without keeping the chip alive: with no
    cycle between a chip and its parts, a dropped chip frees its buffers at once."""
    ref = weakref.WeakMethod(method)
    return lambda *args: ref()(*args)


class Chip:
    """One emulated chip. ``handlers`` maps the command codes it serves to their handlers:
    remove one to emulate firmware without that command (it then answers UNKNOWN_COMMAND)."""

    def __init__(self, config: ChipConfig | None = None, image: NvmImage | None = None):
        self.config = config or ChipConfig()
        c = self.config
        self.cells = CellArrays(c.arrays, c.rows, c.cols)
        self.buffer = bytearray(c.buffer_size)
        self.image = image
        self.handlers: dict[int, Handler] = dict(HANDLERS)
        self.weights = LayerWeights(self.cells, _weak(self._aging))
        self.program_code: bytes | None = None
        self.program = None
        self.registers = RegisterFile(c, _weak(self._live_status), _weak(self._control), _weak(self._guard))
        self.operations = OperationEngine(self.registers, _weak(self._settle))
        self.frames = FrameServer(_weak(self._serve), _weak(self._refused), self.operations.host_turn)
        self.power_on()

    @classmethod
    def with_image(cls, path: str, explicit: dict) -> Chip:
        """Power up from the non-volatile image at ``path`` (created if absent); see ``persistence``."""
        return persistence.power_up(cls, path, explicit)

    # -- state ---------------------------------------------------------------------------
    @property
    def program(self) -> Program | None:
        """The loaded program (its layers' weights come from the cells through ``weights``)."""
        return self.weights.program

    @program.setter
    def program(self, program: Program | None) -> None:
        self.weights.load(program)

    def power_on(self) -> None:
        """Reset every volatile part; the cell arrays and the loaded program are non-volatile and stay."""
        self.registers.power_on()
        self.program = parse_program(self.config, self.program_code) if self.program_code else None
        self.operations.forget()  # never running here: SOFT_RESET is refused while BUSY

    @property
    def busy(self) -> bool:
        """A background operation is running (STATUS.BUSY)."""
        return self.operations.busy

    def run_products(self) -> tuple[LayerProduct | None, ReadNoise | None]:
        """How the next run multiplies: (product through finite converters, None), or (None,
        the read noise to add to the effective weights' products, or None when READ_NOISE is
        0). Each call takes the next read-noise stream after RUN_SEED."""
        r = self.registers
        settings = r.converters()
        try:                   # before the run takes its noise stream: a refused run changes nothing
            self.weights.check_pairs(settings.differential)
        except PairingError as e:
            raise ChipError(ErrorCode.BAD_PROGRAM, str(e)) from None
        return self.weights.products(settings, r.all_ideal, r.regs["READ_NOISE"] / Q16, r.next_run_noise())

    def read_register(self, addr: int) -> int:
        return self.registers.read(addr)

    def write_register(self, addr: int, value: int) -> None:
        self.registers.write(addr, value)

    def _aging(self) -> Aging:
        return self.registers.aging

    def _live_status(self) -> int:
        return (STATUS_BUSY if self.busy else STATUS_READY) | (STATUS_PROGRAM_LOADED if self.program is not None else 0)

    def _guard(self, setting: str) -> None:
        running = self.operations.running
        if running is not None and setting in SETTINGS_IN_USE[running.command]:
            raise ChipError(ErrorCode.BUSY, f"{setting} is in use by the running {running.describe()}; register "
                            f"unchanged (wait for STATUS.BUSY = 0, or write CONTROL.ABORT)")

    def _control(self, value: int) -> None:
        """CONTROL strobes. While an operation runs only ABORT acts (SOFT_RESET and START are
        refused with BUSY, the whole write with them); with none running ABORT does nothing."""
        running = self.operations.running
        if running is not None:
            if value & (CONTROL_SOFT_RESET | CONTROL_START):
                what = "SOFT_RESET" if value & CONTROL_SOFT_RESET else "START"
                raise ChipError(ErrorCode.BUSY, f"CONTROL.{what} while {running.describe()} runs; nothing done "
                                f"(write CONTROL.ABORT alone first)")
            if value & CONTROL_ABORT:
                self.operations.abort(running)
            return
        if value & CONTROL_START and self.program is None:  # refuse before the reset, so nothing changes
            raise ChipError(ErrorCode.NO_PROGRAM, "CONTROL.START: no program loaded (PROGRAM_LOAD first)")
        if value & CONTROL_SOFT_RESET:
            self.power_on()
        if value & CONTROL_START:
            self.operations.start(run_commands.start_run(self, self.registers.regs["RUN_BATCH"], "CONTROL.START"))

    # -- commands ------------------------------------------------------------------------
    def feed(self, data: bytes) -> bytes:
        """Consume bytes from the host; return the reply bytes (possibly empty).

        Safe to call while a background operation runs: the frames are served between two
        of its chunks (a waiting host goes before the next chunk).
        """
        return self.frames.feed(data)

    def execute(self, command: int, payload: bytes, flags: int = 0) -> bytes:
        """Run one command; raise ChipError for anything the chip refuses.

        A long command is checked here; with FLAG_ASYNC in ``flags`` it then goes on in the
        background and the reply is empty, else its chunks all run before this returns.
        """
        handler = self.handlers.get(command)
        if handler is None:
            raise ChipError(ErrorCode.UNKNOWN_COMMAND, f"unknown command 0x{command:02X}")
        if self.busy and command not in SERVED_WHILE_BUSY:
            raise ChipError(ErrorCode.BUSY, f"{Command(command).name} refused: {self.operations.operation.describe()} "
                            f"is running in the background (poll STATUS.BUSY, or write CONTROL.ABORT)")
        result = handler(self, payload)
        if isinstance(result, Operation):
            if flags & FLAG_ASYNC:
                self.operations.start(result)
                return b""
            return run_to_end(result.steps)
        return result

    def _serve(self, frame: Frame) -> tuple[bytes, bool]:
        """One request frame: run it, commit what it changed, clear STATUS.ERROR; (payload, started)."""
        code_before, operation_before, was_busy = self.program_code, self.operations.operation, self.busy
        clock_before = self.registers.regs["CLOCK"]
        payload = self.execute(frame.command, frame.payload, frame.flags)
        started = self.operations.operation is not operation_before and self.busy
        ended_here = was_busy and not self.busy  # CONTROL.ABORT: its ABORTED error stays in STATUS.ERROR
        if not self.busy:  # a background operation persists its cells when it ends
            program_changed = self.program_code is not code_before
            clock_moved = self.registers.regs["CLOCK"] != clock_before  # the clock is non-volatile too
            if self.image is not None and (self.cells.dirty or program_changed or clock_moved):
                persistence.commit(self, self.cells.dirty, program_changed)
            self.cells.dirty = set()
        if not ended_here:
            self.registers.clear_error()
        return payload, started

    def _refused(self, error: ChipError) -> None:
        if not self.busy:
            self.cells.dirty = set()
        if error.record:
            self.registers.record_error(error.code, IRQ_ERROR)

    def _settle(self, operation: Operation) -> None:
        """A background operation has ended: commit the cells it changed to the image."""
        if self.image is not None and self.cells.dirty:
            try:
                persistence.commit(self, self.cells.dirty, program_changed=False)
            except Exception as e:  # the cells changed in the running chip, but not on disk
                operation.state = OpState.FAILED
                operation.result = ChipError(ErrorCode.INTERNAL, f"{operation.command.name}: image write failed "
                                             f"after the operation: {type(e).__name__}: {e}")
                self.registers.record_error(ErrorCode.INTERNAL, IRQ_ERROR)
        self.cells.dirty = set()
