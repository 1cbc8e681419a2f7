"""The end-to-end demo: train a small MLP on the digits, compile it, flash a chip, compare.

Every layer of nvcim is exercised with real parts: torch trains, torch.onnx exports,
the compiler lowers the ONNX file, the driver programs an emulated chip over the link,
and the chip's answers are printed next to onnxruntime's.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from nvcim import driver
from nvcim.compiler import quantized_model

from .datasets import digits


def train_mlp(x: np.ndarray, y: np.ndarray, seed: int = 0, epochs: int = 60) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(x[0].size, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(xt), generator=gen).split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    return model.eval()


def export(model: torch.nn.Module, example: np.ndarray, path: Path) -> None:
    with warnings.catch_warnings():  # the TorchScript exporter announces its own deprecation
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (torch.from_numpy(example),), str(path), dynamo=False,
                          input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})


def run_demo(workdir: Path, sigma: float = 0.3, seed: int = 1, echo=print) -> dict[str, float]:
    workdir.mkdir(parents=True, exist_ok=True)
    data = digits()
    t0 = time.perf_counter()
    model = train_mlp(data.x_train, data.y_train)
    onnx_path = workdir / "digits_mlp.onnx"
    export(model, data.x_test[:1], onnx_path)
    echo(f"trained a 64-64-10 MLP on {len(data.x_train)} digits in {time.perf_counter() - t0:.1f} s "
         f"-> {onnx_path}")

    x, y = data.x_test, data.y_test
    rows = []
    ref = ort.InferenceSession(str(onnx_path)).run(None, {"image": x})[0]
    rows.append(("onnxruntime, float weights", ref))
    q = ort.InferenceSession(quantized_model(onnx_path).SerializeToString()).run(None, {"image": x})[0]
    rows.append(("onnxruntime, 8-bit weights", q))
    for label, url in (("chip, sigma=0 (ideal cells)", "emu://?sigma=0"),
                       (f"chip, sigma={sigma} seed={seed} (open loop)", f"emu://?sigma={sigma}&seed={seed}")):
        with driver.load(onnx_path, device=url) as sess:
            out = sess.run(None, {"image": x})[0]
            rows.append((label, out))
            stats = sess.write_stats
    echo(f"chip programmed: {stats.cells} cells, {stats.write_pulses} write pulses "
         f"({len(sess.program.layers)} crossbar layers)")
    echo("")
    echo(f"{'runtime':<44} {'accuracy':>9} {'max |logit - onnxruntime 8-bit|':>32}")
    result = {}
    for label, out in rows:
        acc = float((out.argmax(1) == y).mean())
        result[label] = acc
        echo(f"{label:<44} {acc:>9.2%} {np.abs(out - q).max():>32.3g}")
    echo("")
    echo(f"first test image, label {y[0]}:")
    for label, out in rows:
        echo(f"  {label:<42} " + " ".join(f"{v:6.2f}" for v in out[0]))
    return result
