"""What a deployment method achieved on one chip, and everything it cost, counted the same way for all.

Every method (tools/methods.py) reports an ``Outcome``: the accuracy the chip itself
computes on the test set, and its cost in full — every programming step the method
took (open-loop deploy, write-verify with its corrective pulses, reflash of retrained
layers or of a TSB) as the chip's counters saw it, the modelled chip busy time, and the
host training time the method spent for this chip. A ``ChipSpec`` names the fresh
emulated chip it ran on, so a sweep can rebuild the same chip anywhere.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .chip import Cost, settings_url


@dataclass(frozen=True)
class ChipSpec:
    """A fresh emulated chip: device variation, seed (its own noise), device model."""

    sigma: float = 0.3
    seed: int = 1
    device_model: str = "GAUSSIAN"

    def url(self) -> str:
        return settings_url("emu://", sigma=self.sigma, seed=self.seed, model=self.device_model)


@dataclass
class Outcome:
    """One method on one chip. Pulses, busy time and energy are summed over ``stages``."""

    method: str
    params: dict
    chip: ChipSpec | None            # set by run_method
    accuracy: float                  # on the chip, test set
    ideal: float                     # the backbone's 8-bit noise-free accuracy (same test set)
    verified_weights: int            # weights written with write-verify
    total_weights: int               # crossbar weights of the deployed model
    train_seconds: float = 0.0       # host training for this chip (retraining, TSB); the backbone's is apart
    stages: dict[str, Cost] = field(default_factory=dict)

    @property
    def write_pulses(self) -> int:
        return sum(c.write_pulses for c in self.stages.values())

    @property
    def read_pulses(self) -> int:
        return sum(c.read_pulses for c in self.stages.values())

    @property
    def busy_ns(self) -> int:
        return sum(c.busy_ns for c in self.stages.values())

    @property
    def energy_pj(self) -> int:
        return sum(c.energy_pj for c in self.stages.values())

    @property
    def verified_fraction(self) -> float:
        return self.verified_weights / self.total_weights if self.total_weights else 0.0

    @property
    def gap(self) -> float:
        return self.ideal - self.accuracy

    def to_dict(self) -> dict:
        """A flat JSON-able record (the sweeps' and the experiments' row)."""
        return dict(method=self.method, params=self.params, sigma=self.chip.sigma, seed=self.chip.seed,
                    device_model=self.chip.device_model, accuracy=self.accuracy, ideal=self.ideal, gap=self.gap,
                    verified_weights=self.verified_weights, total_weights=self.total_weights,
                    verified_fraction=self.verified_fraction, write_pulses=self.write_pulses,
                    read_pulses=self.read_pulses, busy_ns=self.busy_ns, energy_pj=self.energy_pj,
                    train_seconds=self.train_seconds,
                    stages={k: asdict(v) for k, v in self.stages.items()})

    def __str__(self) -> str:
        stages = "; ".join(f"{k}: {v.write_pulses} write pulses" for k, v in self.stages.items())
        return (f"{self.method} on chip sigma={self.chip.sigma} seed={self.chip.seed} {self.chip.device_model}: "
                f"accuracy {self.accuracy:.2%} (ideal {self.ideal:.2%}, gap {self.gap:.2%}); "
                f"{self.write_pulses} write pulses in all ({stages}); {self.busy_ns / 1e6:.3f} ms chip busy; "
                f"{self.verified_weights} of {self.total_weights} weights write-verified "
                f"({self.verified_fraction:.2%}); host training {self.train_seconds:.1f} s")
