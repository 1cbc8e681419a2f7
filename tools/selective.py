"""Selective write-verify (docs/methods.md#u-swim-selective-write-verify): which weights to verify.

U-SWIM scores every weight by a second-derivative sensitivity from one forward and one
backward pass over the training data,

    score(w) = |d2L/dw2| * max|W| * alpha + |w|,      alpha = 1e6,

and verifies the weights above one quantile of the scores taken over all layers together.
The Hessian diagonal d2L/dw2 is estimated by the empirical Fisher information: the mean
over training samples of the squared per-sample gradient (the Gauss-Newton approximation
of the cross-entropy Hessian, which is what one backward pass can give; torch.func
computes the per-sample gradients of a chunk of samples in one vectorised pass). The
model is evaluated at its quantised weights w_q, the values the chip is asked to hold.

The baselines pick the same number of weights by magnitude (largest |w| over all layers)
or uniformly at random. ``verify_masks`` turns a selection into the driver's
``verify_mask`` (per compiled layer, a bool matrix in_features x out_features) with the
compiler's own mapping, so the chip write-verifies exactly the chosen weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.func import functional_call, grad, vmap

from .chip import FlowError, weight_layout
from .determinism import thread_independent
from .evaluate import quantized_params
from .models import Net

RULES = ("uswim", "magnitude", "random")
ALPHA = 1e6


@thread_independent
def fisher_diagonal(model: Net, x: np.ndarray, y: np.ndarray, chunk: int = 64) -> dict[str, torch.Tensor]:
    """Per crossbar weight, the mean squared per-sample gradient of the loss at w_q (one forward + backward)."""
    model.eval()
    weights = quantized_params(model)
    names = model.weight_names()
    rest = {k: v.detach() for k, v in model.named_parameters() if k not in names}

    def loss(w: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, {**rest, **w}, (xi[None],))
        return torch.nn.functional.cross_entropy(out, yi[None])

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))
    w = {n: weights[n] for n in names}
    total = {n: torch.zeros_like(v) for n, v in w.items()}
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    for i in range(0, len(xt), chunk):
        g = per_sample(w, xt[i:i + chunk], yt[i:i + chunk])
        for n in names:
            total[n] += g[n].square().sum(0)
    return {n: t / len(xt) for n, t in total.items()}


def scores(model: Net, rule: str, x: np.ndarray | None = None, y: np.ndarray | None = None,
           seed: int = 0, alpha: float = ALPHA) -> dict[str, torch.Tensor]:
    """Per crossbar weight, the selection score of ``rule``: higher = verified first."""
    names = model.weight_names()
    params = dict(model.named_parameters())
    if rule == "uswim":
        if x is None or y is None:
            raise FlowError("the U-SWIM score needs training data for its forward and backward pass")
        fisher = fisher_diagonal(model, x, y)
        return {n: fisher[n] * params[n].detach().abs().max() * alpha + params[n].detach().abs() for n in names}
    if rule == "magnitude":
        return {n: params[n].detach().abs() for n in names}
    if rule == "random":
        gen = torch.Generator().manual_seed(seed)
        return {n: torch.rand(params[n].shape, generator=gen) for n in names}
    raise FlowError(f"selection rule {rule!r}: choose from {', '.join(RULES)}")


def select(score: dict[str, torch.Tensor], budget: float) -> dict[str, np.ndarray]:
    """The ``budget`` fraction of all weights with the highest scores, one threshold over all layers.

    Exactly round(budget * N) weights are chosen (ties broken by position, layers in order).
    """
    if not 0 <= budget <= 1:
        raise FlowError(f"budget {budget}: the fraction of weights to verify must lie in [0, 1]")
    names = list(score)
    flat = torch.cat([score[n].reshape(-1) for n in names]).double()
    k = round(budget * len(flat))
    chosen = torch.zeros(len(flat), dtype=torch.bool)
    if k:
        order = torch.argsort(flat, descending=True, stable=True)
        chosen[order[:k]] = True
    out, start = {}, 0
    for n in names:
        size = score[n].numel()
        out[n] = chosen[start:start + size].reshape(score[n].shape).numpy()
        start += size
    return out


def verify_masks(onnx_path: str | Path, selected: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The driver's verify_mask: per compiled layer, which (in, out) entries hold a selected weight."""
    masks = {}
    for layer, (src, shape, flat) in weight_layout(onnx_path).items():
        if src not in selected:
            continue
        chosen = np.asarray(selected[src], dtype=bool).reshape(-1)
        if chosen.size != int(np.prod(shape)):
            raise FlowError(f"selection for '{src}' has {chosen.size} entries, the weight has {int(np.prod(shape))}")
        mask = np.zeros(flat.shape, dtype=bool)
        used = flat >= 0
        mask[used] = chosen[flat[used]]
        masks[layer] = mask
    return masks
