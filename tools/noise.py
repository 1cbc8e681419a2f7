"""The chip's weight-noise model in torch (docs/device-model.md), for training and Monte Carlo.

Per weight tensor W (M = 8-bit weights, K = 2-bit cells, S = M/K slices, g_max = 2^K - 1):

    level = round(|w| / max|W| * (2^M - 1)),  w_q = sign(w) * max|W| / (2^M - 1) * level
    w_p   = w_q + sign(w) * max|W| / (2^M - 1) * sum_j dg_j * 2^(jK),  dg_j ~ N(0, (sigma_j * g_max)^2)

exactly as the emulated chip programs it: only weights with level > 0 are pulsed (all S
cells of such a weight, zero-state slices included), on their own sign's array; the other
side and level-0 weights stay erased and carry no noise. sigma_j is the device model's
per-state sigma (firmware_emu.physics.DeviceModel.state_sigma): constant for GAUSSIAN and
RRAM1, state dependent for FEFET2 / RRAM4 / FEFET6. For the constant case the S slice
Gaussians sum to one Gaussian of std g_max * sigma * sqrt(sum_j 4^(jK)), which is sampled
directly (the same distribution with S times fewer draws).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from nvcim.firmware_emu.physics import PRESETS
from nvcim.firmware_emu.contract.registers import DeviceModelCode


@dataclass(frozen=True)
class NoiseModel:
    """Device variation of one chip (or of verified devices: sigma ~ 0.03)."""

    sigma: float = 0.3
    model: str = "GAUSSIAN"
    weight_bits: int = 8
    cell_bits: int = 2

    def __post_init__(self):
        if self.model.upper() not in DeviceModelCode.__members__:
            raise ValueError(f"device model {self.model!r} is not one of {', '.join(DeviceModelCode.__members__)}")
        if self.sigma < 0:
            raise ValueError(f"sigma={self.sigma} must be >= 0")

    @property
    def code(self) -> DeviceModelCode:
        return DeviceModelCode[self.model.upper()]

    @property
    def g_max(self) -> float:
        return float((1 << self.cell_bits) - 1)

    @property
    def slices(self) -> int:
        return self.weight_bits // self.cell_bits

    @property
    def uniform(self) -> bool:
        """True when every cell state has the same sigma (closed-form sampling applies)."""
        return self.code in (DeviceModelCode.GAUSSIAN, DeviceModelCode.RRAM1)

    def weight_std_factor(self) -> float:
        """Per-weight noise std / max|W| for a uniform model (0.78 * sigma for M = 8, K = 2)."""
        place = sum(4.0 ** (j * self.cell_bits) for j in range(self.slices))
        return self.g_max * self.sigma * math.sqrt(place) / ((1 << self.weight_bits) - 1)


def quantize(w: torch.Tensor, weight_bits: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-tensor quantisation as the compiler does it: (w_q, level, sign, scale)."""
    top = (1 << weight_bits) - 1
    wmax = w.detach().abs().max()
    scale = torch.where(wmax > 0, wmax / top, torch.ones_like(wmax))
    level = torch.round(w.detach().abs() / scale)
    sign = torch.where(level == 0, torch.zeros_like(w), torch.sign(w.detach()))
    return sign * level * scale, level, sign, scale


def _state_sigma(states: torch.Tensor, nm: NoiseModel) -> torch.Tensor:
    """Relative std per cell state, mirroring firmware_emu.physics.DeviceModel.state_sigma."""
    s, state0 = PRESETS[nm.code]
    base = nm.sigma / math.sqrt(0.4 * s * s + 0.6)
    frac = states / nm.g_max
    rel = torch.where((frac > 0.25) & (frac < 0.75), s * base, base)
    if state0 is not None:
        rel = torch.where(states == 0, torch.full_like(rel, state0), rel)
    return rel


def weight_noise(w: torch.Tensor, nm: NoiseModel, generator: torch.Generator | None = None,
                 draws: int | None = None) -> torch.Tensor:
    """Programming noise w_p - w_q of ``w`` on a chip; ``draws`` adds a leading axis of chips."""
    with torch.no_grad():
        _, level, sign, scale = quantize(w, nm.weight_bits)
        shape = tuple(w.shape) if draws is None else (draws, *w.shape)
        if nm.sigma == 0:
            return torch.zeros(shape, dtype=w.dtype, device=w.device)
        if nm.uniform:
            z = torch.randn(shape, generator=generator, dtype=w.dtype, device=w.device)
            sumg = z * (nm.g_max * nm.sigma * math.sqrt(sum(4.0 ** (j * nm.cell_bits) for j in range(nm.slices))))
        else:
            shifts = nm.cell_bits * torch.arange(nm.slices, device=w.device)
            states = ((level.to(torch.int64)[..., None] >> shifts) & ((1 << nm.cell_bits) - 1)).to(w.dtype)
            rel = _state_sigma(states, nm)
            place = (2.0 ** shifts).to(w.dtype)
            z = torch.randn((*shape, nm.slices), generator=generator, dtype=w.dtype, device=w.device)
            sumg = (z * rel * nm.g_max * place).sum(-1)
        return sign * scale * sumg


def noisy_weight(w: torch.Tensor, nm: NoiseModel, generator: torch.Generator | None = None) -> torch.Tensor:
    """w_q + noise in the forward pass, gradient straight through to ``w`` (noise-injection training)."""
    w_q, *_ = quantize(w, nm.weight_bits)
    return w + (w_q + weight_noise(w, nm, generator) - w).detach()


def fake_quantize(w: torch.Tensor, weight_bits: int = 8) -> torch.Tensor:
    """w_q with the gradient passed straight through."""
    w_q, *_ = quantize(w, weight_bits)
    return w + (w_q - w).detach()
