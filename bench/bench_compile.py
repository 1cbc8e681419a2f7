"""Compile time and program size for LeNet-3, VGG-8 and ResNet-18 at full size.

The models are the project's (tools.models, BatchNorm folded by the exporter), exported
once with torch.onnx.export (TorchScript) and compiled for a chip large enough to hold
them (256x256 arrays, 8-bit weights on 2-bit cells). Compile time is split into the front
end + lowering (load, check, fold, lower) and placement (quantise, slice, tile, pack); each
is the best of three runs. Run: .venv/bin/python bench/bench_compile.py
"""

from __future__ import annotations

import tempfile
import time
import warnings
from pathlib import Path

import torch

from nvcim.compiler import Target, lower_model, place
from nvcim.tools.models import build

MODELS = {"LeNet-3": ("lenet3", 1, 28), "VGG-8": ("vgg8", 3, 32), "ResNet-18": ("resnet18", 3, 32)}
TARGET = Target(arrays=8192)


def _export(arch: str, in_ch: int, image: int, path: Path) -> None:
    torch.manual_seed(0)
    model = build(arch, in_ch=in_ch, classes=10, image=image).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, in_ch, image, image),), str(path), dynamo=False,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})


def _best(fn, runs: int = 3) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(runs):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def main() -> None:
    print(f"target: {TARGET.rows}x{TARGET.cols} arrays, {TARGET.weight_bits}-bit weights on "
          f"{TARGET.cell_bits}-bit cells")
    print(f"{'model':<10} {'input':>9} {'weights':>11} {'layers':>6} {'tiles':>6} {'arrays':>6} "
          f"{'code B':>9} {'cells B':>11} {'file B':>11} {'lower ms':>9} {'place ms':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, (arch, in_ch, image) in MODELS.items():
            path = Path(tmp) / f"{arch}.onnx"
            _export(arch, in_ch, image, path)
            t_lower, (lowered, proto) = _best(lambda path=path: lower_model(path))
            t_place, program = _best(lambda lowered=lowered, proto=proto: place(lowered, proto, TARGET))
            weights = sum(w.size for w in lowered.weights.values())
            tiles = sum(len(layer.tiles) for layer in program.layers)
            code = len(program.code_bytes())
            print(f"{name:<10} {f'{in_ch}x{image}x{image}':>9} {weights:>11,} {len(program.layers):>6} {tiles:>6} "
                  f"{program.arrays_used:>6} {code:>9,} {len(program.cells):>11,} {len(program.to_bytes()):>11,} "
                  f"{t_lower * 1e3:>9.1f} {t_place * 1e3:>9.1f}")


if __name__ == "__main__":
    main()
