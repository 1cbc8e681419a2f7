"""The TSB flow's stages, timed on one emulated chip, and the Monte Carlo simulator's throughput.

Prints, per stage, the wall time and the work done: backbone training (s/epoch), deploy
(cells/s through the driver), noise fetch, TSB training (s/epoch), the incremental
reflash (cells, pulses, modelled time next to a full write-verify) and Monte Carlo chips
per second. ``--model vgg8 --width 0.125`` runs the scaled VGG-8 instead of LeNet-3.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from nvcim import driver  # noqa: E402
from nvcim.firmware_emu.contract.device import DeviceSettings  # noqa: E402
from nvcim.tools import datasets  # noqa: E402
from nvcim.tools.chip import chip_accuracy, deploy_backbone, fetch_noise, flash_tsb  # noqa: E402
from nvcim.tools.evaluate import monte_carlo  # noqa: E402
from nvcim.tools.models import DEFAULT_IMAGE, count_weights  # noqa: E402
from nvcim.tools.onnx_io import export, load_deploy  # noqa: E402
from nvcim.tools.train import TrainConfig, train_backbone  # noqa: E402
from nvcim.tools.tsb import TSBConfig, load_for_training, train_tsb  # noqa: E402


def _row(stage: str, seconds: float, work: str) -> None:
    print(f"{stage:<28} {seconds:8.2f} s   {work}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="lenet3", choices=["lenet3", "vgg8", "resnet18"])
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--epochs", type=int, default=10, help="backbone epochs (full plan, no early stop)")
    ap.add_argument("--tsb-epochs", type=int, default=5)
    ap.add_argument("--draws", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    data = datasets.load("digits", image_size=DEFAULT_IMAGE[args.model])
    print(f"TSB flow stages: {args.model} (width {args.width}) on digits ({len(data.x_train)} train / "
          f"{len(data.x_test)} test), one chip sigma=0.3, torch threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        wd = Path(tmp)
        t = time.perf_counter()
        trained = train_backbone(data, TrainConfig(arch=args.model, width=args.width, epochs=args.epochs,
                                                   stop_fraction=None, val_draws=5), log=lambda s: None,
                                 progress=False)
        dt = time.perf_counter() - t
        _row("backbone training", dt, f"{args.epochs} epochs, {dt / args.epochs:.2f} s/epoch "
                                       f"({count_weights(trained.model)[0]} crossbar weights)")
        t = time.perf_counter()
        onnx_path = export(trained.model, wd / "backbone.onnx", role="backbone")
        _row("ONNX export", time.perf_counter() - t, str(onnx_path.stat().st_size) + " bytes")
        with driver.open("emu://?sigma=0.3&seed=1") as dev:
            t = time.perf_counter()
            program, cost = deploy_backbone(dev, onnx_path)
            dt = time.perf_counter() - t
            _row("compile + deploy open loop", dt, f"{cost.cells} cells, {cost.cells / dt / 1e6:.2f} M cells/s")
            t = time.perf_counter()
            dump = fetch_noise(dev, onnx_path)
            dump.save(wd / "noise.npz")
            _row("noise fetch + save", time.perf_counter() - t,
                 f"{sum(v.size for v in dump.noise.values())} weights")
            model, fixed, dump = load_for_training(onnx_path, wd / "noise.npz", None)
            t = time.perf_counter()
            res = train_tsb(model, fixed, data, TSBConfig(epochs=args.tsb_epochs), log=lambda s: None, progress=False)
            _row("TSB training", res.seconds, f"{args.tsb_epochs} epochs, {res.seconds / args.tsb_epochs:.2f} s/epoch, "
                                              f"c={model.tsb.c}")
            tsb_path = export(model, wd / "tsb.onnx", role="tsb")
            t = time.perf_counter()
            tsb_program, report = flash_tsb(dev, onnx_path, tsb_path, dump)
            _row("reflash TSB (with proof)", time.perf_counter() - t,
                 f"{report.cost.cells} cells, {report.cost.write_pulses} pulses, {report.cost.busy_ns / 1e3:.1f} us "
                 f"modelled; full write-verify {report.full_verify.write_pulses} pulses, "
                 f"{report.full_verify.busy_ns / 1e6:.2f} ms modelled")
            t = time.perf_counter()
            acc = chip_accuracy(dev, tsb_program, data.x_test, data.y_test)
            dt = time.perf_counter() - t
            _row("inference on the chip", dt, f"{len(data.x_test) / dt:.0f} images/s, accuracy {acc:.2%}")
        deploy, _ = load_deploy(onnx_path)
        t = time.perf_counter()
        mc = monte_carlo(deploy, data.x_test, data.y_test, DeviceSettings(0.3), draws=args.draws)
        dt = time.perf_counter() - t
        _row("Monte Carlo, backbone", dt, f"{args.draws} chips x {len(data.x_test)} images: "
                                          f"{args.draws / dt:.1f} chips/s ({mc.mean:.2%})")
        t = time.perf_counter()
        mc = monte_carlo(model, data.x_test, data.y_test, None, draws=args.draws, fixed=fixed, tsb=DeviceSettings(0.03))
        dt = time.perf_counter() - t
        _row("Monte Carlo, TSB", dt, f"{args.draws} chips: {args.draws / dt:.1f} chips/s ({mc.mean:.2%})")


if __name__ == "__main__":
    main()
