"""The background-operation engine: long commands in chunks, on a worker thread, abortable.

The long commands (CELLS_WRITE, CELLS_ERASE, RUN, INFER) are checked by their handler and
become an ``Operation``: a generator of steps, each ``next()`` running one chunk (row
groups of cells, batch slices of a run). Without FLAG_ASYNC the steps all run inside the
command (``run_to_end``); with it, and for a CONTROL.START run, the engine runs them on a
chip-owned worker thread, so the bytes a chip writes do not depend on how it was asked.
Frame handling and every chunk take one chip lock, and a host waiting for it goes before
the next chunk: a host's frame is served between two chunks, and that is where
CONTROL.ABORT stops the work. The engine keeps the running or last operation for
OP_STATUS, OP_PROGRESS, OP_TOTAL and OP_RESULT.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field

from .contract.protocol import Command, ErrorCode
from .contract.registers import OpState
from .errors import ChipError
from .register_file import IRQ_ABORTED, IRQ_ERROR, RegisterFile

# Commands served while a background operation runs; every other one is refused with BUSY.
SERVED_WHILE_BUSY = frozenset({Command.PING, Command.IDENTIFY, Command.REG_READ, Command.REG_WRITE, Command.OP_RESULT})
# Settings each background operation reads: a REG_WRITE to them is refused with BUSY while it runs.
SETTINGS_IN_USE: dict[Command, frozenset[str]] = {
    Command.CELLS_WRITE: frozenset({"DEVICE_MODEL", "SIGMA", "READ_NOISE", "SEED", "VERIFY_TOL", "VERIFY_MAX_ITER",
                                    "CONFIG", "STUCK_RATE", "CLOCK"}),
    Command.CELLS_ERASE: frozenset({"CLOCK"}),  # erased cells are stamped with it
    # a run reads the cells as they have drifted: at CLOCK, by the preset's law, with SEED's exponents
    # and through the converters' settings, with READ_NOISE from the RUN_SEED's streams
    Command.RUN: frozenset({"ARRAY_CONVERTERS", "ARRAY_DAC_FS", "ARRAY_ADC_FS", "READ_NOISE", "RUN_SEED", "CLOCK",
                            "DEVICE_MODEL", "SEED"}),
    Command.INFER: frozenset({"ARRAY_CONVERTERS", "ARRAY_DAC_FS", "ARRAY_ADC_FS", "READ_NOISE", "RUN_SEED", "CLOCK",
                              "DEVICE_MODEL", "SEED"}),
}
UNITS = {Command.CELLS_WRITE: "cells", Command.CELLS_ERASE: "rows", Command.RUN: "samples", Command.INFER: "samples"}


class Abort(Exception):
    """Thrown into an operation's steps at a chunk boundary by CONTROL.ABORT."""


Steps = Generator[int, None, bytes]  # each next() runs one chunk and yields the units done; returns the reply


@dataclass(eq=False)
class Operation:
    """A checked long command, ready to run its chunks (in the command, or in the background)."""

    command: Command
    total: int    # units (UNITS[command]) of the whole operation
    steps: Steps  # primed: the first next() runs the first chunk
    done: int = 0
    state: OpState = OpState.RUNNING
    result: bytes | ChipError | None = field(default=None, repr=False)

    def describe(self) -> str:
        return f"{self.command.name} ({self.done} of {self.total} {UNITS[self.command]} done)"


def primed(steps: Steps) -> Steps:
    """Run a steps generator to its first ``yield 0``, inside its abort handler."""
    next(steps)
    return steps


def run_to_end(steps: Steps) -> bytes:
    """Run every remaining chunk here and return the reply (the synchronous form)."""
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value


def as_chip_error(e: Exception) -> ChipError:
    """``e`` as the chip reports it: a fault that is not a refusal is INTERNAL."""
    return e if isinstance(e, ChipError) else ChipError(ErrorCode.INTERNAL, f"internal fault: {type(e).__name__}: {e}")


class OperationEngine:
    """Runs one background operation at a time, chunk by chunk, between the hosts' frames.

    ``settle(operation)`` is called when an operation has ended (its state and result
    set), before OP_STATUS shows it: the chip persists the cells it changed there.
    """

    def __init__(self, registers: RegisterFile, settle: Callable[[Operation], None]):
        self.registers, self.settle = registers, settle
        self.operation: Operation | None = None  # the running or last background operation
        self._lock = threading.Lock()          # one frame or one chunk at a time
        self._gate = threading.Condition()     # hosts waiting for the lock go before the next chunk
        self._hosts_waiting = 0

    @property
    def busy(self) -> bool:
        """A background operation is running (STATUS.BUSY)."""
        return self.operation is not None and self.operation.state == OpState.RUNNING

    @property
    def running(self) -> Operation | None:
        return self.operation if self.busy else None

    def forget(self) -> None:
        """No operation since now (power-on, SOFT_RESET; never while one runs)."""
        self.operation = None

    @contextlib.contextmanager
    def host_turn(self) -> Iterator[None]:
        """Hold the chip lock for a host's frames, ahead of the worker's next chunk."""
        with self._gate:
            self._hosts_waiting += 1
        try:
            self._lock.acquire()
        finally:
            with self._gate:
                self._hosts_waiting -= 1
                self._gate.notify_all()
        try:
            yield
        finally:
            self._lock.release()

    def start(self, operation: Operation) -> None:
        """Make ``operation`` the running one and hand its chunks to a worker thread."""
        self.operation = operation
        self.registers.regs.update(OP_STATUS=int(operation.command) | OpState.RUNNING << 8, OP_PROGRESS=0,
                                   OP_TOTAL=operation.total)
        threading.Thread(target=self._work, args=(operation,), name=f"nvcim-{operation.command.name}",
                         daemon=True).start()

    def _work(self, operation: Operation) -> None:
        """Worker thread: one chunk per turn of the chip lock, until the operation ends."""
        while True:
            with self._gate:  # a host waiting for the lock is served first
                self._gate.wait_for(lambda: self._hosts_waiting == 0)
            with self._lock:
                if operation.state != OpState.RUNNING:
                    return  # ended by CONTROL.ABORT while this thread waited
                try:
                    operation.done = next(operation.steps)
                    self.registers.regs["OP_PROGRESS"] = operation.done
                except StopIteration as stop:
                    self._end(operation, stop.value)
                    return
                except Exception as e:
                    self._end(operation, e)
                    return

    def abort(self, operation: Operation) -> None:
        """Stop ``operation`` now: the caller holds the chip lock, so this is a chunk boundary."""
        try:
            operation.steps.throw(Abort())
        except StopIteration as stop:  # the operation had nothing left to do
            self._end(operation, stop.value)
        except Exception as e:
            self._end(operation, e)
        else:
            self._end(operation, ChipError(ErrorCode.INTERNAL, f"{operation.command.name} did not stop on abort"))

    def _end(self, operation: Operation, outcome: bytes | Exception) -> None:
        """Record how a background operation ended, set the flags, let the chip persist its cells."""
        if isinstance(outcome, Exception):
            outcome = as_chip_error(outcome)
            aborted = outcome.code == ErrorCode.ABORTED
            operation.state = OpState.ABORTED if aborted else OpState.FAILED
            self.registers.record_error(outcome.code, IRQ_ABORTED if aborted else IRQ_ERROR)
        else:
            operation.state, operation.done = OpState.DONE, operation.total
        operation.result = outcome
        self.settle(operation)
        self.registers.regs.update(OP_STATUS=int(operation.command) | operation.state << 8,
                                   OP_PROGRESS=operation.done)

    def result(self) -> bytes:
        """OP_RESULT: the last operation's reply, or its error; changes nothing, so a host may repeat it."""
        operation = self.operation
        if operation is None:
            raise ChipError(ErrorCode.BAD_ARGUMENT, "OP_RESULT: no background operation since power-on or "
                            "SOFT_RESET", record=False)
        if operation.state == OpState.RUNNING:
            raise ChipError(ErrorCode.BUSY, f"OP_RESULT: {operation.describe()} is still running", record=False)
        if isinstance(operation.result, ChipError):
            raise ChipError(operation.result.code, str(operation.result), record=False)
        return operation.result
