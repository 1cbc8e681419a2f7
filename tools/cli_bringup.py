"""Bring-up commands: ``nvcim identify``, ``regs``, ``trace``, ``seq`` and ``inspect``.

They work on any device URL (``emu://...``, ``/dev/pts/N``, ``socket://HOST:PORT``), and
each takes ``--trace FILE`` (JSON lines) or ``--trace -`` (live on stderr) to record
every frame it sends and receives.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

import click

COMMANDS: list[click.Command] = []
IN_PROCESS_CHIP = "in-process"  # a fallback meaning the driver's fresh in-process chip


def _command(cmd: click.Command) -> click.Command:
    COMMANDS.append(cmd)
    return cmd


def _device_url(device: str | None, fallback: str | None = None) -> str:
    """--device, else $NVCIM_DEVICE, else ``fallback``, else the flow's chip image.

    Commands that program cells fall back to a fresh in-process chip (or a sequence
    file's own device), never to the flow's image, whose deployed model they would overwrite.
    """
    from nvcim.driver.default_device import IN_PROCESS_CHIP as FRESH_CHIP
    from nvcim.driver.default_device import resolve_device

    from .cli import CHIP_IMAGE

    if fallback == IN_PROCESS_CHIP:
        fallback = FRESH_CHIP
    return resolve_device(device, default=fallback or CHIP_IMAGE)


def _open(device: str | None, trace: str | None, fallback: str | None = None):
    from nvcim import driver
    from nvcim.driver.trace import traced_url

    return driver.open(traced_url(_device_url(device, fallback), trace))


def _one_line_errors(fn):
    """Expected errors (bad names, values, files, a chip's refusal, a lost link) as one line, exit status 1."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from nvcim import driver
        from nvcim.driver.trace import TraceFileError
        from nvcim.firmware_emu.contract.program_format import ProgramFormatError

        from .regs import RegisterError
        from .sequence import SequenceError
        try:
            return fn(*args, **kwargs)
        except (RegisterError, SequenceError, TraceFileError, ProgramFormatError, driver.NvcimError) as e:
            raise click.ClickException(str(e)) from None
        except BrokenPipeError:  # `nvcim trace show F | head`: the reader has all it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise SystemExit(141) from None
        except OSError as e:
            raise click.ClickException(f"{e.filename}: {e.strerror}" if e.filename else str(e)) from None
    return wrapper


device_option = click.option("--device", default=None, metavar="URL",
                             help="The chip: emu://?OPTIONS, /dev/pts/N, socket://HOST:PORT, trace://URL "
                                  "[default: $NVCIM_DEVICE, else emu://?image=out/tsb/chip].")
trace_option = click.option("--trace", "trace", default=None, metavar="FILE|-",
                            help="Record every frame on the link: JSON lines to FILE, or live lines on stderr (-).")


# -- identify and registers -------------------------------------------------------------------------
@_command
@click.command()
@device_option
@trace_option
@_one_line_errors
def identify(device, trace) -> None:
    """Print every field the chip's IDENTIFY reply carries."""
    from .regs import identity_fields

    with _open(device, trace) as dev:
        for name, value in identity_fields(dev).items():
            shown = f"0x{value:08X}" if name.endswith("id") or name == "version" else str(value)
            click.echo(f"{name:<12} {shown}")


@_command
@click.group()
def regs() -> None:
    """Read, write and dump the chip's registers by name (NAME, NAME.FIELD or an address)."""


@regs.command("read")
@click.argument("names", nargs=-1, required=True, metavar="NAME[.FIELD]|ADDR...")
@device_option
@trace_option
@_one_line_errors
def regs_read(names, device, trace) -> None:
    """Read registers or fields: STATUS, STATUS.BUSY, 0x024."""
    from . import regs as r

    refs = [r.resolve(n) for n in names]  # every name checked before the link opens
    with _open(device, trace) as dev:
        for ref in refs:
            value = r.read(dev, ref)
            decoded = r.describe_value(ref, value)
            click.echo(f"{ref.name:<20} 0x{value:08X}  {value}" + (f"  {decoded}" if decoded else ""))


@regs.command("write")
@click.argument("assignments", nargs=-1, required=True, metavar="NAME[.FIELD]=VALUE...")
@device_option
@trace_option
@_one_line_errors
def regs_write(assignments, device, trace) -> None:
    """Write registers or fields in order: SIGMA=0.3 (Q16.16), DEVICE_MODEL=RRAM1, CONTROL.SOFT_RESET=1.

    A field of a read/write register is read, modified and written back; a field of a
    write-one-to-clear or write-only register is written alone.
    """
    from . import regs as r

    plan = []
    for text in assignments:
        name, sep, value = text.partition("=")
        if not sep or not value.strip():
            raise click.ClickException(f"{text!r}: expected NAME=VALUE or NAME.FIELD=VALUE")
        ref = r.resolve(name)
        r.check_writable(ref)
        plan.append((ref, r.parse_value(ref, value)))
    with _open(device, trace) as dev:
        for ref, value in plan:
            word = r.write(dev, ref, value)
            line = f"{ref.name} <- 0x{value:X}" + (f" (register 0x{word:08X})" if ref.field else "")
            if ref.register.access.value == "RW":
                back = r.read(dev, ref)
                line += f"; reads back 0x{back:X}" + (f" {d}" if (d := r.describe_value(ref, back)) else "")
            click.echo(line)


@regs.command("dump")
@device_option
@trace_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object: registers with values and fields.")
@_one_line_errors
def regs_dump(device, trace, as_json) -> None:
    """Every register of the map: address, name, access, value and decoded fields."""
    from . import regs as r

    with _open(device, trace) as dev:
        values = r.dump(dev)
    if as_json:
        click.echo(json.dumps(dict(registers=[v.as_dict() for v in values],
                                   counters=r.combined_counters(values)), indent=1))
        return
    for v in values:
        click.echo(v.line())
    for name, value in r.combined_counters(values).items():
        click.echo(f"{name:<24} {value}")


@regs.command("list")
def regs_list() -> None:
    """The register map itself (no chip needed): address, name, access, reset value, fields."""
    from nvcim.firmware_emu.contract.registers import REGISTERS

    for reg in sorted(REGISTERS, key=lambda r: r.offset):
        click.echo(f"0x{reg.offset:03X}  {reg.name:<22} {reg.access.value:<3}  reset 0x{reg.reset:08X}  "
                   f"{reg.description}")
        for f in reg.fields:
            bits = f"[{f.lsb}]" if f.width == 1 else f"[{f.lsb + f.width - 1}:{f.lsb}]"
            click.echo(f"{'':7}.{f.name:<18} {bits:<8} {f.description}")


# -- traces ------------------------------------------------------------------------------------------
@_command
@click.group()
def trace() -> None:
    """Link traces: show a recorded one, replay it on a chip.

    Record with --trace FILE on any bring-up command, or with the device URL
    trace://URL#file=FILE on any command (trace://URL alone prints live on stderr).
    """


@trace.command("show")
@click.argument("path", type=click.Path(path_type=Path))
@_one_line_errors
def trace_show(path: Path) -> None:
    """Print a recorded JSON-lines trace as decoded lines."""
    from nvcim.driver.trace import read_trace

    for _, record in read_trace(path):
        click.echo(record.line())


@trace.command("replay")
@click.argument("path", type=click.Path(path_type=Path))
@device_option
@click.option("--ignore", multiple=True, metavar="REGISTER",
              help="Do not compare reads of this register (e.g. OP_PROGRESS, which depends on timing); repeatable.")
@click.option("--timeout", type=float, default=5.0, show_default=True, help="Seconds to wait for each reply.")
@_one_line_errors
def trace_replay(path: Path, device, ignore, timeout) -> None:
    """Send a trace's requests to a chip and report the first reply that differs."""
    import serial

    from nvcim.driver.trace import replay

    from . import regs as r

    for name in ignore:
        r.resolve(name)
    url = _device_url(device)
    try:
        port = serial.serial_for_url(url, timeout=timeout)
    except (serial.SerialException, ValueError) as e:
        raise click.ClickException(f"cannot open device {url!r}: {e}") from None
    try:
        result = replay(path, port, timeout=timeout, ignore=ignore)
    finally:
        port.close()
    if result.difference is None:
        click.echo(f"{path}: {result.requests} requests replayed on {url}, every reply as recorded")
        return
    click.echo(f"{path}: reply {result.difference.index} of {result.requests} differs on {url}\n{result.difference}")
    raise SystemExit(1)


# -- sequences ---------------------------------------------------------------------------------------
@_command
@click.group()
def seq() -> None:
    """Programming sequences as data (YAML): check them, run them with a pass/fail report."""


@seq.command("run")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="FILE...")
@device_option
@trace_option
@click.option("--out", type=click.Path(path_type=Path), default=Path("."), show_default=True,
              help="Folder that the sequence's save: paths are relative to.")
@click.option("-q", "--quiet", is_flag=True, help="Only the PASS / FAIL line of each file.")
@_one_line_errors
def seq_run(paths, device, trace, out, quiet) -> None:
    """Run sequence files in order on one chip; stops at the first failing step (exit status 1).

    The chip: --device, else $NVCIM_DEVICE, else the file's own device:, else a fresh in-process chip.
    """
    from . import sequence

    loaded = [sequence.load(p) for p in paths]  # every file checked before the chip is touched
    urls = [_device_url(device, s.device or IN_PROCESS_CHIP) for s in loaded]
    if trace not in (None, "-") and len(set(urls)) > 1:
        raise click.ClickException(f"--trace {trace}: one trace file records one link, and these files name "
                                   f"{len(set(urls))} devices ({', '.join(sorted(set(urls)))}); give --device")
    dev, opened = None, None
    try:
        for s, url in zip(loaded, urls):
            if url != opened:  # consecutive files on the same device share one link (and one chip)
                if dev is not None:
                    dev.close()
                dev, opened = _open(url, trace), url
            if not quiet:
                click.echo(f"{s.path}: {s.name} (on {url})")
            report = sequence.run(s, dev, out, echo=None if quiet else click.echo)
            click.echo(report.summary())
            if not report.passed:
                raise SystemExit(1)
    finally:
        if dev is not None:
            dev.close()


@seq.command("check")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="FILE...")
@_one_line_errors
def seq_check(paths) -> None:
    """Check sequence files without a chip: structure, actions, register names, fields and values."""
    from . import sequence

    for p in paths:
        s = sequence.load(p)
        click.echo(f"{p}: {s.name}: {len(s.steps)} steps, well formed")


@seq.command("format")
def seq_format() -> None:
    """The sequence file format, step by step."""
    from .sequence import STEP_HELP

    click.echo(STEP_HELP)


# -- pictures ----------------------------------------------------------------------------------------
def _ints(text: str | None, what: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(v, 0) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected comma-separated integers", param_hint=what) from None


def _region(dev, text: str | None):
    from .inspect_chip import Region

    if text is None:
        return Region.whole(dev)
    values = _ints(text, "--region")
    if len(values) != 4:
        raise click.BadParameter(f"{text!r}: expected ROW,COL,ROWS,COLS", param_hint="--region")
    return Region(*values)


@_command
@click.group()
def inspect() -> None:
    """Pictures (PNG) of a chip's cells and noise, write-verify, and a program's tiles, with a summary."""


@inspect.command("cells")
@device_option
@trace_option
@click.option("--arrays", default=None, metavar="A,B,...",
              help="Arrays to show [default: those of the loaded program, else array 0].")
@click.option("--region", default=None, metavar="ROW,COL,ROWS,COLS", help="Part of each array [default: all].")
@click.option("-o", "--out", type=click.Path(path_type=Path), default=Path("out/inspect"), show_default=True)
@_one_line_errors
def inspect_cells(device, trace, arrays, region, out: Path) -> None:
    """Deviation heatmaps (g - target per array) and the captured-noise histogram against the model."""
    from . import inspect_chip as ic

    with _open(device, trace) as dev:
        chosen = _ints(arrays, "--arrays") or ic.program_arrays(dev)[:ic.MAX_PANELS] or [0]
        if len(chosen) > ic.MAX_PANELS:
            raise click.BadParameter(f"at most {ic.MAX_PANELS} arrays in one picture", param_hint="--arrays")
        r = _region(dev, region)
        settings = ic.ChipSettings.read(dev)
        devs = ic.deviations(dev, chosen, r)
        noise = ic.captured_noise(dev, chosen, r, settings)
        chip_id = dev.identity.chip_id
    heat = ic.plot_deviation(devs, r, settings, out / "deviation.png")
    hist = ic.plot_noise(noise, settings, out / "noise.png")
    click.echo(f"chip 0x{chip_id:08X}: {settings.caption()}; {r.label()}")
    for d in devs:
        click.echo(f"  array {d.array:>3}: {d.programmed:>7} cells programmed, deviation std {d.std:.4f} "
                   f"max |{d.max_abs:.4f}| g_max")
    click.echo(f"  captured noise of {noise.values.size} pulsed cells: std {noise.std:.4f} g_max "
               f"(device model {noise.model_std:.4f})")
    click.echo(f"wrote {heat}\nwrote {hist}")


@inspect.command("verify")
@device_option
@trace_option
@click.option("--array", type=int, default=0, show_default=True)
@click.option("--region", default="0,0,64,64", show_default=True, metavar="ROW,COL,ROWS,COLS")
@click.option("--targets", "target_seed", type=int, default=0, show_default=True,
              help="Seed of the random target levels written.")
@click.option("-o", "--out", type=click.Path(path_type=Path), default=Path("out/inspect"), show_default=True)
@_one_line_errors
def inspect_verify(device, trace, array, region, target_seed, out: Path) -> None:
    """Write-verify iterations per cell, by a probe that (re)programs the region (see inspect_chip).

    The chip: --device, else $NVCIM_DEVICE, else a fresh in-process chip.
    """
    import numpy as np

    from nvcim.firmware_emu.contract.registers import Q16

    from . import inspect_chip as ic
    from .regs import identity_fields

    with _open(device, trace, IN_PROCESS_CHIP) as dev:
        r = _region(dev, region)
        levels = 1 << identity_fields(dev)["cell_bits"]
        targets = np.random.default_rng(target_seed).integers(0, levels, size=(r.rows, r.cols))
        settings = ic.ChipSettings.read(dev)
        tol = dev.read_register("VERIFY_TOL") / Q16
        hist = ic.verify_iterations(dev, array, r.row, r.col, targets)
    path = ic.plot_verify(hist, settings, tol, out / "verify_iterations.png")
    click.echo(f"array {array}, {r.label()}: {hist.cells} cells, {hist.corrective_pulses} corrective pulses, "
               f"mean {hist.mean:.3f} a cell, {hist.never} never settled (limit {hist.max_iter})"
               + ("" if hist.exact else "; APPROXIMATE: the chip did not reproduce the writes from the same SEED"))
    click.echo("  " + "  ".join(f"{j}:{c}" for j, c in enumerate(hist.counts)))
    click.echo(f"wrote {path}")


@inspect.command("program")
@click.argument("program_path", required=False, type=click.Path(path_type=Path))
@device_option
@click.option("-o", "--out", type=click.Path(path_type=Path), default=Path("out/inspect"), show_default=True)
@_one_line_errors
def inspect_program(program_path: Path | None, device, out: Path) -> None:
    """Tile-usage map of a compiled program (a .bin), or of the program loaded on --device."""
    from nvcim.firmware_emu.contract.program_format import Program

    from . import inspect_chip as ic

    if program_path is not None:
        program, title = Program.from_bytes(program_path.read_bytes()), program_path.name
    else:
        with _open(device, None) as dev:
            program, title = dev.fetch_program(), "loaded program"
    _, usage = ic.tile_usage(program)
    path = ic.plot_tiles(program, out / "tiles.png", title)
    per_array = program.array_rows * program.array_cols
    arrays = {a for u in usage for a in u.arrays}
    used = sum(u.cells for u in usage)
    click.echo(f"{title}: {len(usage)} crossbar layers on {len(arrays)} arrays of {program.array_rows}x"
               f"{program.array_cols}; {used} cells, {used / max(1, len(arrays) * per_array):.1%} of those arrays")
    for u in usage:
        click.echo(f"  {u.name:<24} {u.tiles:>4} tiles {u.cells:>9} cells  arrays {_ranges(u.arrays)}")
    click.echo(f"wrote {path}")


def _ranges(values: tuple[int, ...]) -> str:
    """0,1,2,3,7 -> 0-3,7"""
    parts, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            parts.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ",".join(parts)
