"""Backbone training with noise injection, early stopping and checkpoints.

Every step draws fresh chip noise for every crossbar weight (tools.noise: the chip's own
quantise / slice / per-cell Gaussian model) and trains the clean weights through it
(straight-through). Training is planned for ``epochs`` epochs (the learning-rate schedule
spans them all); it stops early either at ``stop_fraction`` of that plan (the seeds' 15 %,
30 %, 50 %) or when the noisy-inference accuracy on a validation split has not improved
for ``patience`` epochs (the metric the seed recommends), keeping the best epoch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch.func import functional_call
from tqdm import tqdm

from nvcim.compiler import batchnorm
from nvcim.firmware_emu.contract.device import DeviceSettings

from .datasets import Split
from .determinism import thread_independent
from .evaluate import accuracy, monte_carlo, quantized_params
from .models import Net, build
from .noise import noisy_weight


@dataclass
class TrainConfig:
    arch: str = "lenet3"
    width: float = 1.0
    bn: bool | None = None
    epochs: int = 60                   # length of full training (the plan)
    stop_fraction: float | None = 0.5   # stop at this fraction of the plan (None: train the whole plan)
    patience: int | None = None        # or: stop when noisy validation accuracy stalls this long
    lr: float = 3e-3
    batch: int = 64
    sigma_train: float = 0.2           # noise-injection sigma (seed code default 0.1; 0.2 measured better here)
    sigma_eval: float = 0.3            # sigma of the noisy validation metric (the target chip)
    device_model: str = "GAUSSIAN"
    val_fraction: float = 0.1
    val_draws: int = 10
    seed: int = 0


class Objective(Protocol):
    """A training loss other than plain noise injection (tools/nft.py): its own forward passes and parameters."""

    def parameters(self) -> list[torch.nn.Parameter]:
        """Extra trainable parameters (e.g. IRS snapshot heads), optimised with the model's."""

    def loss(self, model: Net, weights: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
             gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, the backbone's logits) for one batch; ``weights``: this step's noise-injected weights."""


@dataclass
class TrainResult:
    model: Net
    history: list[dict] = field(default_factory=list)
    epochs_run: int = 0
    best_epoch: int = 0
    seconds: float = 0.0


def _batches(n: int, batch: int, gen: torch.Generator) -> list[torch.Tensor]:
    return list(torch.randperm(n, generator=gen).split(batch))


@thread_independent
def train_backbone(data: Split, cfg: TrainConfig, checkpoint_dir: str | Path | None = None,
                   log: Callable[[str], None] = print, progress: bool = True,
                   objective: Callable[[Net], Objective] | None = None) -> TrainResult:
    """Noise-injection training of ``cfg.arch`` on ``data``; returns the chosen (early-stopped) model.

    ``objective``: built on the new model, replaces the cross-entropy of the noisy forward pass
    (NFT's feedback losses); its extra parameters train alongside.
    """
    if cfg.stop_fraction is not None and not 0 < cfg.stop_fraction <= 1:
        raise ValueError(f"stop_fraction={cfg.stop_fraction} must lie in (0, 1]")
    torch.manual_seed(cfg.seed)
    train, val = data.validation(cfg.val_fraction, seed=cfg.seed)
    in_ch, image = data.image_shape[0], data.image_shape[-1]
    model = build(cfg.arch, in_ch, data.num_classes, image=image, width=cfg.width, bn=cfg.bn)
    names = model.weight_names()
    train_device = DeviceSettings(cfg.sigma_train, cfg.device_model)
    eval_device = DeviceSettings(cfg.sigma_eval, cfg.device_model)
    extra = objective(model) if objective is not None else None
    opt = torch.optim.Adam(list(model.parameters()) + (extra.parameters() if extra else []), lr=cfg.lr)
    steps_per_epoch = math.ceil(len(train.x_train) / cfg.batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * steps_per_epoch)
    run_epochs = cfg.epochs if cfg.stop_fraction is None else max(1, round(cfg.epochs * cfg.stop_fraction))
    gen = torch.Generator().manual_seed(cfg.seed)
    xt, yt = torch.from_numpy(train.x_train), torch.from_numpy(train.y_train)
    ckdir = Path(checkpoint_dir) if checkpoint_dir else None
    if ckdir:
        ckdir.mkdir(parents=True, exist_ok=True)
    result = TrainResult(model)
    best_metric, best_state, stale = -1.0, None, 0
    t0 = time.perf_counter()
    bar = tqdm(total=run_epochs * steps_per_epoch, desc=f"train {cfg.arch}", unit="step", disable=not progress,
               leave=False)
    for epoch in range(1, run_epochs + 1):
        model.train()
        loss_sum, hits, seen = 0.0, 0, 0
        for idx in _batches(len(xt), cfg.batch, gen):
            weights = injected_weights(model, names, train_device, gen)
            loss, hit = train_step(model, weights, xt[idx], yt[idx], opt,
                                   None if extra is None else lambda w, x, y: extra.loss(model, w, x, y, gen))
            sched.step()
            loss_sum, hits, seen = loss_sum + loss, hits + hit, seen + len(idx)
            bar.update(1)
        model.eval()
        clean = accuracy(model, val.x_test, val.y_test, quantized_params(model))
        noisy = monte_carlo(model, val.x_test, val.y_test, eval_device, draws=cfg.val_draws, seed=cfg.seed + epoch).mean
        row = {"epoch": epoch, "loss": loss_sum / seen, "train_acc": hits / seen, "val_acc": clean,
               "val_noisy_acc": noisy, "lr": sched.get_last_lr()[0], "seconds": time.perf_counter() - t0}
        result.history.append(row)
        log(f"epoch {epoch:3d}/{run_epochs}: loss {row['loss']:.4f}  train(noisy) {row['train_acc']:.2%}  "
            f"val {clean:.2%}  val@sigma={cfg.sigma_eval} {noisy:.2%}")
        if ckdir:
            save_checkpoint(model, ckdir / f"backbone_e{epoch:03d}.pt", cfg, row)
        if noisy > best_metric:
            best_metric, best_state, stale, result.best_epoch = noisy, _copy_state(model), 0, epoch
        else:
            stale += 1
        if cfg.patience is not None and stale >= cfg.patience:
            log(f"early stop: noisy validation accuracy has not improved for {cfg.patience} epochs; "
                f"keeping epoch {result.best_epoch} ({best_metric:.2%})")
            break
    bar.close()
    if cfg.patience is not None and best_state is not None:
        model.load_state_dict(best_state)
    else:
        result.best_epoch = epoch
    result.epochs_run = epoch
    result.seconds = time.perf_counter() - t0
    return result


def train_step(model: Net, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
               opt: torch.optim.Optimizer, loss_fn: Callable | None = None) -> tuple[float, int]:
    """One optimiser step on the batch (x, y) with ``params`` swapped in; (summed loss, correct predictions).

    ``loss_fn(params, x, y) -> (loss, logits)`` replaces the cross-entropy of one forward pass.
    """
    if loss_fn is None:
        out = functional_call(model, params, (x,))
        loss = torch.nn.functional.cross_entropy(out, y)
    else:
        loss, out = loss_fn(params, x, y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return float(loss.detach()) * len(y), int((out.argmax(1) == y).sum())


def injected_weights(model: Net, names: list[str], device: DeviceSettings,
                     gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Every crossbar weight with fresh chip noise, as the chip will hold it.

    A conv followed by BatchNorm is programmed folded (W * gamma / sqrt(var + eps) per output
    channel), so its noise is drawn on the folded weights, whose per-tensor max sets the
    noise scale, and divided back: the training sees the noise the chip will add.
    """
    params = dict(model.named_parameters())
    mods = dict(model.named_modules())
    folds = {f"{conv}.weight": mods[bn] for conv, bn in model.conv_bn_pairs()
             if isinstance(mods[bn], torch.nn.BatchNorm2d)}
    out = {}
    for n in names:
        w = params[n]
        bn = folds.get(n)
        if bn is None:
            out[n] = noisy_weight(w, device, gen)
            continue
        a = batchnorm.scale(bn.weight.detach(), bn.running_var, bn.eps).reshape(-1, *[1] * (w.dim() - 1))
        a = torch.where(a.abs() > 1e-12, a, torch.full_like(a, 1e-12))
        folded = noisy_weight(w.detach() * a, device, gen)
        out[n] = w + (folded / a - w).detach()
    return out


def _copy_state(model: Net) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def save_checkpoint(model: Net, path: str | Path, cfg: TrainConfig | None = None, info: dict | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": model.config, "state": model.state_dict(), "train": asdict(cfg) if cfg else None,
                "info": info or {}}, path)
    return path


def load_checkpoint(path: str | Path) -> tuple[Net, dict]:
    """Rebuild a model saved by ``save_checkpoint``; returns (model, the saved record)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    record = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain data: never code
    cfg = dict(record["config"])
    tsb = cfg.pop("tsb", None)
    model = build(**cfg, tsb=tsb)
    model.load_state_dict(record["state"])
    return model.eval(), record


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
