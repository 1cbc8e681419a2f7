"""Sweeps as independent tasks: serially, on a Dask LocalCluster, or on an existing Dask cluster.

A grid point (a method on one fresh emulated chip: sigma, seed, device model) and a chunk
of a Monte Carlo run (N simulated chips from one seed) depend on nothing but their own
arguments: the backbone travels as ONNX bytes, the data set is named and loaded where the
task runs, the chip is rebuilt from its ChipSpec, and every random draw comes from the
task's own seeds. So a task gives the same bits wherever it runs, and a sweep's results,
returned in task order, are identical serially and on any number of workers.

``scheduler``: "serial" (no Dask), "local" (a LocalCluster of ``workers`` single-threaded
processes, the default), or a scheduler address "tcp://HOST:PORT" of a running cluster
whose workers have nvcim installed.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import datasets
from .outcome import ChipSpec

SCHEDULERS = ("serial", "local")
Runner = Callable[[Callable, list[tuple]], list]   # map(fn, argument tuples) -> results in order


@dataclass(frozen=True)
class DataSpec:
    """A data set by name (``datasets.load``), resized, optionally cut to its first samples (smoke runs)."""

    name: str = "digits"
    image: int = 28
    train: int | None = None
    test: int | None = None

    def load(self) -> datasets.Split:
        return _load_data(self)


@functools.lru_cache(maxsize=4)
def _load_data(spec: DataSpec) -> datasets.Split:
    d = datasets.load(spec.name, image_size=spec.image)
    return datasets.Split(d.x_train[:spec.train], d.y_train[:spec.train], d.x_test[:spec.test], d.y_test[:spec.test],
                          d.name)


@dataclass(frozen=True)
class Task:
    """One grid point: ``method`` with ``params`` on the chip ``chip``, with the backbone named ``backbone``;
    ``label`` names the point in tables and plots."""

    method: str
    chip: ChipSpec
    backbone: str
    params: tuple = field(default_factory=tuple)   # (key, value) pairs, hashable
    label: str = ""

    @classmethod
    def of(cls, method: str, chip: ChipSpec, backbone: str, label: str = "", **params) -> Task:
        return cls(method, chip, backbone, tuple(sorted((k, tuple(v) if isinstance(v, list) else v)
                                                        for k, v in params.items())), label or method)


def _backbone_file(onnx: bytes) -> Path:
    """The backbone bytes as a file in this process's scratch folder (written once per content)."""
    digest = hashlib.sha256(onnx).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / f"nvcim-sweep-{digest}.onnx"
    if not path.is_file() or path.read_bytes() != onnx:
        tmp = path.with_suffix(f".{id(onnx)}.tmp")
        tmp.write_bytes(onnx)
        tmp.replace(path)
    return path


def run_task(task: Task, onnx: bytes, data: DataSpec) -> dict:
    """Run one grid point; a JSON-able row (tools.outcome.Outcome.to_dict plus the backbone's name)."""
    from .methods import run_method

    params = {k: list(v) if isinstance(v, tuple) else v for k, v in task.params}
    outcome = run_method(task.method, _backbone_file(onnx), task.chip, data.load(), **params)
    return dict(outcome.to_dict(), backbone=task.backbone, label=task.label)


def monte_carlo_chunk(onnx: bytes, data: DataSpec, sigma: float, device_model: str, draws: int,
                      seed: int) -> np.ndarray:
    """Accuracies of ``draws`` simulated chips drawn from ``seed`` (a chunk of a Monte Carlo run)."""
    from nvcim.firmware_emu.contract.device import DeviceSettings

    from .evaluate import monte_carlo
    from .onnx_io import load_deploy

    model, _ = load_deploy(_backbone_file(onnx))
    split = data.load()
    return monte_carlo(model, split.x_test, split.y_test, DeviceSettings(sigma, device_model), draws=draws,
                       seed=seed).accuracies


def _warm_up() -> None:
    """Import what every task needs once per worker, while the cluster starts (torch, the chip, the optimiser)."""
    import torch

    from . import methods  # noqa: F401

    torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # its first use imports torch._dynamo


@contextlib.contextmanager
def executor(scheduler: str = "local", workers: int = 2) -> Iterator[Runner]:
    """A ``map(fn, argument tuples) -> results in order`` on the chosen scheduler."""
    if scheduler == "serial":
        yield lambda fn, args: [fn(*a) for a in args]
        return
    from distributed import Client, LocalCluster

    if scheduler == "local":
        if workers < 1:
            raise ValueError(f"workers={workers}: a local cluster needs at least one")
        # one process a worker, one thread each: tasks never share torch's (process-wide) thread setting.
        # Dask's nannies set MALLOC_TRIM_THRESHOLD_, which freezes glibc's mmap threshold at 128 KiB: every
        # tensor above it is then mapped and unmapped (page faults on each use); a TSB task took 3.35 s
        # instead of 1.98 s. None removes it from the workers' environment.
        import dask

        with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0")
        client = Client(cluster)
    elif scheduler.startswith("tcp://"):
        cluster, client = None, Client(scheduler, timeout="20s")
    else:
        raise ValueError(f"scheduler {scheduler!r}: expected 'serial', 'local' or a tcp://HOST:PORT address")
    client.run(_warm_up)
    shared = {}  # scattered once per cluster and kept: a released key scattered again could vanish mid-run
    try:
        def run(fn: Callable, args: list[tuple]) -> list:
            scattered = []
            for a in args:  # large arguments (backbone bytes) go to the workers once
                row = []
                for v in a:
                    if isinstance(v, bytes) and len(v) > 4096:
                        key = hashlib.sha256(v).hexdigest()
                        if key not in shared:
                            shared[key] = client.scatter(v, broadcast=True)
                        v = shared[key]
                    row.append(v)
                scattered.append(row)
            futures = [client.submit(fn, *a, pure=False) for a in scattered]
            return client.gather(futures)
        yield run
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def run_grid(tasks: Sequence[Task], backbones: dict[str, bytes], data: DataSpec, scheduler: str = "local",
             workers: int = 2, runner: Runner | None = None) -> list[dict]:
    """Every task's row, in task order (``runner``: an open ``executor``, else one is opened for this grid)."""
    unknown = sorted({t.backbone for t in tasks} - set(backbones))
    if unknown:
        raise ValueError(f"tasks name backbone(s) {', '.join(unknown)} that were not given")
    args = [(t, backbones[t.backbone], data) for t in tasks]
    if runner is not None:
        return runner(run_task, args)
    with executor(scheduler, workers) as run:
        return run(run_task, args)


def run_monte_carlo(onnx: bytes, data: DataSpec, sigma: float, device_model: str = "GAUSSIAN", draws: int = 200,
                    chunk: int = 50, seed: int = 0, scheduler: str = "local", workers: int = 2,
                    runner: Runner | None = None) -> np.ndarray:
    """Accuracies of ``draws`` simulated chips, in chunks of ``chunk`` chips with seeds seed*1000 + k."""
    sizes = [min(chunk, draws - i) for i in range(0, draws, chunk)]
    args = [(onnx, data, sigma, device_model, n, seed * 1000 + k) for k, n in enumerate(sizes)]
    if runner is not None:
        return np.concatenate(runner(monte_carlo_chunk, args))
    with executor(scheduler, workers) as run:
        return np.concatenate(run(monte_carlo_chunk, args))
