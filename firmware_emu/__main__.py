"""``python -m nvcim.firmware_emu serve``: run an emulated chip behind a pty or a TCP port."""

from __future__ import annotations

import logging
import sys

import click
from click.core import ParameterSource

from .chip import Chip, ChipConfig
from .contract.access import check_token
from .contract.registers import DeviceModelCode, Readout
from .link_faults import LinkFaults
from .nvm_image import ImageError
from .serve import DEFAULT_IDLE_TIMEOUT, IDLE_TIMEOUT_RANGE, TcpServer, is_loopback, serve_pty

_DEFAULTS = ChipConfig()


class _OneLineErrors(click.Group):
    """Every error is one line on stderr (``Error: ...``), a traceback only with --debug."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except (ValueError, OSError) as e:  # bad options, an unusable image, a port in use
            if ctx.params.get("debug"):
                raise
            raise click.ClickException(str(e)) from None
        except Exception as e:
            if ctx.params.get("debug"):
                raise
            raise click.ClickException(f"internal error: {type(e).__name__}: {e} (--debug shows where)") from None


@click.group(cls=_OneLineErrors)
@click.option("--debug", is_flag=True, help="Show a traceback with an error.")
def cli(debug: bool) -> None:
    """The nvcim chip emulator."""
    logging.basicConfig(stream=sys.stderr, level=logging.DEBUG if debug else logging.INFO,
                        format="nvcim serve: %(message)s")


@cli.command()
@click.option("--pty", "use_pty", is_flag=True, help="Serve on a new pseudo-terminal (the default).")
@click.option("--tcp", "tcp_port", type=click.IntRange(0, 65535), default=None,
              help="Serve on this TCP port (0: any free port).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on with --tcp (any but loopback warns: other machines reach the chip).")
@click.option("--token", envvar="NVCIM_SERVE_TOKEN", default=None,
              help="With --tcp: serve only hosts that send this token first (socket://HOST:PORT?token=T); "
                   "1..128 of A-Z a-z 0-9 . _ ~ - [env NVCIM_SERVE_TOKEN].")
@click.option("--idle-timeout", type=click.FloatRange(*IDLE_TIMEOUT_RANGE), default=DEFAULT_IDLE_TIMEOUT,
              show_default=True, help="With --tcp: seconds after which an idle host holding the chip gives way "
                                      "to another.")
@click.option("--image", type=click.Path(), default=None,
              help="Non-volatile image directory: cells, noise dump and program persist across restarts.")
@click.option("--link-faults", type=float, default=0.0, show_default=True,
              help="Rate at which the link flips, drops or duplicates bytes (fault injection).")
@click.option("--link-seed", type=int, default=0, show_default=True, help="Seed of the link faults.")
@click.option("--seed", type=int, help=f"Seed of the chip's random processes [default: {_DEFAULTS.seed}].")
@click.option("--sigma", type=float, help=f"Programming variation, relative to g_max [default: {_DEFAULTS.sigma}].")
@click.option("--model", type=click.Choice([m.name for m in DeviceModelCode], case_sensitive=False),
              help="Device variation model [default: GAUSSIAN].")
@click.option("--read-noise", type=float, help="Read noise, relative to g_max [default: 0].")
@click.option("--dac-bits", type=int, help="Every array's input DAC bits, 0 = ideal [default: 0].")
@click.option("--adc-bits", type=int, help="Every array's column ADC bits, 0 = ideal [default: 0].")
@click.option("--readout", type=click.Choice([r.name.lower() for r in Readout], case_sensitive=False),
              help="Every array's readout: column (one ADC per bit line) or shift_add (a weight's slices "
                   "summed in the analog domain before one ADC) [default: column].")
@click.option("--differential/--no-differential", default=None,
              help="Every array pair reads differentially: one ADC per bit-line pair converts I+ - I- "
                   "(the driver then compiles with paired placement) [default: off].")
@click.option("--arrays", type=int, help=f"Number of crossbar arrays [default: {_DEFAULTS.arrays}].")
@click.option("--rows", type=int, help=f"Rows per array [default: {_DEFAULTS.rows}].")
@click.option("--cols", type=int, help=f"Columns per array [default: {_DEFAULTS.cols}].")
def serve(use_pty: bool, tcp_port: int | None, host: str, token: str | None, idle_timeout: float,
          image: str | None, link_faults: float, link_seed: int, **settings) -> None:
    """Serve a chip; prints 'serving on PATH-OR-URL' once it is reachable.

    With --image, settings not given are those stored in the image. On TCP one host holds
    the chip at a time; the others get BUSY (docs/reliability.md#serving).
    """
    if use_pty and tcp_port is not None:
        raise click.UsageError("choose one of --pty and --tcp")
    if tcp_port is None and token is not None:
        if click.get_current_context().get_parameter_source("token") is not ParameterSource.ENVIRONMENT:
            raise click.UsageError("--token applies to --tcp only")
        token = None
    given = {k: v for k, v in settings.items() if v is not None}
    if "model" in given:
        given["model"] = DeviceModelCode[given["model"].upper()]
    if "readout" in given:
        given["readout"] = Readout[given["readout"].upper()]
    try:
        if token is not None:
            check_token(token)
        LinkFaults(link_faults)
        chip = Chip.with_image(image, given) if image else Chip(ChipConfig(**given))
    except (ValueError, ImageError) as e:
        raise click.ClickException(str(e)) from None
    if tcp_port is not None and not is_loopback(host):
        click.echo(f"warning: listening on {host}: other machines can reach this chip"
                   f"{'' if token else ' and program it (give --token to restrict who may connect)'}", err=True)

    def announce(where: str) -> None:
        click.echo(f"serving on {where}")
        sys.stdout.flush()

    try:
        if tcp_port is not None:
            TcpServer(chip, idle_timeout, token, link_faults, link_seed).serve_forever(host, tcp_port, announce)
        else:
            serve_pty(chip, announce, link_faults, link_seed)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    cli()
