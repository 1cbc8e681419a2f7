"""The papers' comparisons on the emulated chip, one command each (``nvcim experiment NAME``).

    gap-vs-sigma      accuracy gap of every method across device sigma (TSB paper, Fig. 3)
    time-to-accuracy  TSB on 15 / 30 / 50 % early-stopped backbones vs full noise-injection training
    tsb-ablation      TSB block width, insertion points, Common vs Separate (TSB paper, Table 2)
    write-cycles      accuracy vs normalised write pulses: U-SWIM, magnitude, random, TSB, full
                      write-verify on GAUSSIAN, RRAM4, FEFET6 (U-SWIM, Fig. 3)
    nft               NFT OVF / IRS vs noise injection across sigma, with and without a TSB (NFT, Fig. 3-4)

Backbones are trained once per configuration on the host (noise injection at the chips'
sigma over the full plan, a checkpoint every epoch, so the 15 / 30 / 50 % backbones are
the same run's earlier epochs) and cached under ``<out>/backbones``. Every grid point is
then one method on one fresh emulated chip (tools/sweep.py: serial, a Dask LocalCluster,
or a given cluster), fixed seeds throughout. Each experiment writes ``<out>/<name>.json``
(every row), ``<name>.md`` (the table: mean over chips and the 95 % interval of the mean,
Student t) and ``<name>.png``.

The accuracy gap is taken against one reference per sigma: the ideal (8-bit, noise-free)
test accuracy of the fully trained noise-injection backbone; a method on another backbone
(early stopped, NFT) is judged against the same reference.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .nft import BETAS, DEFAULT_BETA
from .outcome import ChipSpec
from .sweep import DataSpec, Task, run_grid

EXPERIMENTS: dict[str, Callable[[ExperimentConfig, Callable[[str], None]], dict]] = {}


@dataclass
class ExperimentConfig:
    model: str = "lenet3"
    width: float = 1.0
    data: str = "digits"
    image: int | None = None
    seeds: tuple[int, ...] = (1, 2, 3, 4, 5)        # chip seeds: one fresh chip each per point
    sigmas: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4)
    sigma: float = 0.3                               # the single-sigma experiments
    epochs: int = 60                                 # the full noise-injection plan
    lr: float = 3e-3
    tsb_stop: float = 0.5                            # TSB's early-stopped backbone, fraction of the plan
    tsb_epochs: int = 10
    retrain_epochs: int = 10
    budgets: tuple[float, ...] = (0.005, 0.01, 0.03, 0.1, 0.3, 0.6)
    devices: tuple[str, ...] = ("GAUSSIAN", "RRAM4", "FEFET6")
    betas: tuple[float, ...] = BETAS                 # nft: NFT's feedback coefficients searched
    train_subset: int | None = None                  # smoke runs: the first N training / test images
    test_subset: int | None = None
    train_seed: int = 0
    scheduler: str = "local"
    workers: int = 2
    out: Path = Path("out/experiments")
    cache: Path | None = None                        # trained backbones [default: <out>/backbones]

    @classmethod
    def smoke(cls, **overrides) -> ExperimentConfig:
        """A configuration that runs every experiment in seconds (tests; not for results)."""
        base = dict(seeds=(1, 2), sigmas=(0.2, 0.4), epochs=4, tsb_epochs=1, retrain_epochs=1, budgets=(0.01, 0.1),
                    devices=("GAUSSIAN", "RRAM4"), betas=(1e-1, 1e-2), train_subset=300, test_subset=120,
                    scheduler="serial")
        return cls(**{**base, **overrides})

    @property
    def image_size(self) -> int:
        from .models import DEFAULT_IMAGE

        return self.image or DEFAULT_IMAGE[self.model]

    @property
    def data_spec(self) -> DataSpec:
        return DataSpec(self.data, self.image_size, self.train_subset, self.test_subset)

    def stop_epoch(self, fraction: float) -> int:
        return max(1, round(self.epochs * fraction))


def experiment(name: str):
    def register(fn):
        EXPERIMENTS[name] = fn
        return fn
    return register


# -- backbones ----------------------------------------------------------------------------------
@dataclass
class Backbone:
    name: str
    onnx: bytes
    ideal: float
    seconds: float          # host training time up to this epoch
    epoch: int
    plan: int


class Backbones:
    """Backbones trained once per configuration (one run, a checkpoint per epoch), cached on disk."""

    def __init__(self, cfg: ExperimentConfig, log: Callable[[str], None]):
        self.cfg, self.log = cfg, log
        self.root = cfg.cache or cfg.out / "backbones"

    def _key(self, kind: str, sigma_train: float, device_model: str, beta: float) -> str:
        c = self.cfg
        spec = dict(model=c.model, width=c.width, data=c.data, image=c.image_size, epochs=c.epochs, lr=c.lr,
                    kind=kind, sigma=sigma_train, device=device_model, seed=c.train_seed, train=c.train_subset,
                    test=c.test_subset)
        tag = ""
        if kind != "ni" and beta != DEFAULT_BETA:  # (the default beta is left out: older caches stay valid)
            spec["beta"], tag = beta, f"-b{beta:g}"
        digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
        return f"{c.model}-w{c.width:g}-{kind}{tag}-s{sigma_train:g}-{device_model.lower()}-e{c.epochs}-{digest}"

    def get(self, kind: str = "ni", sigma_train: float = 0.3, fraction: float = 1.0,
            device_model: str = "GAUSSIAN", beta: float = DEFAULT_BETA) -> Backbone:
        """The backbone of training ``kind`` ("ni", "ovf", "irs"; NFT with feedback coefficient ``beta``) at
        ``fraction`` of the plan."""
        from .evaluate import accuracy, quantized_params
        from .onnx_io import export, load_deploy
        from .train import TrainConfig, load_checkpoint

        c = self.cfg
        key = self._key(kind, sigma_train, device_model, beta)
        folder = self.root / key
        record = folder / "history.json"
        if not record.is_file():
            from .nft import train_nft
            from .train import train_backbone

            tc = TrainConfig(arch=c.model, width=c.width, epochs=c.epochs, stop_fraction=None, lr=c.lr,
                             sigma_train=sigma_train, sigma_eval=sigma_train, device_model=device_model,
                             seed=c.train_seed)
            self.log(f"training backbone {key} ({c.epochs} epochs) ...")
            data = c.data_spec.load()
            kwargs = dict(checkpoint_dir=folder, log=lambda s: None, progress=False)
            result = train_backbone(data, tc, **kwargs) if kind == "ni" else \
                train_nft(data, tc, kind, beta=beta, **kwargs)
            record.write_text(json.dumps(result.history))
            self.log(f"  trained in {result.seconds:.1f} s")
        history = json.loads(record.read_text())
        epoch = c.stop_epoch(fraction)
        onnx_path = folder / f"backbone_e{epoch:03d}.onnx"
        if not onnx_path.is_file():
            export(load_checkpoint(folder / f"backbone_e{epoch:03d}.pt")[0], onnx_path, role="backbone")
        data = c.data_spec.load()
        model, _ = load_deploy(onnx_path)
        ideal = accuracy(model, data.x_test, data.y_test, quantized_params(model))
        name = f"{kind}@{fraction:g}/s{sigma_train:g}/{device_model}" + (f"/b{beta:g}" if kind != "ni" else "")
        return Backbone(name, onnx_path.read_bytes(), ideal,
                        history[epoch - 1]["seconds"], epoch, c.epochs)


# -- statistics, tables, plots ----------------------------------------------------------------------
def interval95(values: list[float]) -> tuple[float, float, float]:
    """(mean, low, high): the 95 % interval of the mean (Student t; a single value has none)."""
    a = np.asarray(values, dtype=float)
    mean = float(a.mean())
    if len(a) < 2:
        return mean, mean, mean
    from scipy.stats import t

    half = float(t.ppf(0.975, len(a) - 1) * a.std(ddof=1) / np.sqrt(len(a)))
    return mean, mean - half, mean + half


def summarise(rows: list[dict], keys: tuple[str, ...], value: str) -> dict[tuple, tuple[float, float, float, int]]:
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r[value])
    return {k: (*interval95(v), len(v)) for k, v in groups.items()}


def _pct(m: tuple) -> str:
    return f"{m[0]:.2%} ({m[1]:.2%}..{m[2]:.2%})"


def _write(cfg: ExperimentConfig, name: str, rows: list[dict], table: list[str], fig, extra: dict) -> dict:
    cfg.out.mkdir(parents=True, exist_ok=True)
    stem = f"{name}-{cfg.model}" + (f"-w{cfg.width:g}" if cfg.model != "lenet3" else "")
    (cfg.out / f"{stem}.json").write_text(json.dumps(dict(config=_config_dict(cfg), rows=rows, **extra), indent=1,
                                                     default=str))
    (cfg.out / f"{stem}.md").write_text("\n".join(table) + "\n")
    fig.tight_layout()
    fig.savefig(cfg.out / f"{stem}.png", dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return dict(rows=rows, table=table, png=cfg.out / f"{stem}.png", md=cfg.out / f"{stem}.md", **extra)


def _config_dict(cfg: ExperimentConfig) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}


def _figure(ncols: int = 1, width: float = 6.4):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols if ncols > 1 else width, 4.4), squeeze=False)
    return fig, axes[0]


def _grid(cfg: ExperimentConfig, tasks: list[Task], backbones: dict[str, Backbone], log) -> list[dict]:
    t0 = time.perf_counter()
    log(f"running {len(tasks)} chip tasks on {cfg.scheduler}"
        + (f" ({cfg.workers} workers)" if cfg.scheduler == "local" else "") + " ...")
    rows = run_grid(tasks, {k: b.onnx for k, b in backbones.items()}, cfg.data_spec, cfg.scheduler, cfg.workers)
    log(f"  done in {time.perf_counter() - t0:.1f} s")
    for r in rows:
        b = backbones[r["backbone"]]
        r["backbone_seconds"], r["backbone_epoch"] = b.seconds, b.epoch
    return rows


# -- the experiments -----------------------------------------------------------------------------------
def _method_tasks(cfg: ExperimentConfig, sigma: float, full: str, early: str, tsb_budget: float) -> list[Task]:
    out = []
    for seed in cfg.seeds:
        chip = ChipSpec(sigma, seed)
        out += [Task.of("deployed", chip, full, label="noise injection, deployed"),
                Task.of("deployed", chip, early, label=f"{cfg.tsb_stop:.0%} backbone, deployed"),
                Task.of("retrain-last", chip, full, epochs=cfg.retrain_epochs, label="retrain last layer"),
                Task.of("retrain-last", chip, full, epochs=cfg.retrain_epochs, verify=False,
                        label="retrain last layer, open-loop reflash"),
                Task.of("retrain-last-layers", chip, full, epochs=cfg.retrain_epochs, label="retrain last layers"),
                Task.of("selective", chip, full, rule="uswim", budget=tsb_budget,
                        label="U-SWIM at TSB's budget"),
                Task.of("write-verify", chip, full, label="full write-verify"),
                Task.of("tsb", chip, early, epochs=cfg.tsb_epochs, label=f"TSB ({cfg.tsb_stop:.0%} backbone)")]
    return out


def _tsb_budget(cfg: ExperimentConfig) -> float:
    """The TSB's share of the weights for this model (c^2 / (backbone weights + c^2))."""
    from .models import build, default_tsb_width, tsb_fraction

    data = cfg.data_spec.load()
    net = build(cfg.model, data.image_shape[0], data.num_classes, image=cfg.image_size, width=cfg.width)
    return round(tsb_fraction(net.add_tsb(default_tsb_width(cfg.model, cfg.width))), 6)


BASELINES = ("noise injection, deployed", "retrain last layer", "retrain last layers",
             "retrain last layer, open-loop reflash")
# the baselines that write-verify no more weights than the TSB
SAME_BUDGET = ("noise injection, deployed", "retrain last layer, open-loop reflash", "U-SWIM at TSB's budget")


@experiment("gap-vs-sigma")
def gap_vs_sigma(cfg: ExperimentConfig, log: Callable[[str], None] = print) -> dict:
    """Every method's accuracy gap across device sigma; the headline ratios at ``cfg.sigma``."""
    store = Backbones(cfg, log)
    budget = _tsb_budget(cfg)
    backbones, tasks, reference = {}, [], {}
    for sigma in cfg.sigmas:
        full, early = store.get("ni", sigma, 1.0), store.get("ni", sigma, cfg.tsb_stop)
        backbones[full.name], backbones[early.name] = full, early
        reference[sigma] = full.ideal
        tasks += _method_tasks(cfg, sigma, full.name, early.name, budget)
    rows = _grid(cfg, tasks, backbones, log)
    for r in rows:
        r["gap_ref"] = reference[r["sigma"]] - r["accuracy"]
    labels = list(dict.fromkeys(r["label"] for r in rows))
    acc = summarise(rows, ("label", "sigma"), "accuracy")
    gap = summarise(rows, ("label", "sigma"), "gap_ref")
    pulses = summarise(rows, ("label", "sigma"), "write_pulses")
    verified = summarise(rows, ("label", "sigma"), "verified_fraction")
    train = summarise(rows, ("label", "sigma"), "train_seconds")
    table = [f"Accuracy gap (reference ideal minus chip accuracy) by method and sigma, {cfg.model} on {cfg.data}, "
             f"{len(cfg.seeds)} chips per point; mean (95 % interval of the mean).", "",
             "| method | " + " | ".join(f"sigma {s:g}" for s in cfg.sigmas) + " |",
             "|---|" + "---:|" * len(cfg.sigmas),
             "| reference ideal | " + " | ".join(f"{reference[s]:.2%}" for s in cfg.sigmas) + " |"]
    table += [f"| {lab} | " + " | ".join(_pct(gap[(lab, s)]) for s in cfg.sigmas) + " |" for lab in labels]
    s0 = cfg.sigma if cfg.sigma in cfg.sigmas else cfg.sigmas[-1]
    table += ["", f"At sigma {s0:g}: accuracy, write pulses in all (deploy + verify + reflash), write-verified share, "
                  f"host training time (backbone + per chip).", "",
              "| method | accuracy | gap | write pulses | verified | training s |", "|---|---:|---:|---:|---:|---:|"]
    bb_seconds = {r["label"]: r["backbone_seconds"] for r in rows if r["sigma"] == s0}
    for lab in labels:
        k = (lab, s0)
        table.append(f"| {lab} | {_pct(acc[k])} | {_pct(gap[k])} | {pulses[k][0]:,.0f} | {verified[k][0]:.2%} | "
                     f"{bb_seconds[lab] + train[k][0]:.1f} |")
    headline = _headline(rows, s0, gap, pulses, verified, train, bb_seconds, cfg)
    table += [""] + [x for line in headline["lines"] for x in (line, "")]
    fig, (ax,) = _figure()
    for lab in labels:
        m = np.array([gap[(lab, s)][:3] for s in cfg.sigmas])
        ax.errorbar(cfg.sigmas, 100 * m[:, 0], yerr=100 * np.abs(m[:, 1:].T - m[:, 0]), marker="o", capsize=3,
                    label=lab)
    ax.set_xlabel("device sigma (fraction of g_max)")
    ax.set_ylabel("accuracy gap to ideal (percentage points)")
    ax.set_title(f"Accuracy gap vs device variation, {cfg.model} / {cfg.data}")
    ax.axhline(0, color="grey", lw=0.6)
    ax.legend(fontsize=7)
    return _write(cfg, "gap-vs-sigma", rows, table, fig, dict(headline=headline["numbers"]))


def _ratio_text(g_tsb: float, g_other: float) -> str:
    if g_other <= 0:
        return "no reduction factor: that baseline closes the gap entirely"
    if g_tsb <= 0:
        return "TSB closes the gap entirely"
    return f"{g_other / g_tsb:.1f}x smaller with TSB" if g_tsb < g_other else f"{g_tsb / g_other:.1f}x larger with TSB"


def _headline(rows, s0, gap, pulses, verified, train, bb_seconds, cfg) -> dict:
    """TSB against the best baseline (by gap), and against the best that verifies no more weights than TSB."""
    tsb = f"TSB ({cfg.tsb_stop:.0%} backbone)"
    g_tsb = gap[(tsb, s0)][0]
    t_tsb = bb_seconds[tsb] + train[(tsb, s0)][0]
    numbers = dict(sigma=s0, gap_tsb=g_tsb, pulses_tsb=pulses[(tsb, s0)][0], training_s_tsb=t_tsb,
                   verified_tsb=verified[(tsb, s0)][0], pulses_write_verify=pulses[("full write-verify", s0)][0])
    lines = []
    for key, pool in (("best", BASELINES), ("same_budget", SAME_BUDGET)):
        pool = [lab for lab in pool if (lab, s0) in gap]
        best = min(pool, key=lambda lab: gap[(lab, s0)][0])
        g = gap[(best, s0)][0]
        t = bb_seconds[best] + train[(best, s0)][0]
        numbers[key] = dict(baseline=best, gap=g, gap_reduction=(g / g_tsb) if g > 0 and g_tsb > 0 else None,
                            pulses=pulses[(best, s0)][0], training_s=t, training_speedup=t / t_tsb,
                            verified=verified[(best, s0)][0])
        what = "the best baseline" if key == "best" else "the best baseline verifying no more weights than TSB"
        lines.append(f"At sigma {s0:g}, {what} is '{best}': gap {g:.2%} against TSB's {g_tsb:.2%} "
                     f"({_ratio_text(g_tsb, g)}); write pulses in all {pulses[(best, s0)][0]:,.0f} against TSB's "
                     f"{numbers['pulses_tsb']:,.0f}; host training {t:.1f} s against TSB's {t_tsb:.1f} s "
                     f"({t / t_tsb:.1f}x); write-verified {verified[(best, s0)][0]:.2%} of the weights against "
                     f"TSB's {numbers['verified_tsb']:.2%}.")
    lines.append(f"A full write-verify costs {numbers['pulses_write_verify']:,.0f} write pulses "
                 f"({numbers['pulses_write_verify'] / numbers['pulses_tsb']:.2f}x TSB's, open-loop deploy included).")
    return dict(numbers=numbers, lines=lines)


@experiment("time-to-accuracy")
def time_to_accuracy(cfg: ExperimentConfig, log: Callable[[str], None] = print) -> dict:
    """One noise-injection run: its checkpoints deployed as they are vs TSB on its 15 / 30 / 50 % checkpoints."""
    store = Backbones(cfg, log)
    sigma = cfg.sigma
    step = max(1, cfg.epochs // 10)
    epochs = sorted(set(range(step, cfg.epochs + 1, step)) | {cfg.epochs})
    backbones, tasks = {}, []
    for e in epochs:
        b = store.get("ni", sigma, e / cfg.epochs)
        backbones[b.name] = b
        tasks += [Task.of("deployed", ChipSpec(sigma, s), b.name, label="noise injection, deployed") for s in cfg.seeds]
    full = store.get("ni", sigma, 1.0)
    tasks += [Task.of("retrain-last-layers", ChipSpec(sigma, s), full.name, epochs=cfg.retrain_epochs,
                      label="retrain last layers (full backbone)") for s in cfg.seeds]
    for frac in (0.15, 0.3, 0.5):
        b = store.get("ni", sigma, frac)
        backbones[b.name] = b
        tasks += [Task.of("tsb", ChipSpec(sigma, s), b.name, epochs=cfg.tsb_epochs, label=f"TSB ({frac:.0%} backbone)")
                  for s in cfg.seeds]
    rows = _grid(cfg, tasks, backbones, log)
    for r in rows:
        r["total_seconds"] = r["backbone_seconds"] + r["train_seconds"]
    acc = summarise(rows, ("label", "backbone_epoch"), "accuracy")
    secs = summarise(rows, ("label", "backbone_epoch"), "total_seconds")
    table = [f"Host training time to on-chip accuracy, {cfg.model} on {cfg.data}, sigma {sigma:g}, "
             f"{len(cfg.seeds)} chips per point (one noise-injection run of {cfg.epochs} epochs).", "",
             "| method | backbone epoch | host training s | chip accuracy |", "|---|---:|---:|---:|"]
    for (lab, e), m in sorted(acc.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        table.append(f"| {lab} | {e} | {secs[(lab, e)][0]:.1f} | {_pct(m)} |")
    ni = sorted((e, acc[("noise injection, deployed", e)][0], secs[("noise injection, deployed", e)][0])
                for e in epochs)
    best_ni = max(a for _, a, _ in ni)
    speedups = {}
    for frac in (0.15, 0.3, 0.5):
        lab = f"TSB ({frac:.0%} backbone)"
        (e,) = {k[1] for k in acc if k[0] == lab}
        a, t = acc[(lab, e)][0], secs[(lab, e)][0]
        reach = next((s for _, acc_ni, s in ni if acc_ni >= a), None)
        final = next(s for _, acc_ni, s in ni if acc_ni >= best_ni)
        speedups[lab] = dict(accuracy=a, seconds=t, ni_seconds_to_same=reach, ni_seconds_to_best=final,
                             speedup=(reach / t) if reach else None)
        table.append("")
        table.append(f"{lab}: {a:.2%} after {t:.1f} s of host training; noise injection deployed as is "
                     + (f"reaches it after {reach:.1f} s ({reach / t:.1f}x longer)" if reach else
                        f"never reaches it within the plan (its best, {best_ni:.2%}, after {final:.1f} s: "
                        f"{final / t:.1f}x longer than TSB)"))
    fig, (ax,) = _figure()
    m = np.array([(s, a) for _, a, s in ni])
    ax.plot(m[:, 0], 100 * m[:, 1], "o-", label="noise injection, deployed as is")
    for lab in [k for k in dict.fromkeys(r["label"] for r in rows) if k != "noise injection, deployed"]:
        (e,) = {k[1] for k in acc if k[0] == lab}
        a = acc[(lab, e)]
        ax.errorbar([secs[(lab, e)][0]], [100 * a[0]], yerr=[[100 * (a[0] - a[1])], [100 * (a[2] - a[0])]],
                    marker="s", capsize=3, ls="none", label=lab)
    ax.set_xlabel("host training time (s): backbone + per-chip training")
    ax.set_ylabel("accuracy on the chip (%)")
    ax.set_title(f"Time to accuracy, {cfg.model} / {cfg.data}, sigma {sigma:g}")
    ax.legend(fontsize=7)
    return _write(cfg, "time-to-accuracy", rows, table, fig, dict(speedups=speedups))


@experiment("tsb-ablation")
def tsb_ablation(cfg: ExperimentConfig, log: Callable[[str], None] = print) -> dict:
    """TSB width c, insertion points and Common vs Separate, on the early-stopped backbone at ``cfg.sigma``."""
    from .models import build, default_tsb_width

    store = Backbones(cfg, log)
    b = store.get("ni", cfg.sigma, cfg.tsb_stop)
    data = cfg.data_spec.load()
    net = build(cfg.model, data.image_shape[0], data.num_classes, image=cfg.image_size, width=cfg.width)
    c0, points = default_tsb_width(cfg.model, cfg.width), len(net.tsb_shapes)
    widths = sorted({max(1, c0 // 2), c0, c0 * 2})
    variants = [dict(c=c, label=f"c={c}, all points, common") for c in widths]
    variants += [dict(c=c0, points=[p], label=f"c={c0}, point {p} only") for p in range(points)]
    if points > 2:
        variants.append(dict(c=c0, points=list(range(points // 2, points)), label=f"c={c0}, last half of points"))
    variants.append(dict(c=c0, shared="separate", label=f"c={c0}, all points, separate"))
    tasks = [Task.of("deployed", ChipSpec(cfg.sigma, s), b.name, label="no TSB (deployed)") for s in cfg.seeds]
    tasks += [Task.of("tsb", ChipSpec(cfg.sigma, s), b.name, epochs=cfg.tsb_epochs, **v) for v in variants
              for s in cfg.seeds]
    rows = _grid(cfg, tasks, {b.name: b}, log)
    labels = list(dict.fromkeys(r["label"] for r in rows))
    acc = summarise(rows, ("label",), "accuracy")
    ver = summarise(rows, ("label",), "verified_fraction")
    pul = summarise(rows, ("label",), "write_pulses")
    table = [f"TSB variants on the {cfg.tsb_stop:.0%} backbone ({b.epoch} of {b.plan} epochs), {cfg.model} on "
             f"{cfg.data}, sigma {cfg.sigma:g}, {len(cfg.seeds)} chips; ideal {b.ideal:.2%}.", "",
             "| variant | chip accuracy | write-verified | write pulses in all |", "|---|---:|---:|---:|"]
    table += [f"| {lab} | {_pct(acc[(lab,)])} | {ver[(lab,)][0]:.2%} | {pul[(lab,)][0]:,.0f} |" for lab in labels]
    fig, (ax,) = _figure(width=7.5)
    m = np.array([acc[(lab,)][:3] for lab in labels])
    ax.barh(range(len(labels)), 100 * m[:, 0], xerr=100 * np.abs(m[:, 1:].T - m[:, 0]), capsize=3, color="tab:blue")
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    lo = 100 * max(0.0, m[:, 1].min() - 0.05)
    ax.set_xlim(lo, 100 * min(1.0, m[:, 2].max() + 0.02))
    ax.set_xlabel("accuracy on the chip (%)")
    ax.set_title(f"TSB width, insertion points, Common vs Separate ({cfg.model}, sigma {cfg.sigma:g})")
    return _write(cfg, "tsb-ablation", rows, table, fig, {})


@experiment("write-cycles")
def write_cycles(cfg: ExperimentConfig, log: Callable[[str], None] = print) -> dict:
    """Accuracy against write pulses normalised to a full write-verify, per device model."""
    store = Backbones(cfg, log)
    full, early = store.get("ni", cfg.sigma, 1.0), store.get("ni", cfg.sigma, cfg.tsb_stop)
    tasks = []
    for dev in cfg.devices:
        for s in cfg.seeds:
            chip = ChipSpec(cfg.sigma, s, dev)
            tasks += [Task.of("write-verify", chip, full.name, label="full write-verify"),
                      Task.of("deployed", chip, full.name, label="open loop (no verify)"),
                      Task.of("tsb", chip, early.name, epochs=cfg.tsb_epochs,
                              label=f"TSB ({cfg.tsb_stop:.0%} backbone)")]
            tasks += [Task.of("selective", chip, full.name, rule=rule, budget=b, label=name)
                      for rule, name in (("uswim", "U-SWIM"), ("magnitude", "magnitude"), ("random", "random"))
                      for b in cfg.budgets]
    rows = _grid(cfg, tasks, {full.name: full, early.name: early}, log)
    full_wv = {dev: [r for r in rows if r["device_model"] == dev and r["label"] == "full write-verify"]
               for dev in cfg.devices}
    wv = {dev: np.mean([r["write_pulses"] for r in full_wv[dev]]) for dev in cfg.devices}
    wv_verify = {dev: np.mean([r["write_pulses"] - r["stages"]["deploy"]["cells"] for r in full_wv[dev]])
                 for dev in cfg.devices}
    for r in rows:
        r["budget"] = r["params"].get("budget")
        r["normalised_pulses"] = r["write_pulses"] / wv[r["device_model"]]
        corrective = sum(s["write_pulses"] - s["cells"] for s in r["stages"].values())
        r["normalised_verify_pulses"] = corrective / wv_verify[r["device_model"]]
    keys = ("device_model", "label", "budget")
    acc = summarise(rows, keys, "accuracy")
    norm = summarise(rows, keys, "normalised_pulses")
    normv = summarise(rows, keys, "normalised_verify_pulses")
    table = [f"Accuracy vs write pulses (normalised to a full write-verify of the same device; all pulses, open-loop "
             f"deploy included; and corrective pulses alone), {cfg.model} on {cfg.data}, sigma {cfg.sigma:g}, "
             f"{len(cfg.seeds)} chips per point.", "",
             "| device | method | budget | normalised pulses | normalised corrective pulses | chip accuracy |",
             "|---|---|---:|---:|---:|---:|"]
    for k in sorted(acc, key=lambda k: (k[0], k[1], k[2] or 0)):
        table.append(f"| {k[0]} | {k[1]} | {'' if k[2] is None else f'{k[2]:.1%}'} | {norm[k][0]:.3f} | "
                     f"{normv[k][0]:.3f} | {_pct(acc[k])} |")
    reach = {}
    for dev in cfg.devices:
        target = acc[(dev, "full write-verify", None)]
        for name in ("U-SWIM", "magnitude", "random"):
            ok = sorted((norm[(dev, name, b)][0], b) for b in cfg.budgets if acc[(dev, name, b)][0] >= target[1])
            reach[f"{dev}/{name}"] = dict(normalised_pulses=ok[0][0], budget=ok[0][1]) if ok else None
        table.append("")
        found = {n: reach[f"{dev}/{n}"] for n in ("U-SWIM", "magnitude", "random")}
        table.append(f"{dev}: full write-verify {_pct(target)}; the least budget whose mean reaches the lower end of "
                     f"its interval: " + ", ".join(
                         f"{n} {f['budget']:.1%} ({1 / f['normalised_pulses']:.2f}x fewer pulses)" if f else f"{n} none"
                         for n, f in found.items()))
    fig, axes = _figure(len(cfg.devices), width=4.6)
    for ax, dev in zip(axes, cfg.devices):
        for name, style in (("U-SWIM", "o-"), ("magnitude", "s--"), ("random", "^:")):
            m = np.array([(norm[(dev, name, b)][0], *acc[(dev, name, b)][:3]) for b in cfg.budgets])
            ax.errorbar(m[:, 0], 100 * m[:, 1], yerr=100 * np.abs(m[:, 2:].T - m[:, 1]), fmt=style, capsize=2,
                        label=name, ms=4)
        for lab, mk in (("full write-verify", "*"), ("open loop (no verify)", "x"),
                        (f"TSB ({cfg.tsb_stop:.0%} backbone)", "D")):
            k = (dev, lab, None)
            ax.errorbar([norm[k][0]], [100 * acc[k][0]], yerr=[[100 * (acc[k][0] - acc[k][1])],
                                                               [100 * (acc[k][2] - acc[k][0])]],
                        marker=mk, ms=8, ls="none", capsize=2, label=lab)
        ax.set_xlabel("write pulses / full write-verify's")
        ax.set_ylabel("accuracy on the chip (%)")
        ax.set_title(f"{dev}, sigma {cfg.sigma:g}")
    axes[0].legend(fontsize=7)
    return _write(cfg, "write-cycles", rows, table, fig, dict(reach=reach))


@experiment("nft")
def nft(cfg: ExperimentConfig, log: Callable[[str], None] = print) -> dict:
    """Backbones trained at ``cfg.sigma`` with noise injection and with NFT OVF / IRS at every feedback
    coefficient of ``cfg.betas``, deployed as they are across chip sigma; each NFT variant's beta chosen as
    the paper does (a search over the set, the best accuracy at ``cfg.sigma``), then a TSB on the chosen
    backbones and on noise injection's at ``cfg.sigma``."""
    store = Backbones(cfg, log)
    names = {"ni": "noise injection", "ovf": "NFT OVF", "irs": "NFT IRS"}
    several = len(cfg.betas) > 1

    def label(kind: str, beta: float) -> str:
        return names[kind] + (f" (beta {beta:g})" if kind != "ni" and several else "")

    backbones = {("ni", DEFAULT_BETA): store.get("ni", cfg.sigma, 1.0)}
    backbones.update({(k, b): store.get(k, cfg.sigma, 1.0, beta=b) for k in ("ovf", "irs") for b in cfg.betas})
    sigmas = sorted(set(cfg.sigmas) | {cfg.sigma})
    tasks = [Task.of("deployed", ChipSpec(sigma, s), bb.name, label=f"{label(*key)}, deployed")
             for key, bb in backbones.items() for sigma in sigmas for s in cfg.seeds]
    by_name = {bb.name: bb for bb in backbones.values()}
    rows = _grid(cfg, tasks, by_name, log)
    acc = summarise(rows, ("label", "sigma"), "accuracy")
    chosen = {"ni": DEFAULT_BETA}
    for kind in ("ovf", "irs"):
        chosen[kind] = max(cfg.betas, key=lambda b, kind=kind: acc[(f"{label(kind, b)}, deployed", cfg.sigma)][0])
    tasks = [Task.of("tsb", ChipSpec(cfg.sigma, s), backbones[(k, b)].name, epochs=cfg.tsb_epochs,
                     label=f"{label(k, b)} + TSB") for k, b in chosen.items() for s in cfg.seeds]
    rows += _grid(cfg, tasks, by_name, log)
    labels = list(dict.fromkeys(r["label"] for r in rows))
    acc = summarise(rows, ("label", "sigma"), "accuracy")
    ideal = {label(*key): bb.ideal for key, bb in backbones.items()}
    seconds = {label(*key): bb.seconds for key, bb in backbones.items()}
    search = (f"; NFT's beta searched over {', '.join(f'{b:g}' for b in cfg.betas)} and chosen by the best deployed "
              f"accuracy at sigma {cfg.sigma:g} (OVF: {chosen['ovf']:g}, IRS: {chosen['irs']:g}); the TSB rows "
              f"use the chosen backbones") if several else ""
    table = [f"Chip accuracy of backbones trained at sigma {cfg.sigma:g} ({cfg.epochs} epochs) by noise injection and "
             f"NFT, across chip sigma, {cfg.model} on {cfg.data}, {len(cfg.seeds)} chips per point{search}.", "",
             "| backbone | ideal (8-bit) | host training s | " + " | ".join(f"sigma {s:g}" for s in sigmas) + " |",
             "|---|---:|---:|" + "---:|" * len(sigmas)]
    for lab in labels:
        base = lab.removesuffix(", deployed").removesuffix(" + TSB")
        table.append(f"| {lab} | {ideal[base]:.2%} | {seconds[base]:.0f} | "
                     + " | ".join(_pct(acc[(lab, s)]) if (lab, s) in acc else "" for s in sigmas) + " |")
    fig, (ax,) = _figure(width=7.2)
    shown = {f"{label(k, b)}, deployed" for k, b in chosen.items()}
    tsb = [lab for lab in labels if "TSB" in lab]
    for lab in labels:
        sig = [s for s in sigmas if (lab, s) in acc]
        m = np.array([acc[(lab, s)][:3] for s in sig])
        main = "TSB" in lab or lab in shown
        if lab in tsb:                          # the TSB points share one sigma: side by side, not stacked
            sig = [s + 0.01 * (tsb.index(lab) - (len(tsb) - 1) / 2) for s in sig]
        ax.errorbar(sig, 100 * m[:, 0], yerr=100 * np.abs(m[:, 1:].T - m[:, 0]), capsize=3,
                    fmt="D" if "TSB" in lab else ("o-" if main else ".:"), ms=7 if "TSB" in lab else 5,
                    alpha=1.0 if main else 0.4, label=lab)
    ax.set_xlabel("device sigma of the chip (fraction of g_max)")
    ax.set_ylabel("accuracy on the chip (%)")
    ax.set_title(f"NFT vs noise injection, {cfg.model} / {cfg.data} (trained at sigma {cfg.sigma:g})")
    ax.legend(fontsize=6, ncol=2)
    return _write(cfg, "nft", rows, table, fig, dict(ideal=ideal, chosen_beta=chosen))


def run_experiment(name: str, cfg: ExperimentConfig, log: Callable[[str], None] = print) -> dict:
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}: choose from {', '.join(EXPERIMENTS)}")
    return EXPERIMENTS[name](cfg, log)

