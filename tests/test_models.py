"""LeNet-3, VGG-8 and ResNet-18, exported by both torch exporters, on an ideal chip (sigma = 0).

The chip must reproduce onnxruntime on ``quantized_model`` (the same graph with the same
8-bit weights). Both sides then hold bit-identical float32 weights, so what remains is the
order of float32 sums (torch's kernels here, MLAS there): measured 2-3e-7 of the largest
output for all six model/exporter pairs. The tolerance is 1e-5 of the largest output, 40x
that, and 100x below the effect of 8-bit quantisation (1.5-2.7e-3 against the float
model), which the test also checks is visible, so a wrong weight could not hide in it.
Channel counts are scaled down (stated per model) so the suite stays fast.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from nvcim import driver
from nvcim.compiler import compile_model, lower_model, quantized_model, reference

TOLERANCE = 1e-5  # of the largest |output|; see the module docstring


class LeNet3(nn.Module):
    """The seeds' LeNet-3 at full size: conv 5, conv 10 (3x3), one FC, on 1x28x28."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 5, 3, padding=1)
        self.conv2 = nn.Conv2d(5, 10, 3, padding=1)
        self.fc = nn.Linear(10 * 7 * 7, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(x.view(x.size(0), -1))  # exports as Shape/Gather/Concat/Reshape


class VGG8(nn.Module):
    """VGG-8 (conv 128,128,256,256,512,512, FC, FC) with every width divided by ``div``."""

    def __init__(self, div: int = 8):
        super().__init__()
        plan, layers, cin = (128, 128, "M", 256, 256, "M", 512, 512, "M"), [], 3
        for v in plan:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(cin, v // div, 3, padding=1), nn.BatchNorm2d(v // div), nn.ReLU()]
                cin = v // div
        self.features = nn.Sequential(*layers)
        self.fc1 = nn.Linear(cin * 16, 1024 // div)
        self.fc2 = nn.Linear(1024 // div, 10)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(torch.flatten(self.features(x), 1))))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + (x if self.down is None else self.down(x)))


class ResNet18(nn.Module):
    """torchvision's ResNet-18 layout (stem, 4 stages of 2 basic blocks, avg-pool, FC) with the
    CIFAR stem (3x3 conv, no max-pool) and stage widths width, 2, 4, 8 x width (64 is standard)."""

    def __init__(self, width: int = 64, classes: int = 10):
        super().__init__()
        widths = [width, 2 * width, 4 * width, 8 * width]
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        blocks, cin = [], width
        for i, c in enumerate(widths):
            blocks += [BasicBlock(cin, c, 1 if i == 0 else 2), BasicBlock(c, c, 1)]
            cin = c
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1), 1))


def randomised(build, seed: int = 0) -> nn.Module:
    """A model with seeded random weights and BatchNorm statistics (so folding BN is not an
    identity), in eval mode."""
    torch.manual_seed(seed)
    model = build()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def export(model: nn.Module, path, shape: tuple[int, ...], dynamo: bool, **kwargs) -> str:
    """torch.onnx.export with a symbolic batch, as a user would call it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            extra = ({"dynamic_shapes": {"x": {0: torch.export.Dim("n")}}} if dynamo
                     else {"dynamic_axes": {"x": {0: "n"}, "y": {0: "n"}}})
            torch.onnx.export(model, (torch.zeros(2, *shape),), str(path), dynamo=dynamo, input_names=["x"],
                              output_names=["y"], verbose=False, **extra, **kwargs)
        finally:
            logging.disable(logging.NOTSET)
    return str(path)


MODELS = {  # name -> (builder, input shape, chip arrays)
    "lenet3": (lambda: LeNet3(), (1, 28, 28), 4),
    "vgg8": (lambda: VGG8(div=8), (3, 32, 32), 48),
    "resnet18": (lambda: ResNet18(width=8), (3, 32, 32), 64),
}


@pytest.fixture(scope="module", params=[(m, e) for m in MODELS for e in ("torchscript", "dynamo")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def exported(request, tmp_path_factory):
    name, exporter = request.param
    build, shape, arrays = MODELS[name]
    model = randomised(build)
    path = export(model, tmp_path_factory.mktemp(name) / f"{name}_{exporter}.onnx", shape, exporter == "dynamo")
    return name, path, model, shape, arrays


def _max_rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_model_on_ideal_chip_matches_onnxruntime_on_quantised_model(exported):
    name, path, model, shape, arrays = exported
    x = np.random.default_rng(1).standard_normal((5, *shape)).astype(np.float32)
    with driver.load(path, device=f"emu://?sigma=0&arrays={arrays}") as sess:
        y, = sess.run(None, {"x": x})
    ref, = ort.InferenceSession(quantized_model(path).SerializeToString()).run(None, {"x": x})
    float_ref, = ort.InferenceSession(path).run(None, {"x": x})
    assert y.shape == ref.shape == (5, 10)
    np.testing.assert_allclose(y, ref, rtol=0, atol=TOLERANCE * np.abs(ref).max())
    # the comparison can see 8-bit quantisation, so it could see a wrong weight
    assert _max_rel(y, float_ref) > 10 * TOLERANCE
    with torch.no_grad():  # and the exported file is the torch model
        np.testing.assert_allclose(float_ref, model(torch.from_numpy(x)).numpy(), rtol=0,
                                   atol=1e-4 * np.abs(float_ref).max())


def test_model_per_channel_quantisation(exported):
    """Per-output-channel scales: the ideal chip matches onnxruntime on that quantisation,
    and every weight is within half a step of its own channel's (finer) scale."""
    name, path, model, shape, arrays = exported
    x = np.random.default_rng(2).standard_normal((4, *shape)).astype(np.float32)
    program = compile_model(path, per_channel=True)
    y, = reference.run(program, [x])
    ref, = ort.InferenceSession(quantized_model(path, per_channel=True).SerializeToString()).run(None, {"x": x})
    np.testing.assert_allclose(y, ref, rtol=0, atol=TOLERANCE * np.abs(ref).max())
    lowered, _ = lower_model(path)
    for i, layer in enumerate(program.layers):
        w = lowered.weights[layer.name]
        step = np.asarray(layer.scale, dtype=np.float64)
        assert step.shape == (layer.out_features,)
        np.testing.assert_allclose(step, np.abs(w).max(axis=0) / 255, rtol=1e-6)
        # half a step, plus the float32 rounding of the weight the chip holds
        bound = step / 2 + np.abs(w).max(axis=0) * 2.0 ** -23
        assert (np.abs(reference.ideal_weights(program, i) - w) <= bound).all()


class ConvBN(nn.Module):
    """conv -> BN -> relu -> pool -> view(x.size(0), -1) -> FC."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * 3 * 3, 4, bias=False)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn(self.conv(x))), 2)
        return self.fc(x.view(x.size(0), -1))


def test_unoptimised_dynamo_export_is_folded_by_the_front_end(tmp_path):
    """dynamo with optimize=False leaves BatchNormalization and Shape -> Squeeze -> Reshape ->
    Concat arithmetic in the graph; the front end folds both, keeping the weight names."""
    import onnx

    path = export(randomised(ConvBN), tmp_path / "raw.onnx", (3, 8, 8), dynamo=True, optimize=False)
    raw_ops = {n.op_type for n in onnx.load(path).graph.node}
    assert {"BatchNormalization", "Shape"} <= raw_ops
    program = compile_model(path)
    assert [layer.name for layer in program.layers] == ["conv.weight", "fc.weight"]
    assert {i.op.name for i in program.instructions} == {"CONV", "ADD", "RELU", "MAXPOOL", "RESHAPE", "MATMUL"}
    x = np.random.default_rng(3).standard_normal((4, 3, 8, 8)).astype(np.float32)
    y, = reference.run(program, [x])
    ref, = ort.InferenceSession(quantized_model(path).SerializeToString()).run(None, {"x": x})
    np.testing.assert_allclose(y, ref, rtol=0, atol=TOLERANCE * np.abs(ref).max())
