"""The ``nvcim`` command."""

from __future__ import annotations

from pathlib import Path

import click

from compiler import CompileError, Target, compile_model


@click.group()
@click.version_option(package_name="nvcim")
def main() -> None:
    """nvcim: a virtual NVCIM DNN accelerator - compiler, emulated chip, driver, TSB tools."""


@main.command()
@click.option("--workdir", type=click.Path(path_type=Path), default=Path("out/demo"), show_default=True,
              help="Where the trained model is written.")
@click.option("--sigma", type=float, default=0.3, show_default=True, help="Device variation of the noisy chip.")
@click.option("--seed", type=int, default=1, show_default=True, help="Seed of the noisy chip.")
def demo(workdir: Path, sigma: float, seed: int) -> None:
    """Train a digits MLP, compile it, flash an emulated chip, compare with onnxruntime."""
    from .demo import run_demo

    run_demo(workdir, sigma=sigma, seed=seed, echo=click.echo)


@main.command("compile")
@click.argument("onnx_path", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Program file to write.")
@click.option("--arrays", type=int, default=Target.arrays, show_default=True)
@click.option("--rows", type=int, default=Target.rows, show_default=True)
@click.option("--cols", type=int, default=Target.cols, show_default=True)
def compile_cmd(onnx_path: Path, output: Path, arrays: int, rows: int, cols: int) -> None:
    """Compile an ONNX model into a chip program."""
    try:
        program = compile_model(onnx_path, Target(arrays=arrays, rows=rows, cols=cols))
    except CompileError as e:
        raise click.ClickException(str(e)) from None
    data = program.to_bytes()
    output.write_bytes(data)
    click.echo(f"{output}: {len(data)} bytes, {len(program.layers)} crossbar layers, "
               f"{len(program.instructions)} instructions, {program.arrays_used} arrays")
