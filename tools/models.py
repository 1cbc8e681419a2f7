"""The seeds' models in torch, with Tiny Shared Block (TSB) insertion points.

* LeNet-3: conv 5 ch, conv 10 ch (3x3, each followed by 2x2 max-pool), one FC. On 28x28
  inputs it has 45 + 450 + 4,900 = 5,395 weights (docs/methods.md).
* VGG-8: conv 128, 128, pool, 256, 256, pool, 512, 512, pool, FC 1024, FC classes.
* ResNet-18: the standard four stages of two basic blocks (64, 128, 256, 512), with the
  small-image stem (3x3 conv, no max-pool) used for CIFAR-sized inputs.

``width`` scales every channel count (VGG-8's FC width too) so the models fit this
machine. A TSB is inserted after each conv (after each basic block in ResNet-18) and
before the activation. The chip holds BatchNorm folded into the conv (the exporters and
the compiler fold it), so the deploy form of a model with BN is [Conv+BN]-TSB-ReLU.

The TSB is exported as the pattern the compiler places on one common crossbar:
Pad channels to G*c -> Reshape (N, G, c, H, W) -> Transpose (N, G, H, W, c) -> MatMul by
the one shared (c, c) weight -> Transpose back -> Reshape (N, G*c, H, W) -> Slice to C.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from nvcim.compiler import batchnorm

ARCHS = ("lenet3", "vgg8", "resnet18")
DEFAULT_IMAGE = {"lenet3": 28, "vgg8": 32, "resnet18": 32}
DEFAULT_TSB = {"lenet3": 5, "vgg8": 128, "resnet18": 128}  # seeds' c, before width scaling


class TinySharedBlock(nn.Module):
    """One identity-initialised c x c block applied to every channel group of every insertion point."""

    def __init__(self, c: int):
        super().__init__()
        if c < 1:
            raise ValueError(f"TSB width c={c} must be >= 1")
        self.c = c
        self.weight = nn.Parameter(torch.eye(c))

    def forward(self, x: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
        """``shape``: the static (C, H, W) of ``x`` at this insertion point."""
        channels, h, w = shape
        c = self.c
        groups = -(-channels // c)
        pad = groups * c - channels
        if pad:
            x = F.pad(x, (0, 0, 0, 0, 0, pad))
        y = x.reshape(-1, groups, c, h, w).permute(0, 1, 3, 4, 2)
        y = torch.matmul(y, self.weight)
        y = y.permute(0, 1, 4, 2, 3).reshape(-1, groups * c, h, w)
        if pad:
            y = y[:, :channels]
        return y


class Net(nn.Module):
    """Common parts: TSB slots with static shapes, config for rebuilding, BN folding."""

    arch = ""

    def __init__(self, config: dict):
        super().__init__()
        self.config = dict(config)
        self.tsb: TinySharedBlock | None = None
        self.tsb_shapes: list[tuple[int, int, int]] = []
        self.tsb_points: frozenset[int] | None = None  # insertion points the block is applied at (None: all)
        self._recording = False

    def _finish(self) -> None:
        """Record the static shape at every insertion point with one dry run."""
        self._recording = True
        was = self.training
        self.eval()
        with torch.no_grad():
            self(torch.zeros(1, self.config["in_ch"], self.config["image"], self.config["image"]))
        self.train(was)
        self._recording = False

    def _t(self, x: torch.Tensor, i: int) -> torch.Tensor:
        if self._recording:
            self.tsb_shapes.append(tuple(int(d) for d in x.shape[1:]))
            return x
        if self.tsb is None or (self.tsb_points is not None and i not in self.tsb_points):
            return x
        return self.tsb(x, self.tsb_shapes[i])

    def add_tsb(self, c: int, points: list[int] | None = None) -> Net:
        """Insert one identity-initialised shared block of width ``c`` at ``points`` (indices into
        ``tsb_shapes``; None: every insertion point); returns self."""
        if points is not None:
            bad = sorted(set(points) - set(range(len(self.tsb_shapes))))
            if bad or not points:
                raise ValueError(f"TSB insertion points {list(points)}: {self.arch} has points "
                                 f"0..{len(self.tsb_shapes) - 1}" + (f"; {bad} do not exist" if bad else
                                                                     "; choose at least one"))
            self.tsb_points = frozenset(points)
            self.config["tsb_points"] = sorted(self.tsb_points)
        self.tsb = TinySharedBlock(c)
        self.config["tsb"] = c
        return self

    def weight_names(self) -> list[str]:
        """Backbone weights the chip holds on crossbars (conv and linear weights), TSB excluded."""
        return [f"{n}.weight" for n, m in self.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]

    def conv_bn_pairs(self) -> list[tuple[str, str]]:
        return []

    def folded(self) -> Net:
        """The deploy form: a copy with every BatchNorm folded into its conv (eval statistics)."""
        cfg = dict(self.config, bn=False)
        tsb, points = cfg.pop("tsb", None), cfg.pop("tsb_points", None)
        out = build(**cfg)
        if tsb:
            out.add_tsb(tsb, points)
        mods = dict(self.named_modules())
        state = {k: v.detach().clone() for k, v in self.state_dict().items() if k in out.state_dict()}
        for conv_name, bn_name in self.conv_bn_pairs():
            bn = mods[bn_name]
            if not isinstance(bn, nn.BatchNorm2d):
                continue
            conv = mods[conv_name]
            b = conv.bias.detach() if conv.bias is not None else torch.zeros_like(bn.running_mean)
            state[f"{conv_name}.weight"], state[f"{conv_name}.bias"] = batchnorm.fold(
                conv.weight.detach(), b, bn.weight.detach(), bn.bias.detach(), bn.running_mean, bn.running_var, bn.eps)
        out.load_state_dict(state)
        return out.eval()


def _bn(bn: bool, c: int) -> nn.Module:
    return nn.BatchNorm2d(c) if bn else nn.Identity()


class LeNet3(Net):
    arch = "lenet3"

    def __init__(self, in_ch: int = 1, classes: int = 10, image: int = 28, width: float = 1.0, bn: bool = False):
        super().__init__(dict(arch=self.arch, in_ch=in_ch, classes=classes, image=image, width=width, bn=bn))
        c1, c2 = max(1, round(5 * width)), max(1, round(10 * width))
        self.conv1, self.bn1 = nn.Conv2d(in_ch, c1, 3, padding=1, bias=not bn), _bn(bn, c1)
        self.conv2, self.bn2 = nn.Conv2d(c1, c2, 3, padding=1, bias=not bn), _bn(bn, c2)
        self.fc = nn.Linear(c2 * (image // 4) ** 2, classes)
        self._finish()

    def conv_bn_pairs(self) -> list[tuple[str, str]]:
        return [("conv1", "bn1"), ("conv2", "bn2")]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self._t(self.bn1(self.conv1(x)), 0)), 2)
        x = F.max_pool2d(F.relu(self._t(self.bn2(self.conv2(x)), 1)), 2)
        return self.fc(torch.flatten(x, 1))


class VGG8(Net):
    arch = "vgg8"
    PLAN = (128, 128, "M", 256, 256, "M", 512, 512, "M")

    def __init__(self, in_ch: int = 3, classes: int = 10, image: int = 32, width: float = 1.0, bn: bool = True):
        super().__init__(dict(arch=self.arch, in_ch=in_ch, classes=classes, image=image, width=width, bn=bn))
        self.convs, self.bns = nn.ModuleList(), nn.ModuleList()
        c, size, self.pool_after = in_ch, image, []
        for item in self.PLAN:
            if item == "M":
                self.pool_after.append(len(self.convs) - 1)
                size //= 2
                continue
            out = max(1, round(item * width))
            self.convs.append(nn.Conv2d(c, out, 3, padding=1, bias=not bn))
            self.bns.append(_bn(bn, out))
            c = out
        hidden = max(1, round(1024 * width))
        self.fc1 = nn.Linear(c * size * size, hidden)
        self.fc2 = nn.Linear(hidden, classes)
        self._finish()

    def conv_bn_pairs(self) -> list[tuple[str, str]]:
        return [(f"convs.{i}", f"bns.{i}") for i in range(len(self.convs))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            x = F.relu(self._t(bn(conv(x)), i))
            if i in self.pool_after:
                x = F.max_pool2d(x, 2)
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, bn: bool):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=not bn), _bn(bn, cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=not bn), _bn(bn, cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Conv2d(cin, cout, 1, stride, bias=not bn)
            self.down_bn = _bn(bn, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return y + (x if self.down is None else self.down_bn(self.down(x)))


class ResNet18(Net):
    arch = "resnet18"

    def __init__(self, in_ch: int = 3, classes: int = 10, image: int = 32, width: float = 1.0, bn: bool = True):
        super().__init__(dict(arch=self.arch, in_ch=in_ch, classes=classes, image=image, width=width, bn=bn))
        widths = [max(1, round(w * width)) for w in (64, 128, 256, 512)]
        self.stem, self.stem_bn = nn.Conv2d(in_ch, widths[0], 3, 1, 1, bias=not bn), _bn(bn, widths[0])
        blocks, c = [], widths[0]
        for stage, w in enumerate(widths):
            for k in range(2):
                blocks.append(BasicBlock(c, w, 2 if (stage > 0 and k == 0) else 1, bn))
                c = w
        self.blocks = nn.ModuleList(blocks)
        self.fc = nn.Linear(c, classes)
        self._finish()

    def conv_bn_pairs(self) -> list[tuple[str, str]]:
        pairs = [("stem", "stem_bn")]
        for i, b in enumerate(self.blocks):
            pairs += [(f"blocks.{i}.conv1", f"blocks.{i}.bn1"), (f"blocks.{i}.conv2", f"blocks.{i}.bn2")]
            if b.down is not None:
                pairs.append((f"blocks.{i}.down", f"blocks.{i}.down_bn"))
        return pairs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem_bn(self.stem(x)))
        for i, block in enumerate(self.blocks):
            x = F.relu(self._t(block(x), i))
        x = F.adaptive_avg_pool2d(x, 1)
        return self.fc(torch.flatten(x, 1))


_CLASSES = {"lenet3": LeNet3, "vgg8": VGG8, "resnet18": ResNet18}


def build(arch: str, in_ch: int, classes: int, image: int | None = None, width: float = 1.0,
          bn: bool | None = None, tsb: int | None = None, tsb_points: list[int] | None = None) -> Net:
    """Build a model by name; ``bn`` defaults to off for LeNet-3, on for VGG-8 and ResNet-18."""
    if arch not in _CLASSES:
        raise ValueError(f"unknown model {arch!r} (choose from {', '.join(ARCHS)})")
    image = DEFAULT_IMAGE[arch] if image is None else image
    if arch in ("lenet3", "vgg8") and image % (4 if arch == "lenet3" else 8):
        raise ValueError(f"{arch} needs an image size divisible by {4 if arch == 'lenet3' else 8}, got {image}")
    kwargs = dict(in_ch=in_ch, classes=classes, image=image, width=width)
    if bn is not None:
        kwargs["bn"] = bn
    net = _CLASSES[arch](**kwargs)
    if tsb:
        net.add_tsb(tsb, tsb_points)
    return net


def default_tsb_width(arch: str, width: float) -> int:
    """The seeds' c (5, 128, 128) scaled like the model's channels."""
    return max(1, round(DEFAULT_TSB[arch] * (1.0 if arch == "lenet3" else width)))


def count_weights(model: Net) -> tuple[int, int]:
    """(backbone crossbar weights, TSB weights)."""
    params = dict(model.named_parameters())
    backbone = sum(params[n].numel() for n in model.weight_names())
    return backbone, (model.tsb.weight.numel() if model.tsb is not None else 0)


def tsb_fraction(model: Net) -> float:
    b, t = count_weights(model)
    return t / (b + t) if b + t else math.nan
