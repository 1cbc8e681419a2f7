"""The chip's weight-noise model in torch (docs/device-model.md), for training and Monte Carlo.

Per weight tensor W (M = 8-bit weights, K = 2-bit cells, S = M/K slices, g_max = 2^K - 1):

    level = round(|w| / max|W| * (2^M - 1)),  w_q = sign(w) * max|W| / (2^M - 1) * level
    w_p   = w_q + sign(w) * max|W| / (2^M - 1) * sum_j dg_j * 2^(jK),  dg_j ~ N(0, (sigma_j * g_max)^2)

exactly as the emulated chip programs it: only weights with level > 0 are pulsed (all S
cells of such a weight, zero-state slices included), on their own sign's array; the other
side and level-0 weights stay erased and carry no noise. sigma_j is the device model's
sigma, read from the same settings type the chip uses (firmware_emu.contract.device.DeviceSettings):
constant for GAUSSIAN and RRAM1; for FEFET2 / RRAM4 / FEFET6 set by the weight's magnitude
(the default) or by each cell's state (``variation``). When all S cells of a weight share one
sigma (a constant, or the per-weight rule) the S slice Gaussians sum to one Gaussian of std
g_max * sigma * sqrt(sum_j 4^(jK)), which is sampled directly (the same distribution with S
times fewer draws). Quantisation is the compiler's own.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from nvcim.compiler.quantize import quantize as quantize_levels
from nvcim.firmware_emu.contract.device import DeviceSettings
from nvcim.firmware_emu.contract.registers import DEFAULT_BUILD
from nvcim.firmware_emu.contract.variation import VariationMode

WEIGHT_BITS = DEFAULT_BUILD["weight_bits"]


def weight_std_factor(device: DeviceSettings, weight_bits: int = WEIGHT_BITS) -> float:
    """Per-weight noise std / max|W| for a uniform device (0.78 * sigma for M = 8, K = 2)."""
    return device.g_max * device.sigma * math.sqrt(_place_sum(device, weight_bits)) / ((1 << weight_bits) - 1)


def _place_sum(device: DeviceSettings, weight_bits: int) -> float:
    """sum_j 4^(jK): the variance of one weight's slice errors, in units of (sigma g_max)^2, for a uniform device."""
    return sum(4.0 ** (j * device.cell_bits) for j in range(weight_bits // device.cell_bits))


def quantize(w: torch.Tensor, weight_bits: int = WEIGHT_BITS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                      torch.Tensor]:
    """The compiler's per-tensor quantisation of ``w`` as tensors: (w_q, level, sign, scale)."""
    q = quantize_levels(w.detach().cpu().numpy(), weight_bits)
    return tuple(torch.as_tensor(np.asarray(a, dtype=np.float32), device=w.device).to(w.dtype)
                 for a in (q.dequantize(), q.levels, q.signs, q.scale))


def state_sigma(states: torch.Tensor, device: DeviceSettings) -> torch.Tensor:
    """Relative std per cell state (integer-valued): the device's per-state table, looked up."""
    table = torch.tensor(device.state_sigmas(), dtype=torch.float32, device=states.device)
    return table[states.to(torch.int64)]


def weight_noise(w: torch.Tensor, device: DeviceSettings, generator: torch.Generator | None = None,
                 draws: int | None = None, weight_bits: int = WEIGHT_BITS) -> torch.Tensor:
    """Programming noise w_p - w_q of ``w`` on a chip; ``draws`` adds a leading axis of chips."""
    with torch.no_grad():
        _, level, sign, scale = quantize(w, weight_bits)
        shape = tuple(w.shape) if draws is None else (draws, *w.shape)
        if device.sigma == 0:
            return torch.zeros(shape, dtype=w.dtype, device=w.device)
        if device.uniform:
            z = torch.randn(shape, generator=generator, dtype=w.dtype, device=w.device)
            sumg = z * (device.g_max * device.sigma * math.sqrt(_place_sum(device, weight_bits)))
        elif device.variation == VariationMode.WEIGHT_MAGNITUDE:
            # all S cells of a weight share its band's std: one Gaussian per weight, as for a uniform device
            rel = torch.as_tensor(device.weight_sigma(level.to(torch.int64).cpu().numpy()), device=w.device)
            z = torch.randn(shape, generator=generator, dtype=w.dtype, device=w.device)
            sumg = z * rel.to(w.dtype) * (device.g_max * math.sqrt(_place_sum(device, weight_bits)))
        else:
            slices = weight_bits // device.cell_bits
            shifts = device.cell_bits * torch.arange(slices, device=w.device)
            states = (level.to(torch.int64)[..., None] >> shifts) & ((1 << device.cell_bits) - 1)
            rel = state_sigma(states, device)
            place = (2.0 ** shifts).to(w.dtype)
            z = torch.randn((*shape, slices), generator=generator, dtype=w.dtype, device=w.device)
            sumg = (z * rel * device.g_max * place).sum(-1)
        return sign * scale * sumg


def noisy_weight(w: torch.Tensor, device: DeviceSettings, generator: torch.Generator | None = None,
                 weight_bits: int = WEIGHT_BITS) -> torch.Tensor:
    """w_q + noise in the forward pass, gradient straight through to ``w`` (noise-injection training)."""
    w_q, *_ = quantize(w, weight_bits)
    return w + (w_q + weight_noise(w, device, generator, weight_bits=weight_bits) - w).detach()
