"""Negative feedback training (docs/methods.md#nft-negative-feedback-training): OVF and IRS.

Both train the backbone through the chip's noise (tools/train.py's noise injection) with

    L = CE( a_b * O_backbone - a_f * beta * sum_n gamma_n * Out_n , y ),   a_b = a_f = 1 / (N + 1),

where O_backbone is the noisy forward pass and Out_1..Out_N are deliberately worse outputs:

* OVF (oriented variational forward): N = 3 extra forward passes from the same noise-free
  weights with larger variation sigma + n * delta_sigma (delta_sigma = 0.05), gamma_n =
  10^(n - N): the noisiest pass weighs most.
* IRS (intermediate representation snapshot): N snapshot classifiers read the features at
  the ends of blocks (LeNet-3: both convs; VGG-8: the end of its first three stages;
  ResNet-18: the end of its first three stages); gamma_n = 10^(1 - n): the earliest weighs
  most. A head is average pooling to 2 x 2, FC to 64, ReLU, FC to the classes. As in the
  paper's Algorithm 2 the heads train with the backbone on the one combined loss (they read
  the noisy forward pass's features); they exist for training only and are never exported.

The result is an ordinary backbone: deploy it as it is, or put a TSB on it (tools/methods.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from nvcim.firmware_emu.contract.device import DeviceSettings

from .datasets import Split
from .models import Net
from .train import Objective, TrainConfig, TrainResult, injected_weights, train_backbone

VARIANTS = ("ovf", "irs")
SNAPSHOTS = {"lenet3": ["bn1", "bn2"], "vgg8": ["bns.1", "bns.3", "bns.5"],
             "resnet18": ["blocks.1", "blocks.3", "blocks.5"]}


DEFAULT_BETA = 1e-2
BETAS = (1e-1, 1e-2, 1e-3, 1e-4)  # the paper's four-step search: its best beta always lay in this set


def _combine(out: torch.Tensor, feedback: list[torch.Tensor], gammas: list[float], beta: float) -> torch.Tensor:
    a = 1.0 / (len(feedback) + 1)
    return a * out - a * beta * sum(g * f for g, f in zip(gammas, feedback))


@dataclass
class OVF:
    """Oriented variational forward: N extra passes at sigma + n * delta from the clean weights."""

    sigma: float
    device_model: str = "GAUSSIAN"
    n: int = 3
    delta: float = 0.05
    beta: float = DEFAULT_BETA

    def parameters(self) -> list[nn.Parameter]:
        return []

    def loss(self, model: Net, weights: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
             gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        out = functional_call(model, weights, (x,))
        names = model.weight_names()
        feedback = [functional_call(model, injected_weights(model, names, DeviceSettings(
            self.sigma + k * self.delta, self.device_model), gen), (x,)) for k in range(1, self.n + 1)]
        gammas = [10.0 ** (k - self.n) for k in range(1, self.n + 1)]
        return torch.nn.functional.cross_entropy(_combine(out, feedback, gammas, self.beta), y), out


class IRS:
    """Intermediate representation snapshots: small classifiers on block-end features as the feedback."""

    def __init__(self, model: Net, beta: float = DEFAULT_BETA, hidden: int = 64):
        self.beta = beta
        points = SNAPSHOTS[model.config["arch"]]
        mods = dict(model.named_modules())
        self._features: list[torch.Tensor] = []
        shapes = []
        hooks = [mods[p].register_forward_hook(lambda m, i, o: shapes.append(o.shape[1])) for p in points]
        was = model.training
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, model.config["in_ch"], model.config["image"], model.config["image"]))
        model.train(was)
        for h in hooks:
            h.remove()
        for p in points:
            mods[p].register_forward_hook(self._capture)
        self.heads = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(c * 4, hidden), nn.ReLU(),
                          nn.Linear(hidden, model.config["classes"])) for c in shapes)
        self._active = False

    def _capture(self, module: nn.Module, inputs, output: torch.Tensor) -> None:
        if self._active:
            self._features.append(output)

    def parameters(self) -> list[nn.Parameter]:
        return list(self.heads.parameters())

    def loss(self, model: Net, weights: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
             gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        self._features.clear()
        self._active = True
        try:
            out = functional_call(model, weights, (x,))
        finally:
            self._active = False
        feats, self._features = self._features, []
        feedback = [h(f) for h, f in zip(self.heads, feats)]
        gammas = [10.0 ** (1 - k) for k in range(1, len(feedback) + 1)]
        return torch.nn.functional.cross_entropy(_combine(out, feedback, gammas, self.beta), y), out


def objective(variant: str, cfg: TrainConfig, beta: float = DEFAULT_BETA) -> Callable[[Net], Objective]:
    """The NFT objective ``variant`` ("ovf" or "irs") for training with ``cfg`` (its training sigma and device)."""
    if variant == "ovf":
        return lambda model: OVF(cfg.sigma_train, cfg.device_model, beta=beta)
    if variant == "irs":
        return lambda model: IRS(model, beta=beta)
    raise ValueError(f"NFT variant {variant!r}: choose from {', '.join(VARIANTS)}")


def train_nft(data: Split, cfg: TrainConfig, variant: str, beta: float = DEFAULT_BETA, **kwargs) -> TrainResult:
    """Train a backbone with NFT ``variant`` (the rest as tools.train.train_backbone)."""
    return train_backbone(data, cfg, objective=objective(variant, cfg, beta), **kwargs)
