"""``python -m firmware_emu serve``: run an emulated chip behind a pty or a TCP port."""

from __future__ import annotations

import click

from .chip import Chip, ChipConfig
from .registers import DeviceModelCode
from .serve import serve_pty, serve_tcp


@click.group()
def cli() -> None:
    """The nvcim chip emulator."""


@cli.command()
@click.option("--pty", "use_pty", is_flag=True, help="Serve on a new pseudo-terminal (the default).")
@click.option("--tcp", "tcp_port", type=int, default=None, help="Serve on this TCP port of 127.0.0.1 (0: any free port).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on with --tcp.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the chip's random processes.")
@click.option("--sigma", type=float, default=0.3, show_default=True, help="Programming variation, relative to g_max.")
@click.option("--model", type=click.Choice([m.name for m in DeviceModelCode], case_sensitive=False),
              default="GAUSSIAN", show_default=True, help="Device variation model.")
@click.option("--read-noise", type=float, default=0.0, show_default=True, help="Read noise, relative to g_max.")
@click.option("--arrays", type=int, default=256, show_default=True, help="Number of crossbar arrays.")
@click.option("--rows", type=int, default=256, show_default=True, help="Rows per array.")
@click.option("--cols", type=int, default=256, show_default=True, help="Columns per array.")
def serve(use_pty: bool, tcp_port: int | None, host: str, seed: int, sigma: float, model: str,
          read_noise: float, arrays: int, rows: int, cols: int) -> None:
    """Serve a chip; prints 'serving on PATH-OR-URL' once it is reachable."""
    if use_pty and tcp_port is not None:
        raise click.UsageError("choose one of --pty and --tcp")
    try:
        config = ChipConfig(arrays=arrays, rows=rows, cols=cols, sigma=sigma, seed=seed,
                            model=DeviceModelCode[model.upper()], read_noise=read_noise)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    chip = Chip(config)

    def announce(where: str) -> None:
        click.echo(f"serving on {where}")
        click.get_text_stream("stdout").flush()

    try:
        if tcp_port is not None:
            serve_tcp(chip, host, tcp_port, announce)
        else:
            serve_pty(chip, announce)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    cli()
