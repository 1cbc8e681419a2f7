"""Every deployment method on one chip, through the driver, with its cost counted in full.

    deployed             the backbone programmed open loop (one pulse a cell), used as is
    write-verify         every cell written with write-verify
    retrain-last         open loop, retrain the last layer on the chip's noise, reflash it verified
                         (verify=False: reflash it open loop)
    retrain-last-layers  the same with the paper's last layers (tools/baselines.py)
    selective            open loop except a budget fraction of weights, verified; chosen by
                         rule = uswim | magnitude | random (tools/selective.py)
    tsb                  open loop, train a Tiny Shared Block on the chip's noise, write only it
                         verified (shared = common | separate, insertion points; tools/tsb.py)

``run_method(name, backbone.onnx, ChipSpec | device URL, data, workdir, **params)`` opens
the chip, runs the method and returns its ``Outcome``: the chip's own test accuracy and
every programming stage's pulses (open-loop deploy included), busy time and the host
training time for this chip. How the backbone was trained (noise injection, early
stopped, NFT) is the caller's choice: every method takes any backbone ONNX file.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Callable
from pathlib import Path

from nvcim import driver

from .baselines import RetrainConfig, reflash_layers, retrained_model
from .chip import Cost, FlowError, chip_accuracy, chip_settings, compile_for, deploy_backbone, fetch_noise, flash_tsb
from .datasets import Split
from .evaluate import accuracy, quantized_params
from .onnx_io import export, load_deploy
from .outcome import ChipSpec, Outcome
from .selective import scores, select, verify_masks
from .tsb import TSBConfig, backbone_with_tsb, fixed_backbone, train_tsb


def _weights(program) -> int:
    return sum(layer.in_features * layer.out_features for layer in program.layers)


def _ideal(backbone: Path, data: Split) -> float:
    model, _ = load_deploy(backbone)
    return accuracy(model, data.x_test, data.y_test, quantized_params(model))


def deployed(dev: driver.Device, backbone: Path, data: Split, workdir: Path) -> Outcome:
    """The backbone programmed open loop and used as it lands."""
    program, cost = deploy_backbone(dev, backbone)
    acc = chip_accuracy(dev, program, data.x_test, data.y_test)
    return Outcome("deployed", {}, None, acc, _ideal(backbone, data), 0, _weights(program), 0.0, {"deploy": cost})


def write_verify(dev: driver.Device, backbone: Path, data: Split, workdir: Path) -> Outcome:
    """Every cell written with write-verify."""
    program = compile_for(dev, backbone)
    before = dev.counters()
    stats = driver.deploy(dev, program, verify=True)
    cost = Cost.between(before, dev.counters(), stats)
    acc = chip_accuracy(dev, program, data.x_test, data.y_test)
    n = _weights(program)
    return Outcome("write-verify", {}, None, acc, _ideal(backbone, data), n, n, 0.0, {"deploy": cost})


def retrain_method(which: str) -> Callable[..., Outcome]:
    """The baseline retraining ``which`` ("last" or "last-layers") on the chip's own noise dump."""
    def run(dev: driver.Device, backbone: Path, data: Split, workdir: Path, epochs: int = 10, lr: float = 1e-3,
            verify: bool = True, seed: int = 0) -> Outcome:
        program, deploy_cost = deploy_backbone(dev, backbone)
        dump = fetch_noise(dev, backbone)
        cfg = RetrainConfig(epochs=epochs, lr=lr, seed=seed)
        if not verify:  # the retrained layers land with the chip's own variation
            cfg.sigma_verified, cfg.device_model = dump.chip["sigma"], dump.chip["device_model"]
        onnx_path, names, seconds = retrained_model(backbone, dump, which, data, cfg,
                                                    workdir / f"retrained-{which}.onnx")
        program, cost, written = reflash_layers(dev, onnx_path, dump, names, verify=verify)
        acc = chip_accuracy(dev, program, data.x_test, data.y_test)
        return Outcome(f"retrain-{which}", dict(epochs=epochs, lr=lr, layers=names, verify=verify), None, acc,
                       _ideal(backbone, data), written if verify else 0, _weights(program), seconds,
                       {"deploy": deploy_cost, "reflash": cost})
    return run


_SCORES: dict[tuple, dict] = {}


def _scores(backbone: Path, rule: str, data: Split, seed: int) -> dict:
    """Selection scores, kept per process for the same backbone, rule, data and seed (a sweep reuses them)."""
    key = (hashlib.sha256(backbone.read_bytes()).hexdigest(), rule, seed,
           hashlib.sha256(data.x_train.tobytes() + data.y_train.tobytes()).hexdigest())
    if key not in _SCORES:
        if len(_SCORES) >= 8:
            _SCORES.pop(next(iter(_SCORES)))
        model, _ = load_deploy(backbone)
        _SCORES[key] = scores(model, rule, data.x_train, data.y_train, seed=seed)
    return _SCORES[key]


def selective(dev: driver.Device, backbone: Path, data: Split, workdir: Path, rule: str = "uswim",
              budget: float = 0.01, seed: int = 0) -> Outcome:
    """Open loop except the ``budget`` fraction of weights ``rule`` ranks first, which are write-verified."""
    chosen = select(_scores(backbone, rule, data, seed), budget)
    masks = verify_masks(backbone, chosen)
    program = compile_for(dev, backbone)
    before = dev.counters()
    stats = driver.deploy(dev, program, verify_mask=masks)
    cost = Cost.between(before, dev.counters(), stats)
    acc = chip_accuracy(dev, program, data.x_test, data.y_test)
    verified = int(sum(m.sum() for m in chosen.values()))
    return Outcome("selective", dict(rule=rule, budget=budget), None, acc, _ideal(backbone, data), verified,
                   _weights(program), 0.0, {"deploy": cost})


def tsb(dev: driver.Device, backbone: Path, data: Split, workdir: Path, c: int | None = None,
        points: list[int] | None = None, shared: str = "common", epochs: int = 10, lr: float = 1e-2,
        sigma_verified: float = 0.03, seed: int = 0) -> Outcome:
    """Open loop, TSB trained on this chip's noise, only the TSB cells written (verified)."""
    program, deploy_cost = deploy_backbone(dev, backbone)
    dump = fetch_noise(dev, backbone)
    model = backbone_with_tsb(backbone, c, points)
    fixed = fixed_backbone(model, backbone, dump)
    trained = train_tsb(model, fixed, data, TSBConfig(model.tsb.c, epochs, lr, sigma_verified=sigma_verified,
                                                      seed=seed), log=lambda s: None, progress=False)
    tsb_onnx = export(model, workdir / "tsb.onnx", role="tsb",
                      extra=dict(backbone_fingerprint=dump.model_fingerprint, noise_digest=dump.digest()))
    tsb_program, report = flash_tsb(dev, backbone, tsb_onnx, dump, shared=shared)
    acc = chip_accuracy(dev, tsb_program, data.x_test, data.y_test)
    return Outcome("tsb", dict(c=model.tsb.c, points=sorted(model.tsb_points) if model.tsb_points else None,
                               shared=shared, epochs=epochs, lr=lr), None, acc, _ideal(backbone, data),
                   report.tsb_weights, report.total_weights, trained.seconds,
                   {"deploy": deploy_cost, "reflash": report.cost})


METHODS: dict[str, Callable[..., Outcome]] = {
    "deployed": deployed,
    "write-verify": write_verify,
    "retrain-last": retrain_method("last"),
    "retrain-last-layers": retrain_method("last-layers"),
    "selective": selective,
    "tsb": tsb,
}


def run_method(name: str, backbone: str | Path, chip: ChipSpec | str, data: Split, workdir: str | Path | None = None,
               **params) -> Outcome:
    """Run method ``name`` with the backbone ONNX file on a fresh chip (ChipSpec) or the chip at a device URL."""
    if name not in METHODS:
        raise FlowError(f"unknown method {name!r}: choose from {', '.join(METHODS)}")
    url = chip.url() if isinstance(chip, ChipSpec) else chip
    with tempfile.TemporaryDirectory(prefix="nvcim-method-") as scratch:
        wd = Path(workdir) if workdir is not None else Path(scratch)
        wd.mkdir(parents=True, exist_ok=True)
        with driver.open(url) as dev:
            outcome = METHODS[name](dev, Path(backbone), data, wd, **params)
            if not isinstance(chip, ChipSpec):
                s = chip_settings(dev)
                chip = ChipSpec(round(s["sigma"], 6), s["seed"], s["device_model"])
    outcome.chip = chip
    return outcome
