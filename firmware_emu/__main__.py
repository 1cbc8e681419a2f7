"""``python -m nvcim.firmware_emu serve``: run an emulated chip behind a pty or a TCP port."""

from __future__ import annotations

import sys

import click

from .chip import Chip, ChipConfig
from .link_faults import LinkFaults
from .nvm_image import ImageError
from .contract.registers import DeviceModelCode
from .serve import serve_pty, serve_tcp

_DEFAULTS = ChipConfig()


@click.group()
def cli() -> None:
    """The nvcim chip emulator."""


@cli.command()
@click.option("--pty", "use_pty", is_flag=True, help="Serve on a new pseudo-terminal (the default).")
@click.option("--tcp", "tcp_port", type=int, default=None, help="Serve on this TCP port (0: any free port).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on with --tcp.")
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
@click.option("--arrays", type=int, help=f"Number of crossbar arrays [default: {_DEFAULTS.arrays}].")
@click.option("--rows", type=int, help=f"Rows per array [default: {_DEFAULTS.rows}].")
@click.option("--cols", type=int, help=f"Columns per array [default: {_DEFAULTS.cols}].")
def serve(use_pty: bool, tcp_port: int | None, host: str, image: str | None, link_faults: float,
          link_seed: int, **settings) -> None:
    """Serve a chip; prints 'serving on PATH-OR-URL' once it is reachable.

    With --image, settings not given are those stored in the image.
    """
    if use_pty and tcp_port is not None:
        raise click.UsageError("choose one of --pty and --tcp")
    given = {k: v for k, v in settings.items() if v is not None}
    if "model" in given:
        given["model"] = DeviceModelCode[given["model"].upper()]
    try:
        chip = Chip.with_image(image, given) if image else Chip(ChipConfig(**given))
        LinkFaults(link_faults)
    except (ValueError, ImageError) as e:
        raise click.BadParameter(str(e)) from None

    def announce(where: str) -> None:
        click.echo(f"serving on {where}")
        sys.stdout.flush()

    try:
        if tcp_port is not None:
            serve_tcp(chip, host, tcp_port, announce, link_faults, link_seed)
        else:
            serve_pty(chip, announce, link_faults, link_seed)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    cli()
