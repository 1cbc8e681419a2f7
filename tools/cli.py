"""The ``nvcim`` command: compile, and the TSB deployment flow step by step or in one go.

    nvcim train   -> backbone.onnx      (noise-injection training, early stop, checkpoints)
    nvcim deploy backbone.onnx          (program the chip open loop; noise captured)
    nvcim noise fetch backbone.onnx -o noise.npz
    nvcim tsb train backbone.onnx --noise noise.npz -o tsb.onnx
    nvcim tsb flash backbone.onnx tsb.onnx --noise noise.npz
    nvcim eval tsb.onnx --noise noise.npz
    nvcim flow                          (all of it on fresh emulated chips, with the summary table)

Every chip command takes ``--device`` (default: $NVCIM_DEVICE, else the chip image
``out/tsb/chip``, which keeps its cells between commands).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import click

from nvcim.compiler import CompileError, Target, compile_model

WORKDIR = Path("out/tsb")
CHIP_IMAGE = f"emu://?image={WORKDIR / 'chip'}"  # the flow's chip: keeps its cells between commands


def device_url(device: str | None) -> str:
    """``--device``, else $NVCIM_DEVICE, else the flow's chip image."""
    from nvcim.driver.default_device import resolve_device  # the driver loads on first use, not at CLI start

    return resolve_device(device, default=CHIP_IMAGE)


def _clear_errors(fn):
    """Turn the flow's expected errors into one clear line and exit status 1."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from nvcim import driver

        from .chip import FlowError
        from .datasets import DatasetError
        from .onnx_io import ModelFileError
        try:
            return fn(*args, **kwargs)
        except (FlowError, CompileError, DatasetError, ModelFileError, driver.NvcimError, ValueError,
                FileNotFoundError) as e:
            raise click.ClickException(str(e)) from None
    return wrapper


def _progress() -> bool:
    return sys.stderr.isatty()


device_option = click.option("--device", default=None, metavar="URL",
                             help="The chip: emu://?image=DIR, emu://NAME?..., /dev/pts/N, socket://HOST:PORT "
                                  f"[default: $NVCIM_DEVICE, else {CHIP_IMAGE}].")
data_option = click.option("--data", default="digits", show_default=True,
                           help="'digits' (scikit-learn, no download), a .npz with x/y, an MNIST IDX folder or a "
                                "CIFAR-10 python folder.")


def age_option(what: str):
    """--age SPAN: seconds, or a number with a unit s/m/h/d/w/y (1d, 10y); docs/device-model.md#drift."""
    def parse(ctx, param, value):
        from .flow import parse_age

        try:
            return parse_age(value)
        except ValueError as e:
            raise click.BadParameter(str(e)) from None

    return click.option("--age", default="0", show_default=True, callback=parse,
                        help=f"Time span (3600, 12h, 1d, 10y): {what}.")


def error_line(e: BaseException) -> str:
    """One line saying what went wrong: the message of the errors nvcim raises for bad input
    (they name the file, node, field or register), else the exception's type and message."""
    from nvcim.driver import NvcimError
    from nvcim.firmware_emu.contract.program_format import ProgramFormatError

    from .chip import FlowError
    from .datasets import DatasetError
    from .onnx_io import ModelFileError

    if isinstance(e, OSError) and e.filename:
        text = f"{e.filename}: {e.strerror or e}"
    elif isinstance(e, (CompileError, ProgramFormatError, NvcimError, FlowError, DatasetError, ModelFileError,
                        ValueError, OSError)):
        text = str(e) or type(e).__name__
    else:
        text = f"{type(e).__name__}: {e} (an internal error; --debug shows where)"
    return " ".join(text.split("\n")[0].split()) if "\n" in text else text


class Commands(click.Group):
    """nvcim's command group: whatever a command raises becomes one line ``Error: ...`` and
    exit status 1, never a traceback, unless ``nvcim --debug`` (then the traceback shows).
    The one place every command's errors go through, bring-up commands included."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as e:
            if ctx.params.get("debug"):
                raise
            raise click.ClickException(error_line(e)) from None


@click.group(cls=Commands)
@click.version_option(package_name="nvcim")
@click.option("--debug", is_flag=True, help="Show the traceback of an error instead of one line.")
def main(debug: bool) -> None:
    """nvcim: a virtual NVCIM DNN accelerator - compiler, emulated chip, driver, TSB tools."""


# -- demo and compile ---------------------------------------------------------------------------
@main.command()
@click.option("--workdir", type=click.Path(path_type=Path), default=WORKDIR, show_default=True)
@click.option("--seeds", default="1,2,3,4,5", show_default=True, help="Chip seeds: one fresh emulated chip each.")
@click.option("--draws", type=click.IntRange(min=1), default=200, show_default=True,
              help="Monte Carlo chips (the summary table reports them).")
@click.option("--mlp", is_flag=True, help="Instead: the digits MLP on an ideal and a noisy chip next to onnxruntime.")
@_clear_errors
def demo(workdir: Path, seeds: str, draws: int, mlp: bool) -> None:
    """The whole TSB flow on LeNet-3 / digits at sigma = 0.3 (the README's main job)."""
    if mlp:
        from .demo import run_demo

        run_demo(Path("out/demo"), sigma=0.3, seed=1, echo=click.echo)
        return
    from .flow import FlowConfig, run_flow

    run_flow(FlowConfig(workdir=workdir, chip_seeds=_seeds(seeds), draws=draws), echo=click.echo)


@main.command("compile")
@click.argument("onnx_path", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Program file to write.")
@click.option("--arrays", type=int, default=Target.arrays, show_default=True)
@click.option("--rows", type=int, default=Target.rows, show_default=True)
@click.option("--cols", type=int, default=Target.cols, show_default=True)
@click.option("--chips", type=click.IntRange(min=1), default=None,
              help="Split the model over this many chips of the geometry: one program per chip, "
                   "OUTPUT with -chipK before its suffix (fewer if the model has fewer stages).")
def compile_cmd(onnx_path: Path, output: Path, arrays: int, rows: int, cols: int, chips: int | None) -> None:
    """Compile an ONNX model into a chip program (or one per chip with --chips)."""
    from nvcim.compiler import CapacityError, lower_model
    from nvcim.compiler.partition import partition

    target = Target(arrays=arrays, rows=rows, cols=cols)
    try:
        if chips is None:
            programs = [compile_model(onnx_path, target)]
            paths = [output]
        else:
            programs = partition(*lower_model(onnx_path), target, chips=chips).programs
            paths = [output.with_name(f"{output.stem}-chip{k}{output.suffix}") for k in range(len(programs))]
    except (CompileError, CapacityError) as e:
        raise click.ClickException(str(e)) from None
    for path, program in zip(paths, programs):
        data = program.to_bytes()
        path.write_bytes(data)
        click.echo(f"{path}: {len(data)} bytes, {len(program.layers)} crossbar layers, "
                   f"{len(program.instructions)} instructions, {program.arrays_used} arrays")


@main.command()
@click.argument("program_paths", nargs=-1, required=True, type=click.Path(path_type=Path))
def disasm(program_paths: tuple[Path, ...]) -> None:
    """Print compiled programs as readable listings (layers, tiles, instructions); several
    programs (the chips of a partitioned model, in order) are preceded by the partition."""
    from nvcim.compiler.disasm import disassemble, partition_summary
    from nvcim.firmware_emu.contract.program_format import Program, ProgramFormatError

    programs = []
    for path in program_paths:
        try:
            programs.append(Program.from_bytes(path.read_bytes()))
        except OSError as e:
            raise click.ClickException(f"{path}: {e.strerror}") from None
        except ProgramFormatError as e:
            raise click.ClickException(f"{path}: {e}") from None
    if len(programs) > 1:
        click.echo(partition_summary(programs, [str(p) for p in program_paths]))
    for path, program in zip(program_paths, programs):
        if len(programs) > 1:
            click.echo(f"; ---- {path}")
        click.echo(disassemble(program))


# -- training -----------------------------------------------------------------------------------
def _train_options(fn):
    opts = [
        click.option("--model", "arch", type=click.Choice(["lenet3", "vgg8", "resnet18"]), default="lenet3",
                     show_default=True),
        click.option("--width", type=float, default=1.0, show_default=True,
                     help="Channel scale (VGG-8 / ResNet-18 at 0.125 fit this machine)."),
        click.option("--bn/--no-bn", default=None,
                     help="BatchNorm after each conv [default: off for LeNet-3, on else]."),
        click.option("--image", type=int, default=None, help="Input size [default: 28 LeNet-3, 32 else]."),
        click.option("--epochs", type=int, default=60, show_default=True, help="Length of full training (the plan)."),
        click.option("--stop-fraction", type=float, default=0.5, show_default=True,
                     help="Early stop at this fraction of the plan (the seeds' 0.15 / 0.3 / 0.5); 1 = full."),
        click.option("--patience", type=int, default=None,
                     help="Instead stop when the noisy validation accuracy stalls this many epochs (keeps the best)."),
        click.option("--lr", type=float, default=3e-3, show_default=True),
        click.option("--sigma-train", type=float, default=0.2, show_default=True, help="Noise-injection sigma."),
        click.option("--seed", type=int, default=0, show_default=True),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def _train_config(arch, width, bn, epochs, stop_fraction, patience, lr, sigma_train, seed, sigma=0.3,
                  device_model="GAUSSIAN"):
    from .train import TrainConfig

    return TrainConfig(arch=arch, width=width, bn=bn, epochs=epochs,
                       stop_fraction=None if (patience is not None or stop_fraction >= 1) else stop_fraction,
                       patience=patience, lr=lr, sigma_train=sigma_train, sigma_eval=sigma,
                       device_model=device_model, seed=seed)


@main.command()
@_train_options
@data_option
@click.option("--sigma", type=float, default=0.3, show_default=True, help="Chip sigma of the noisy validation metric.")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=WORKDIR / "backbone.onnx", show_default=True)
@_clear_errors
def train(arch, width, bn, image, epochs, stop_fraction, patience, lr, sigma_train, seed, data, sigma, output) -> None:
    """Train a backbone with noise injection; write checkpoints and the ONNX model."""
    from . import datasets
    from .models import DEFAULT_IMAGE
    from .onnx_io import export
    from .train import save_checkpoint, train_backbone

    split = datasets.load(data, image_size=image or DEFAULT_IMAGE[arch])
    cfg = _train_config(arch, width, bn, epochs, stop_fraction, patience, lr, sigma_train, seed, sigma)
    result = train_backbone(split, cfg, checkpoint_dir=output.parent / "checkpoints", log=click.echo,
                            progress=_progress())
    save_checkpoint(result.model, output.with_suffix(".pt"), cfg, result.history[-1])
    export(result.model, output, role="backbone")
    click.echo(f"trained {result.epochs_run} epochs in {result.seconds:.1f} s (kept epoch {result.best_epoch}); "
               f"checkpoints in {output.parent / 'checkpoints'}; model -> {output}")


# -- chip steps -----------------------------------------------------------------------------------
@main.command()
@click.argument("model", type=click.Path(path_type=Path), default=WORKDIR / "backbone.onnx")
@device_option
@click.option("--sigma", type=float, default=None, help="Chip setting (emu:// chips): device variation.")
@click.option("--seed", type=int, default=None, help="Chip setting (emu:// chips): the chip's seed.")
@click.option("--device-model", default=None,
              help="Chip setting (emu:// chips): GAUSSIAN, RRAM1, FEFET2, RRAM4, FEFET6.")
@_clear_errors
def deploy(model: Path, device, sigma, seed, device_model) -> None:
    """Program a model onto the chip open loop; the chip captures every cell's noise."""
    from nvcim import driver

    from .chip import chip_settings, deploy_backbone, settings_url

    url = settings_url(device_url(device), sigma=sigma, seed=seed, model=device_model)
    with driver.open(url) as dev:
        program, cost = deploy_backbone(dev, model)
        s = chip_settings(dev)
    click.echo(f"deployed {model} on {url} (sigma={s['sigma']:.3f}, seed {s['seed']}, {s['device_model']}): "
               f"{len(program.layers)} layers; {cost}")


@main.group()
def noise() -> None:
    """The chip's captured programming noise."""


@noise.command("fetch")
@click.argument("model", type=click.Path(path_type=Path), default=WORKDIR / "backbone.onnx")
@device_option
@click.option("-o", "--output", type=click.Path(path_type=Path), default=WORKDIR / "noise.npz", show_default=True)
@_clear_errors
def noise_fetch(model: Path, device, output: Path) -> None:
    """Read the model's per-weight noise off the chip into a .npz (with chip and model identity)."""
    from nvcim import driver

    from .chip import fetch_noise

    with driver.open(device_url(device)) as dev:
        dump = fetch_noise(dev, model)
    dump.save(output)
    n = sum(v.size for v in dump.noise.values())
    click.echo(f"{output}: noise of {n} weights in {len(dump.noise)} layers from chip seed {dump.chip['seed']} "
               f"(sigma={dump.chip['sigma']:.3f}); model fingerprint {dump.model_fingerprint[:12]}")


@main.group()
def tsb() -> None:
    """Tiny Shared Block: train on a chip's noise, reflash only its cells."""


@tsb.command("train")
@click.argument("backbone", type=click.Path(path_type=Path), default=WORKDIR / "backbone.onnx")
@click.option("--noise", "noise_path", type=click.Path(path_type=Path), default=WORKDIR / "noise.npz",
              show_default=True)
@data_option
@click.option("-c", "--width", "c", type=int, default=None,
              help="Block width c [default: 5 LeNet-3, 128 x width else].")
@click.option("--epochs", type=int, default=10, show_default=True)
@click.option("--lr", type=float, default=1e-2, show_default=True)
@click.option("--sigma-verified", type=float, default=0.03, show_default=True,
              help="Variation of the write-verified TSB cells, injected every step.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("-o", "--output", type=click.Path(path_type=Path), default=WORKDIR / "tsb.onnx", show_default=True)
@_clear_errors
def tsb_train(backbone, noise_path, data, c, epochs, lr, sigma_verified, seed, output) -> None:
    """Train only the TSB on the chip's noise; write the TSB-augmented ONNX model."""
    from . import datasets
    from .onnx_io import export, read_meta
    from .tsb import TSBConfig, load_for_training, train_tsb

    model, fixed, dump = load_for_training(backbone, noise_path, c)
    split = datasets.load(data, image_size=read_meta(backbone)[1]["image"])
    result = train_tsb(model, fixed, split, TSBConfig(c, epochs, lr, sigma_verified=sigma_verified, seed=seed),
                       log=click.echo, progress=_progress())
    export(model, output, role="tsb", extra=dict(backbone_fingerprint=dump.model_fingerprint,
                                                 noise_digest=dump.digest()))
    click.echo(f"TSB trained in {result.seconds:.1f} s -> {output}")


@tsb.command("flash")
@click.argument("backbone", type=click.Path(path_type=Path), default=WORKDIR / "backbone.onnx")
@click.argument("tsb_model", type=click.Path(path_type=Path), default=WORKDIR / "tsb.onnx")
@click.option("--noise", "noise_path", type=click.Path(path_type=Path), default=WORKDIR / "noise.npz",
              show_default=True)
@device_option
@_clear_errors
def tsb_flash(backbone, tsb_model, noise_path, device) -> None:
    """Compile incrementally, write only the TSB cells with write-verify, prove the backbone unchanged."""
    from nvcim import driver

    from .chip import NoiseDump, flash_tsb

    dump = NoiseDump.load(noise_path)
    with driver.open(device_url(device)) as dev:
        _, report = flash_tsb(dev, backbone, tsb_model, dump)
    for line in report.lines():
        click.echo(line)


@main.command("eval")
@click.argument("model", type=click.Path(path_type=Path), default=WORKDIR / "tsb.onnx")
@device_option
@data_option
@click.option("--noise", "noise_path", type=click.Path(path_type=Path), default=None,
              help="For a TSB model: the backbone noise file, held fixed in the Monte Carlo runs.")
@click.option("--draws", type=click.IntRange(min=0), default=200, show_default=True,
              help="Monte Carlo chips (0: chip only).")
@click.option("--sigma", type=float, default=None, help="Monte Carlo sigma of the backbone [default: the chip's].")
@click.option("--sigma-verified", type=float, default=0.03, show_default=True)
@click.option("--no-chip", is_flag=True, help="Only the Monte Carlo simulation; do not touch a chip.")
@age_option("first let the chip's retention clock run this long (cells drift; the chip keeps the later clock)")
@_clear_errors
def eval_cmd(model, device, data, noise_path, draws, sigma, sigma_verified, no_chip, age) -> None:
    """Accuracy on the chip itself and over N simulated chips (mean, 95 % interval)."""
    from .flow import evaluate_model

    evaluate_model(model, device_url(device), data, noise_path, draws, sigma, sigma_verified,
                   chip=not no_chip, echo=click.echo, age_s=age)


@main.command()
@click.option("--workdir", type=click.Path(path_type=Path), default=WORKDIR, show_default=True)
@_train_options
@data_option
@click.option("--sigma", type=float, default=0.3, show_default=True, help="Device variation of the chips.")
@click.option("--device-model", default="GAUSSIAN", show_default=True)
@click.option("--seeds", default="1,2,3,4,5", show_default=True, help="Chip seeds: one fresh emulated chip each.")
@device_option
@click.option("--tsb-width", "c", type=int, default=None, help="TSB width c [default: 5 LeNet-3, 128 x width else].")
@click.option("--tsb-epochs", type=int, default=10, show_default=True)
@click.option("--tsb-lr", type=float, default=1e-2, show_default=True)
@click.option("--sigma-verified", type=float, default=0.03, show_default=True)
@click.option("--draws", type=click.IntRange(min=1), default=200, show_default=True,
              help="Monte Carlo chips (the summary table reports them).")
@age_option("also measure each reflashed chip after this long of drift")
@_clear_errors
def flow(workdir, arch, width, bn, image, epochs, stop_fraction, patience, lr, sigma_train, seed, data, sigma,
         device_model, seeds, device, c, tsb_epochs, tsb_lr, sigma_verified, draws, age) -> None:
    """The whole flow: train, deploy, fetch noise, train TSB, reflash, evaluate; prints the summary table."""
    from .flow import FlowConfig, run_flow
    from .tsb import TSBConfig

    cfg = FlowConfig(workdir=workdir, data=data, image=image, sigma=sigma, device_model=device_model.upper(),
                     chip_seeds=_seeds(seeds), device=device, draws=draws, age_s=age,
                     train=_train_config(arch, width, bn, epochs, stop_fraction, patience, lr, sigma_train, seed,
                                         sigma, device_model.upper()),
                     tsb=TSBConfig(c, tsb_epochs, tsb_lr, sigma_verified=sigma_verified, seed=seed))
    run_flow(cfg, echo=click.echo)


def _comma_list(text: str, kind: type, expected: str, what: str) -> tuple:
    """A comma-separated option value as a tuple of ``kind``; a bad or empty one is a BadParameter."""
    try:
        values = tuple(kind(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected {expected}") from None
    if not values:
        raise click.BadParameter(f"at least one {what}")
    return values


def _seeds(text: str) -> tuple[int, ...]:
    return _comma_list(text, int, "comma-separated integers, e.g. 1,2,3", "chip seed")


# -- bring-up: identify, regs, trace, seq, inspect (tools/cli_bringup.py) -------------------------------
from .cli_bringup import COMMANDS as _BRINGUP_COMMANDS  # noqa: E402 (after main, which they join)
from .cli_experiments import COMMANDS as _EXPERIMENT_COMMANDS  # noqa: E402 (method, nft, experiment)

for _command in _BRINGUP_COMMANDS + _EXPERIMENT_COMMANDS:
    main.add_command(_command)

if __name__ == "__main__":
    main(prog_name="nvcim")
