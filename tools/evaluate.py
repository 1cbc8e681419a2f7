"""Accuracy of a model: ideal (quantised weights), on fixed noisy weights, and Monte Carlo over chips.

The Monte Carlo simulation draws N chips from the same noise model the emulated chip
uses (tools.noise) and runs them all at once with ``torch.func.vmap`` over stacked
weights (a batched conv becomes one grouped conv). For a TSB model the backbone noise can
be held fixed (the chip's own captured noise) while only the TSB's verified-device
noise is redrawn per chip, as the seed's evaluation does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.func import functional_call, vmap

from nvcim.firmware_emu.contract.device import DeviceSettings

from .determinism import thread_independent
from .models import Net
from .noise import quantize, weight_noise


@dataclass
class MonteCarlo:
    """Per-chip accuracies of N simulated chips and their summary."""

    accuracies: np.ndarray

    @property
    def mean(self) -> float:
        return float(self.accuracies.mean())

    @property
    def ci95(self) -> tuple[float, float]:
        """95 % confidence interval of the mean (normal approximation)."""
        n = len(self.accuracies)
        half = 1.96 * float(self.accuracies.std(ddof=1)) / np.sqrt(n) if n > 1 else 0.0
        return self.mean - half, self.mean + half

    @property
    def spread95(self) -> tuple[float, float]:
        """2.5 and 97.5 percentiles: the range 95 % of chips fall in."""
        lo, hi = np.percentile(self.accuracies, [2.5, 97.5])
        return float(lo), float(hi)

    def __str__(self) -> str:
        lo, hi = self.ci95
        slo, shi = self.spread95
        return (f"{self.mean:.2%} (95% CI {lo:.2%}..{hi:.2%}; 95% of chips in {slo:.2%}..{shi:.2%}; "
                f"N={len(self.accuracies)})")


def quantized_params(model: Net, weight_bits: int = 8) -> dict[str, torch.Tensor]:
    """Every crossbar weight (backbone and TSB) replaced by its quantised value w_q."""
    params = dict(model.named_parameters())
    names = model.weight_names() + (["tsb.weight"] if model.tsb is not None else [])
    return {n: quantize(params[n].detach(), weight_bits)[0] for n in names}


@thread_independent
def predict(model: Net, x: np.ndarray | torch.Tensor, params: dict[str, torch.Tensor] | None = None,
            batch: int = 512) -> np.ndarray:
    """Logits of ``model`` with some parameters replaced (functional call), in eval mode."""
    model.eval()
    xt = torch.as_tensor(x)
    outs = []
    with torch.no_grad():
        for i in range(0, len(xt), batch):
            outs.append(functional_call(model, params or {}, (xt[i:i + batch],)))
    return torch.cat(outs).numpy()


def accuracy(model: Net, x: np.ndarray, y: np.ndarray, params: dict[str, torch.Tensor] | None = None) -> float:
    return float((predict(model, x, params).argmax(1) == np.asarray(y)).mean())


@thread_independent
def monte_carlo(model: Net, x: np.ndarray, y: np.ndarray, backbone: DeviceSettings | None, draws: int = 200,
                seed: int = 0, fixed: dict[str, torch.Tensor] | None = None, tsb: DeviceSettings | None = None,
                weight_bits: int = 8, budget: int = 24_000_000) -> MonteCarlo:
    """Accuracy of ``draws`` simulated chips.

    ``backbone``: noise of the backbone weights, redrawn per chip (None: ideal backbone).
    ``fixed``: backbone weights held fixed instead (e.g. w_q + the chip's captured noise).
    ``tsb``: noise of the TSB weights (verified devices), redrawn per chip (None: ideal TSB).
    ``budget``: activation floats per vectorised chunk (bounds memory).
    """
    if draws < 1:
        raise ValueError(f"monte_carlo needs at least one chip, got draws={draws}")
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    fixed, drawn = split_weights(model, backbone, fixed, tsb, weight_bits)
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    act = _activation_size(model)
    img_chunk = max(1, min(len(xt), 256))
    chip_chunk = max(1, min(draws, budget // (act * img_chunk)))

    def run(p: dict[str, torch.Tensor], xb: torch.Tensor) -> torch.Tensor:
        return functional_call(model, {**fixed, **p}, (xb,))

    batched = vmap(run, in_dims=(0, None))
    correct = np.zeros(draws, dtype=np.int64)
    with torch.no_grad():
        for c0 in range(0, draws, chip_chunk):
            k = min(chip_chunk, draws - c0)
            p = draw_weights(model, drawn, k, gen, weight_bits)
            for i in range(0, len(xt), img_chunk):
                xb = xt[i:i + img_chunk]
                if p:
                    pred = batched(p, xb).argmax(-1)
                else:
                    pred = run({}, xb).argmax(-1).expand(k, -1)
                correct[c0:c0 + k] += (pred == yt[i:i + img_chunk]).sum(1).numpy()
    return MonteCarlo(correct / len(xt))


def split_weights(model: Net, backbone: DeviceSettings | None, fixed: dict[str, torch.Tensor] | None,
                  tsb: DeviceSettings | None,
                  weight_bits: int = 8) -> tuple[dict[str, torch.Tensor], dict[str, DeviceSettings]]:
    """(weights held fixed, weights redrawn per chip with their noise model) for a Monte Carlo run."""
    base = quantized_params(model, weight_bits)
    fixed = dict(fixed or {})
    drawn: dict[str, DeviceSettings] = {}
    for n in model.weight_names():
        if n in fixed:
            continue
        if backbone is None or backbone.sigma == 0:
            fixed[n] = base[n]
        else:
            drawn[n] = backbone
    if model.tsb is not None:
        if tsb is None or tsb.sigma == 0:
            fixed.setdefault("tsb.weight", base["tsb.weight"])
        else:
            drawn["tsb.weight"] = tsb
    return fixed, drawn


def draw_weights(model: Net, drawn: dict[str, DeviceSettings], draws: int, gen: torch.Generator,
                 weight_bits: int = 8) -> dict[str, torch.Tensor]:
    """``draws`` simulated chips' weights w_q + noise, stacked on a leading axis, in a fixed order."""
    params = dict(model.named_parameters())
    base = quantized_params(model, weight_bits)
    return {n: base[n] + weight_noise(params[n].detach(), device, gen, draws=draws, weight_bits=weight_bits)
            for n, device in drawn.items()}


def _activation_size(model: Net) -> int:
    """Largest activation of one image (floats), from the recorded TSB shapes or a dry run."""
    cfg = model.config
    return max([cfg["in_ch"] * cfg["image"] ** 2] + [c * h * w for c, h, w in model.tsb_shapes]) * 2
