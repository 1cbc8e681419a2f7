"""A model bigger than one chip, on several: Session.run next to onnxruntime.

1. The test suite's 3-chip model (18 64x64 layers and a skip, chips of 4 arrays): batch of
   256 through 3 in-process emulated chips at sigma = 0 (a pipeline of micro-batches, one
   thread per chip) against onnxruntime on the quantised model in the same process.
2. A ResNet-50-shaped model (bottlenecks 3-4-6-3, 25.5 M weights, random weights, built in
   torch and exported with torch.onnx.export): compile time for one default chip (the
   CapacityError naming the chips it needs) and for that many chips, then a small batch on
   that many default in-process chips against onnxruntime. ``--image`` sets the input size
   (default 224; the chips' programming, not the size, dominates the load time).

Run: .venv/bin/python bench/bench_multichip.py [--image 224] [--batch 4] [--skip-resnet]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from nvcim import driver
from nvcim.compiler import CapacityError, Target, lower_model, place, quantized_model
from nvcim.compiler.partition import partition

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_multichip import chain  # noqa: E402  (the tests' 3-chip model)


class Bottleneck(nn.Module):
    def __init__(self, c_in: int, width: int, stride: int):
        super().__init__()
        c_out = 4 * width
        self.body = nn.Sequential(
            nn.Conv2d(c_in, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
        self.short = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        return torch.relu(self.body(x) + self.short(x))


def resnet50(classes: int = 1000) -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                               nn.MaxPool2d(3, 2, 1)]
    c = 64
    for width, blocks, stride in [(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)]:
        for b in range(blocks):
            layers.append(Bottleneck(c, width, stride if b == 0 else 1))
            c = 4 * width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes)]
    return nn.Sequential(*layers)


def _compare(name: str, sess, model: onnx.ModelProto, feeds: dict[str, np.ndarray], runs: int) -> None:
    reference = ort.InferenceSession(quantized_model(model).SerializeToString())
    want = reference.run(None, feeds)
    got = sess.run(None, feeds)
    error = max(float(np.abs(g - w).max() / max(np.abs(w).max(), 1e-30)) for g, w in zip(got, want))
    batch = len(next(iter(feeds.values())))
    times = {}
    for who, fn in (("chips", lambda: sess.run(None, feeds)), ("onnxruntime", lambda: reference.run(None, feeds))):
        t0 = time.perf_counter()
        for _ in range(runs):
            fn()
        times[who] = (time.perf_counter() - t0) / runs
    print(f"{name}: batch {batch} on {len(sess.devices)} chips {times['chips'] * 1e3:9.1f} ms "
          f"({batch / times['chips']:8.1f} samples/s), onnxruntime {times['onnxruntime'] * 1e3:8.1f} ms "
          f"({batch / times['onnxruntime']:8.1f} samples/s); max |chips - onnxruntime| / max|onnxruntime| "
          f"{error:.1e}")


def small(tmp: Path) -> None:
    path = tmp / "chain.onnx"
    model = chain()
    onnx.save(model, path)
    t0 = time.perf_counter()
    sess = driver.load(path, device=["emu://?arrays=4&sigma=0"] * 3)
    print(f"chain (18 layers of 64x64, chips of 4 arrays): load {time.perf_counter() - t0:.2f} s, "
          f"arrays per chip {[p.arrays_used for p in sess.programs]}")
    x = np.random.default_rng(0).standard_normal((256, 64)).astype(np.float32)
    with sess:
        _compare("chain", sess, model, {"x": x}, runs=5)


def resnet(tmp: Path, image: int, batch: int) -> None:
    torch.manual_seed(0)
    net = resnet50().eval()
    path = tmp / "resnet50.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(1, 3, image, image),), str(path), dynamo=False, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    target = Target()
    t0, c0 = time.perf_counter(), time.process_time()
    lowered = lower_model(path)
    t_lower, c_lower = time.perf_counter() - t0, time.process_time() - c0
    weights = sum(w.size for w in lowered[0].weights.values())
    t0 = time.perf_counter()
    try:
        place(*lowered, target)
        raise SystemExit("ResNet-50 fits one default chip?")
    except CapacityError as e:
        message = str(e)
    t_refuse = time.perf_counter() - t0
    chips = int(message.split("it fits ")[1].split(" chips")[0])
    t0, c0 = time.perf_counter(), time.process_time()
    part = partition(*lowered, target, chips=chips)
    t_split, c_split = time.perf_counter() - t0, time.process_time() - c0
    print(f"ResNet-50 ({weights / 1e6:.1f} M weights, input 3x{image}x{image}, default chip of {target.arrays} "
          f"arrays of {target.rows}x{target.cols}):")
    print(f"  one chip: {message.split(': ', 1)[1]}")
    print(f"  placing on one chip and naming the chip count {t_refuse:.2f} s")
    print(f"  compile for {chips} chips: front end + lowering {t_lower:.2f} s, partition and placement "
          f"{t_split:.2f} s, total {t_lower + t_split:.2f} s wall, {c_lower + c_split:.2f} s CPU of this process")
    print(f"  arrays per chip {[p.arrays_used for p in part.programs]}")
    t0 = time.perf_counter()
    sess = driver.load(path, device=["emu://?sigma=0"] * chips)
    cells = sum(len(p.cells) * 8 // target.cell_bits for p in part.programs)
    print(f"  driver.load on {chips} in-process chips (compile, then program {cells / 1e6:.0f} M cells): "
          f"{time.perf_counter() - t0:.1f} s")
    x = np.random.default_rng(0).standard_normal((batch, 3, image, image)).astype(np.float32)
    with sess:
        _compare("ResNet-50", sess, onnx.load(str(path)), {"x": x}, runs=2)


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--image", type=int, default=224)
    args.add_argument("--batch", type=int, default=4)
    args.add_argument("--skip-resnet", action="store_true")
    options = args.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        small(Path(tmp))
        if not options.skip_resnet:
            resnet(Path(tmp), options.image, options.batch)


if __name__ == "__main__":
    main()
