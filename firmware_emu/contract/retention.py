"""Conductance drift after programming: the power law and each preset's parameters.

A programmed cell does not keep its conductance. The field's usual model, fitted on
phase-change memory (Joshi et al., "Accurate deep neural network inference using
computational phase-change memory", Nature Communications 11, 2473, 2020; the drift model
of IBM's analog AI hardware kit), is a power law in the time since programming with a
per-device exponent:

    g(t) = g_prog * ((t - t_prog + t0) / t0) ** (-nu),   nu ~ N(nu_mean, nu_std^2), clipped at 0

t_prog is when the cell was last programmed (its programming time on the chip clock),
t0 the reference time after the programming pulse at which g_prog is read, and nu a
property of each device, drawn once per cell. A cell read right after it was programmed
(t = t_prog) reads g_prog exactly. Conductances are in state units, so drift pulls every
cell towards the erased state 0, proportionally to its conductance.

This module is the arithmetic and the table; docs/device-model.md#drift states the values
and where each comes from.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

REFERENCE_TIME_S = 20.0  # t0: the PCM fit's reference time after the programming pulse (Joshi et al. 2020)


@dataclass(frozen=True)
class Retention:
    """How a cell technology's conductances drift after programming.

    ``nu_mean`` / ``nu_std``: mean and spread over devices of the drift exponent nu (each
    cell's nu is drawn once, N(nu_mean, nu_std^2), clipped at 0). ``t0_s``: reference time
    in seconds after programming. ``basis``: the measurement these values fit, or the
    assumption taken where no fitted value exists.
    """

    nu_mean: float = 0.0
    nu_std: float = 0.0
    t0_s: float = REFERENCE_TIME_S
    basis: str = ""

    def __post_init__(self):
        if self.nu_mean < 0 or self.nu_std < 0 or self.t0_s <= 0:
            raise ValueError(f"retention nu_mean={self.nu_mean}, nu_std={self.nu_std} must be >= 0 and "
                             f"t0_s={self.t0_s} > 0")

    @property
    def drifts(self) -> bool:
        """False when no cell can drift (nu is 0 for every device)."""
        return self.nu_mean > 0 or self.nu_std > 0

    def exponents(self, z: np.ndarray) -> np.ndarray:
        """Per-cell nu from standard normal draws ``z`` (fixed per chip): mean + std * z, clipped at 0."""
        return np.maximum(np.float32(self.nu_mean) + np.float32(self.nu_std) * z, np.float32(0))

    def factor(self, age_s: np.ndarray, nu: np.ndarray) -> np.ndarray:
        """g(t) / g_prog for cells programmed ``age_s`` seconds ago with exponents ``nu`` (float32)."""
        age = np.asarray(age_s, dtype=np.float32)
        return np.exp(-nu * np.log1p(age / np.float32(self.t0_s)))


NO_DRIFT = Retention(basis="the papers' Gaussian programming model has no time dependence: cells keep the "
                           "conductance they were programmed to")

# Mean drift of filamentary HfOx RRAM is small next to PCM's nu ~ 0.05; its retention loss
# shows mostly as a broadening of the levels over hours to days (Wan et al., "A compute-in-memory
# chip based on resistive random-access memory", Nature 608, 2022). No power-law fit of the
# U-SWIM RRAM presets exists; this is an assumption of this project: a tenth of PCM's
# exponent, with a spread as large as the mean.
RRAM_RETENTION = Retention(0.005, 0.005, basis="assumption: no power-law fit exists for these presets; a tenth "
                                               "of PCM's nu ~ 0.05 (Joshi et al. 2020), spread equal to the "
                                               "mean, for RRAM's small mean relaxation (Wan et al. 2022)")

# Multi-level FeFETs lose polarisation (depolarisation fields, charge trapping) faster than
# RRAM relaxes, but no power-law fit of the U-SWIM FeFET presets exists either; assumption
# of this project: between RRAM and PCM.
FEFET_RETENTION = Retention(0.02, 0.01, basis="assumption: no power-law fit exists for these presets; between "
                                              "this project's RRAM value and PCM's nu ~ 0.05 (Joshi et al. 2020)")

# Not a preset: PCM's fitted exponents, the reference the values above are set against, are
# nu ~ N(0.049, 0.008^2) for targets above about half of g_max (the fit's clips:
# mu_nu = clip(-0.0155 ln g_T + 0.0244, 0.049, 0.1), sigma_nu = clip(-0.0125 ln g_T - 0.0059, 0.008, 0.045)).
