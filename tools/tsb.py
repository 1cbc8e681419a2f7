"""Training the Tiny Shared Block on one chip's captured noise (docs/methods.md#tsb-tiny-shared-block).

The backbone is rebuilt from its ONNX file (deploy form, weights bit for bit) and its
crossbar weights are fixed to what the chip really holds: w_q + the captured noise of
each weight (tools.chip.NoiseDump). One identity-initialised c x c block, shared by
every insertion point and channel group, is the only thing that trains; every step it
sees fresh noise of write-verified devices (sigma ~ 0.03) through the chip's noise model.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from nvcim.firmware_emu.contract.device import DeviceSettings

from .chip import FlowError, NoiseDump, check_tsb_width, noisy_weights
from .datasets import Split
from .determinism import thread_independent
from .evaluate import accuracy, quantized_params
from .models import Net, count_weights
from .noise import noisy_weight
from .onnx_io import load_deploy, read_meta
from .train import train_step


@dataclass
class TSBConfig:
    c: int | None = None          # block width; default: the seeds' c for the model (5 LeNet-3, 128 VGG-8 ...)
    epochs: int = 10
    lr: float = 1e-2              # seeds: 1e-3 on MNIST; the digits set has ~1/50 of its steps per epoch
    batch: int = 64
    sigma_verified: float = 0.03  # device variation of the write-verified TSB cells
    seed: int = 0


@dataclass
class TSBResult:
    model: Net
    fixed: dict[str, torch.Tensor]
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def backbone_with_tsb(backbone_onnx: str | Path, c: int | None, points: list[int] | None = None) -> Net:
    """The backbone's deploy form from its ONNX file with an identity TSB of width ``c`` inserted
    at ``points`` (indices of the model's insertion points; None: all of them)."""
    from .models import default_tsb_width

    model, meta = load_deploy(backbone_onnx)
    if meta.get("role") != "backbone" or model.tsb is not None:
        raise FlowError(f"{backbone_onnx} is not a backbone model (role {meta.get('role')!r}); "
                        f"pass the ONNX file written by `nvcim train`")
    c = default_tsb_width(meta["arch"], meta["width"]) if c is None else c
    if c < 1:
        raise FlowError(f"TSB width c={c} must be >= 1")
    try:
        return model.add_tsb(c, points)
    except ValueError as e:
        raise FlowError(str(e)) from None


def fixed_backbone(model: Net, backbone_onnx: str | Path, dump: NoiseDump) -> dict[str, torch.Tensor]:
    """The backbone weights as the chip holds them (w_q + captured noise), keyed like the model's parameters."""
    weights = noisy_weights(backbone_onnx, dump)
    missing = [n for n in model.weight_names() if n not in weights]
    if missing:
        raise FlowError(f"noise file {dump.source} has no noise for weight(s) {', '.join(missing[:4])} of "
                        f"{backbone_onnx}; it was captured from another model")
    return {n: torch.from_numpy(weights[n]) for n in model.weight_names()}


@thread_independent
def train_tsb(model: Net, fixed: dict[str, torch.Tensor], data: Split, cfg: TSBConfig,
              log: Callable[[str], None] = print, progress: bool = True) -> TSBResult:
    """Train only the TSB weights of ``model`` with the backbone fixed at ``fixed``."""
    if model.tsb is None:
        raise FlowError("the model has no TSB to train")
    if cfg.epochs < 1:
        raise FlowError(f"epochs={cfg.epochs} must be >= 1")
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    for p in model.parameters():
        p.requires_grad_(False)
    w = model.tsb.weight
    w.requires_grad_(True)
    opt = torch.optim.Adam([w], lr=cfg.lr)
    device = DeviceSettings(cfg.sigma_verified)
    xt, yt = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    steps = -(-len(xt) // cfg.batch)
    result = TSBResult(model, fixed)
    b, t = count_weights(model)
    log(f"TSB c={model.tsb.c}: {t} weights ({t / (b + t):.2%} of {b + t}) shared by {len(model.tsb_shapes)} "
        f"insertion points; backbone fixed at the chip's weights; lr {cfg.lr}, {cfg.epochs} epochs")
    t0 = time.perf_counter()
    bar = tqdm(total=cfg.epochs * steps, desc="train TSB", unit="step", disable=not progress, leave=False)
    for epoch in range(1, cfg.epochs + 1):
        model.eval()  # no BN left in the deploy form; eval keeps every module deterministic
        loss_sum, hits, seen = 0.0, 0, 0
        for idx in torch.randperm(len(xt), generator=gen).split(cfg.batch):
            params = dict(fixed, **{"tsb.weight": noisy_weight(w, device, gen)})
            loss, hit = train_step(model, params, xt[idx], yt[idx], opt)
            loss_sum, hits, seen = loss_sum + loss, hits + hit, seen + len(idx)
            bar.update(1)
        tsb_weight = quantized_params(model)["tsb.weight"]
        test = accuracy(model, data.x_test, data.y_test, dict(fixed, **{"tsb.weight": tsb_weight}))
        row = {"epoch": epoch, "loss": loss_sum / seen, "train_acc": hits / seen, "test_acc": test,
               "seconds": time.perf_counter() - t0}
        result.history.append(row)
        log(f"TSB epoch {epoch:2d}/{cfg.epochs}: loss {row['loss']:.4f}  train {row['train_acc']:.2%}  "
            f"test (chip backbone, ideal TSB) {test:.2%}")
    bar.close()
    w.requires_grad_(False)
    result.seconds = time.perf_counter() - t0
    return result


def check_width_for_chip(c: int, dump: NoiseDump) -> None:
    check_tsb_width(c, dump.chip)


def load_for_training(backbone_onnx: str | Path, noise_path: str | Path, c: int | None) -> tuple[Net, dict, NoiseDump]:
    """Model with TSB, fixed chip weights and the dump, after checking the dump belongs to this backbone."""
    from nvcim.compiler import Target, compile_model

    dump = NoiseDump.load(noise_path)
    model = backbone_with_tsb(backbone_onnx, c)
    check_width_for_chip(model.tsb.c, dump)
    chip = dump.chip
    target = Target(chip["arrays"], chip["rows"], chip["cols"], chip["weight_bits"], chip["cell_bits"])
    dump.check_model(compile_model(backbone_onnx, target), f"backbone {backbone_onnx}")
    return model, fixed_backbone(model, backbone_onnx, dump), dump


def tsb_meta(path: str | Path) -> dict:
    _, meta = read_meta(path)
    if meta.get("role") != "tsb":
        raise FlowError(f"{path} is not a TSB model (role {meta.get('role')!r}); make one with `nvcim tsb train`")
    return meta



