"""The test model zoo: every model the tests compile, and the helpers that export them.

VGG-8 and ResNet-18 are the product's own (``nvcim.tools.models``): to a correctness test
a model is only an input, the reference is onnxruntime on the exported file. The other
models are the tests' own because each exports a pattern the front end must handle:
LeNet-3 flattens with ``x.view(x.size(0), -1)`` (Shape/Gather/Concat/Reshape arithmetic,
where the product's ``torch.flatten`` exports one Flatten), the TSB shares one weight
between two insertion points, and ``batchnorm_graph`` writes BatchNormalization nodes
by hand, after a Conv with and without bias and after a Gemm, as exporters other than
torch leave them.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn
from torch.nn import functional as F

from nvcim.tools import models


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


def export_mlp(path: Path, in_features: int = 64, hidden: int = 300, out: int = 10, seed: int = 0) -> Path:
    """Linear -> ReLU -> Linear, seeded, exported by TorchScript."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, out)).eval()
    export(model, path, (in_features,), dynamo=False)
    return path


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


def vgg8() -> nn.Module:
    """The product's VGG-8 with BatchNorm, every width / 8 (conv 16..64, FC 128)."""
    return models.build("vgg8", in_ch=3, classes=10, width=1 / 8)


def resnet18() -> nn.Module:
    """The product's ResNet-18 with BatchNorm, stage widths 8, 16, 32, 64 (64..512 / 8)."""
    return models.build("resnet18", in_ch=3, classes=10, width=1 / 8)


MODELS = {  # name -> (builder, input shape, chip arrays)
    "lenet3": (LeNet3, (1, 28, 28), 4),
    "vgg8": (vgg8, (3, 32, 32), 48),
    "resnet18": (resnet18, (3, 32, 32), 64),
}


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


class SmallCNN(nn.Module):
    """Plain and grouped convolutions plus a fully connected layer spanning several tiles."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, groups=2)
        self.fc = nn.Linear(8 * 3 * 3, 70)

    def forward(self, x):
        return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).flatten(1))


def cnn_images(n: int, seed: int) -> np.ndarray:
    """n random inputs for SmallCNN (the ``cnn_path`` fixture)."""
    return np.random.default_rng(seed).standard_normal((n, 3, 8, 8)).astype(np.float32)


class TSB(nn.Module):
    """One c x c block applied to every channel group (channels zero-padded to a multiple of c)."""

    def __init__(self, c: int, batch_as_zero: bool):
        super().__init__()
        self.c, self.batch_as_zero = c, batch_as_zero
        self.weight = nn.Parameter(torch.eye(c) + 0.1 * torch.randn(c, c))

    def forward(self, x):
        n, channels, h, w = x.shape
        groups = (channels + self.c - 1) // self.c  # not -(-a // b): TorchScript traces // as a truncating Div
        x = F.pad(x, (0, 0, 0, 0, 0, groups * self.c - channels))
        lead = n if self.batch_as_zero else -1  # x.shape[0] exports as Shape->Gather, folded to 0
        y = torch.matmul(x.reshape(lead, groups, self.c, h, w).permute(0, 1, 3, 4, 2), self.weight)
        return y.permute(0, 1, 4, 2, 3).reshape(lead, groups * self.c, h, w)[:, :channels]


class Backbone(nn.Module):
    """conv 6 -> [TSB] -> relu -> pool -> conv 10 -> [TSB] -> relu -> pool -> FC, on 1x12x12."""

    def __init__(self, tsb: TSB | None = None):
        super().__init__()
        torch.manual_seed(3)
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 10, 3, padding=1)
        self.fc = nn.Linear(10 * 3 * 3, 10)
        self.tsb = tsb

    def forward(self, x):
        t = self.tsb or (lambda v: v)
        x = F.max_pool2d(F.relu(t(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(t(self.conv2(x))), 2)
        return self.fc(torch.flatten(x, 1))


def batchnorm_graph(seed: int = 0) -> onnx.ModelProto:
    """Conv(bias) -> BN -> Relu -> Conv(no bias, stride 2) -> BN -> Relu -> Flatten -> Gemm(transB)
    -> BN, on x (n, 3, 8, 8) -> y (n, 10): explicit BatchNormalization nodes with seeded
    statistics far from identity, written as onnx.helper nodes."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value, dtype=np.float32), name))
        return name

    def batchnorm(x: str, channels: int, out: str) -> None:
        params = [const(f"{out}.gamma", rng.uniform(0.5, 1.5, channels)),
                  const(f"{out}.beta", rng.uniform(-0.2, 0.2, channels)),
                  const(f"{out}.mean", rng.uniform(-0.5, 0.5, channels)),
                  const(f"{out}.var", rng.uniform(0.5, 2.0, channels))]
        nodes.append(helper.make_node("BatchNormalization", [x, *params], [out], epsilon=1e-5))

    w1 = const("conv1.weight", rng.normal(0, 0.3, (6, 3, 3, 3)))
    b1 = const("conv1.bias", rng.normal(0, 0.1, 6))
    nodes.append(helper.make_node("Conv", ["x", w1, b1], ["c1"], pads=[1, 1, 1, 1]))
    batchnorm("c1", 6, "bn1")
    nodes.append(helper.make_node("Relu", ["bn1"], ["r1"]))
    w2 = const("conv2.weight", rng.normal(0, 0.2, (8, 6, 3, 3)))
    nodes.append(helper.make_node("Conv", ["r1", w2], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]))
    batchnorm("c2", 8, "bn2")
    nodes.append(helper.make_node("Relu", ["bn2"], ["r2"]))
    nodes.append(helper.make_node("Flatten", ["r2"], ["f"], axis=1))
    w3 = const("fc.weight", rng.normal(0, 0.1, (10, 8 * 4 * 4)))
    b3 = const("fc.bias", rng.normal(0, 0.1, 10))
    nodes.append(helper.make_node("Gemm", ["f", w3, b3], ["g"], transB=1))
    batchnorm("g", 10, "y")
    graph = helper.make_graph(nodes, "batchnorm",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model
