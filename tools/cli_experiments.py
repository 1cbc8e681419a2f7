"""The methods and the papers' experiments on the command line: ``nvcim method``, ``nvcim nft``,
``nvcim experiment`` (joined to ``nvcim`` in cli.py).

    nvcim method selective out/tsb/backbone.onnx --rule uswim --budget 0.01 --sigma 0.3 --seed 1
    nvcim nft ovf -o out/nft/backbone.onnx
    nvcim experiment gap-vs-sigma --out docs/results        # Dask LocalCluster, 2 workers
    nvcim experiment write-cycles --scheduler tcp://10.0.0.5:8786
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from .cli import WORKDIR, _clear_errors, _comma_list, _progress, _seeds, data_option


def _floats(text: str) -> tuple[float, ...]:
    return _comma_list(text, float, "comma-separated numbers, e.g. 0.1,0.2", "value")


def _ints_or_none(text: str | None) -> list[int] | None:
    return None if text is None else list(_seeds(text))


@click.command("method")
@click.argument("name", type=click.Choice(["deployed", "write-verify", "retrain-last", "retrain-last-layers",
                                           "selective", "tsb"]))
@click.argument("backbone", type=click.Path(path_type=Path), default=WORKDIR / "backbone.onnx")
@click.option("--device", default=None, metavar="URL", help="A chip URL; default: a fresh emulated chip from "
                                                              "--sigma/--seed/--device-model.")
@click.option("--sigma", type=float, default=0.3, show_default=True)
@click.option("--seed", type=int, default=1, show_default=True, help="Chip seed.")
@click.option("--device-model", default="GAUSSIAN", show_default=True, help="GAUSSIAN, RRAM1, FEFET2, RRAM4, FEFET6.")
@data_option
@click.option("--rule", type=click.Choice(["uswim", "magnitude", "random"]), default="uswim", show_default=True,
              help="selective: how the weights to verify are chosen.")
@click.option("--budget", type=float, default=0.01, show_default=True, help="selective: fraction of weights verified.")
@click.option("--tsb-width", "c", type=int, default=None, help="tsb: block width c.")
@click.option("--points", default=None, help="tsb: insertion points, e.g. 0,2 [default: all].")
@click.option("--separate", is_flag=True, help="tsb: one block copy per insertion point (the paper's Separate).")
@click.option("--epochs", type=int, default=10, show_default=True, help="tsb / retrain: training epochs.")
@click.option("--lr", type=float, default=None, help="tsb / retrain: learning rate [default: 1e-2 tsb, 1e-3 retrain].")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Also write the outcome.")
@_clear_errors
def method(name, backbone, device, sigma, seed, device_model, data, rule, budget, c, points, separate, epochs, lr,
           json_path) -> None:
    """Deploy BACKBONE on a chip with one method; print accuracy and its cost in full."""
    from . import datasets
    from .methods import run_method
    from .onnx_io import read_meta
    from .outcome import ChipSpec

    params: dict = {}
    if name == "selective":
        params = dict(rule=rule, budget=budget)
    elif name == "tsb":
        params = dict(c=c, points=_ints_or_none(points), shared="separate" if separate else "common", epochs=epochs)
    elif name.startswith("retrain"):
        params = dict(epochs=epochs)
    if lr is not None and name in ("tsb", "retrain-last", "retrain-last-layers"):
        params["lr"] = lr
    split = datasets.load(data, image_size=read_meta(backbone)[1]["image"])
    chip = device if device is not None else ChipSpec(sigma, seed, device_model.upper())
    outcome = run_method(name, backbone, chip, split, **params)
    click.echo(str(outcome))
    if json_path:
        json_path.write_text(json.dumps(outcome.to_dict(), indent=1, default=str))


@click.command("nft")
@click.argument("variant", type=click.Choice(["ovf", "irs"]))
@click.option("--model", "arch", type=click.Choice(["lenet3", "vgg8", "resnet18"]), default="lenet3",
              show_default=True)
@click.option("--width", type=float, default=1.0, show_default=True)
@click.option("--epochs", type=int, default=60, show_default=True)
@click.option("--stop-fraction", type=float, default=1.0, show_default=True, help="Stop at this fraction of the plan.")
@click.option("--lr", type=float, default=3e-3, show_default=True)
@click.option("--sigma-train", type=float, default=0.3, show_default=True)
@click.option("--beta", type=float, default=1e-2, show_default=True, help="Feedback weight beta.")
@click.option("--seed", type=int, default=0, show_default=True)
@data_option
@click.option("-o", "--output", type=click.Path(path_type=Path), default=Path("out/nft/backbone.onnx"),
              show_default=True)
@_clear_errors
def nft_cmd(variant, arch, width, epochs, stop_fraction, lr, sigma_train, beta, seed, data, output) -> None:
    """Train a backbone with negative feedback training (OVF or IRS); deploy it like any backbone."""
    from . import datasets
    from .models import DEFAULT_IMAGE
    from .nft import train_nft
    from .onnx_io import export
    from .train import TrainConfig

    split = datasets.load(data, image_size=DEFAULT_IMAGE[arch])
    cfg = TrainConfig(arch=arch, width=width, epochs=epochs,
                      stop_fraction=None if stop_fraction >= 1 else stop_fraction, lr=lr, sigma_train=sigma_train,
                      sigma_eval=sigma_train, seed=seed)
    result = train_nft(split, cfg, variant, beta=beta, log=click.echo, progress=_progress())
    export(result.model, output, role="backbone")
    click.echo(f"NFT {variant.upper()} backbone trained {result.epochs_run} epochs in {result.seconds:.1f} s "
               f"-> {output}")


@click.command("experiment")
@click.argument("name", type=click.Choice(["gap-vs-sigma", "time-to-accuracy", "tsb-ablation", "write-cycles", "nft"]))
@click.option("--model", type=click.Choice(["lenet3", "vgg8", "resnet18"]), default="lenet3", show_default=True)
@click.option("--width", type=float, default=1.0, show_default=True)
@data_option
@click.option("--seeds", default="1,2,3,4,5", show_default=True, help="Chip seeds per point.")
@click.option("--sigmas", default="0.1,0.2,0.3,0.4", show_default=True, help="Device sigmas of the sweeps.")
@click.option("--sigma", type=float, default=0.3, show_default=True, help="Sigma of the single-sigma experiments.")
@click.option("--epochs", type=int, default=60, show_default=True, help="The full noise-injection plan.")
@click.option("--budgets", default="0.005,0.01,0.03,0.1,0.3,0.6", show_default=True,
              help="write-cycles: fractions of weights verified.")
@click.option("--betas", default="0.1,0.01,0.001,0.0001", show_default=True,
              help="nft: NFT feedback coefficients searched (the paper's four steps).")
@click.option("--smoke", is_flag=True, help="A seconds-long run on a data subset (checks the machinery only).")
@click.option("--scheduler", default="local", show_default=True,
              help="'local' (a Dask LocalCluster), 'serial', or a running cluster's tcp://HOST:PORT.")
@click.option("--workers", type=int, default=2, show_default=True, help="Workers of the local cluster.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("out/experiments"), show_default=True,
              help="Folder of the tables, rows and plots.")
@click.option("--cache", type=click.Path(path_type=Path), default=None,
              help="Folder of the trained backbones [default: OUT/backbones].")
@_clear_errors
def experiment(name, model, width, data, seeds, sigmas, sigma, epochs, budgets, betas, smoke, scheduler, workers,
               out, cache) -> None:
    """Regenerate one of the papers' comparisons on emulated chips: table (.md), rows (.json), plot (.png)."""
    from .experiments import ExperimentConfig, run_experiment

    settings = dict(model=model, width=width, data=data, seeds=_seeds(seeds), sigmas=_floats(sigmas), sigma=sigma,
                    epochs=epochs, budgets=_floats(budgets), betas=_floats(betas), scheduler=scheduler,
                    workers=workers, out=out, cache=cache)
    if smoke:
        defaults = ExperimentConfig()
        cfg = ExperimentConfig.smoke(**{k: v for k, v in settings.items() if v != getattr(defaults, k)})
    else:
        cfg = ExperimentConfig(**settings)
    result = run_experiment(name, cfg, log=click.echo)
    for line in result["table"]:
        click.echo(line)
    click.echo(f"-> {result['md']}, {result['png']}")


COMMANDS = [method, nft_cmd, experiment]
