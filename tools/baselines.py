"""The TSB paper's retraining baselines: retrain the last layer(s) on the chip's own noise, reflash them.

The backbone is deployed open loop, the chip's noise dump is fetched, and the chosen
layers (the paper's per-model choice, ``RETRAINED``) are fine-tuned with every other
weight held at what the chip holds (w_q + its captured noise). The retrained layers are
then written again, with write-verify by default, so during training they see fresh
noise of verified devices (sigma ~ 0.03) every step, as the TSB does; written open loop
instead (``verify=False``), they see the chip's own device noise. Only their cells are
touched; every other layer keeps its tiles and cells (incremental compile on the chip's
own program).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from nvcim import driver
from nvcim.firmware_emu.contract.device import DeviceSettings

from .chip import Cost, FlowError, NoiseDump, compile_for, noisy_weights, program_on_chip, program_subset
from .datasets import Split
from .determinism import thread_independent
from .models import Net
from .noise import noisy_weight
from .onnx_io import export, load_deploy
from .train import train_step

# the paper's choice of layers per model: the last FC; the last layers (LeNet-3: last FC and last conv,
# VGG-8: the two FC, ResNet-18: the FC and the last basic block)
RETRAINED = {
    "last": {"lenet3": ["fc.weight"], "vgg8": ["fc2.weight"], "resnet18": ["fc.weight"]},
    "last-layers": {"lenet3": ["conv2.weight", "fc.weight"], "vgg8": ["fc1.weight", "fc2.weight"],
                    "resnet18": ["blocks.7.conv1.weight", "blocks.7.conv2.weight", "fc.weight"]},
}


@dataclass
class RetrainConfig:
    epochs: int = 10
    lr: float = 1e-3
    batch: int = 64
    sigma_verified: float = 0.03   # noise of the retrained layers while training (written with write-verify)
    device_model: str = "GAUSSIAN"  # ... and its device model (the chip's, when they are written open loop)
    seed: int = 0


def retrained_weights(model: Net, which: str) -> list[str]:
    """The weight names the baseline ``which`` ("last" or "last-layers") retrains on ``model``."""
    if which not in RETRAINED:
        raise FlowError(f"retrain {which!r}: choose 'last' or 'last-layers'")
    return RETRAINED[which][model.config["arch"]]


@thread_independent
def retrain(model: Net, fixed: dict[str, torch.Tensor], names: list[str], data: Split, cfg: RetrainConfig) -> float:
    """Fine-tune the weights ``names`` (and their biases) of ``model`` with every other crossbar weight at
    ``fixed``; returns the seconds it took. The model's own parameters are updated in place."""
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise FlowError(f"the model has no weight(s) {', '.join(missing)} to retrain")
    trained = [params[n] for n in names] + [params[b] for n in names
                                            if (b := n.rsplit(".", 1)[0] + ".bias") in params]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trained:
        p.requires_grad_(True)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    device = DeviceSettings(cfg.sigma_verified, cfg.device_model)
    opt = torch.optim.Adam(trained, lr=cfg.lr)
    held = {k: v for k, v in fixed.items() if k not in names}
    xt, yt = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    model.eval()
    t0 = time.perf_counter()
    for _ in range(cfg.epochs):
        for idx in torch.randperm(len(xt), generator=gen).split(cfg.batch):
            step = dict(held, **{n: noisy_weight(params[n], device, gen) for n in names})
            train_step(model, step, xt[idx], yt[idx], opt)
    for p in trained:
        p.requires_grad_(False)
    return time.perf_counter() - t0


def reflash_layers(device: driver.Device, onnx_path: str | Path, dump: NoiseDump,
                   names: list[str], verify: bool = True) -> tuple[object, Cost, int]:
    """Write the layers holding weights ``names`` of ``onnx_path`` (with write-verify, or open loop); leave
    every other layer's tiles and cells as the chip holds them. Returns (program, cost, weights written)."""
    chip_program = program_on_chip(device)
    keep = {layer for layer, src in dump.layers.items() if src not in names}
    program = compile_for(device, onnx_path, base=program_subset(chip_program, keep))
    layers = {layer.name for layer in program.layers if layer.name not in keep}
    before = device.counters()
    stats = driver.deploy(device, program, verify=verify, layers=layers)
    written = sum(layer.in_features * layer.out_features for layer in program.layers if layer.name in layers)
    return program, Cost.between(before, device.counters(), stats), written


def retrained_model(backbone_onnx: str | Path, dump: NoiseDump, which: str, data: Split, cfg: RetrainConfig,
                    out: str | Path) -> tuple[Path, list[str], float]:
    """Retrain the baseline's layers on this chip's dump; export the model. Returns (ONNX path, names, seconds)."""
    model, _ = load_deploy(backbone_onnx)
    names = retrained_weights(model, which)
    fixed = {k: torch.from_numpy(v) for k, v in noisy_weights(backbone_onnx, dump).items()}
    seconds = retrain(model, fixed, names, data, cfg)
    return export(model, out, role="backbone", extra=dict(retrained=names)), names, seconds
