"""A sweep grid serially and on a 2-worker Dask LocalCluster: same rows, and how much faster.

The grid is TSB and U-SWIM selective write-verify on LeNet-3 / digits over chip seeds
(each task: open-loop deploy, noise fetch, training, reflash, on-chip accuracy). The
distributed time includes starting the cluster (each worker imports torch and the chip
once), so the ratio is what a user sees. Target: the 2-worker run faster than serial (ratio > 1) on a
2-core machine; results identical but for the measured host training times.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nvcim.tools.onnx_io import export  # noqa: E402
from nvcim.tools.outcome import ChipSpec  # noqa: E402
from nvcim.tools.sweep import DataSpec, Task, executor, run_grid  # noqa: E402
from nvcim.tools.train import TrainConfig, train_backbone  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chips", type=int, default=24, help="chip seeds; two tasks each")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    data = DataSpec()
    model = train_backbone(data.load(), TrainConfig(epochs=6, stop_fraction=None, val_draws=2), log=lambda s: None,
                           progress=False).model
    onnx = export(model, Path("out/bench/sweep-backbone.onnx"), role="backbone").read_bytes()
    tasks = [Task.of(m, ChipSpec(0.3, s), "b", **p) for s in range(1, args.chips + 1)
             for m, p in (("tsb", dict(epochs=10)), ("selective", dict(rule="uswim", budget=0.01)))]
    t0 = time.perf_counter()
    serial = run_grid(tasks, {"b": onnx}, data, scheduler="serial")
    t_serial = time.perf_counter() - t0
    t0 = time.perf_counter()
    with executor("local", args.workers) as cluster:
        t_start = time.perf_counter() - t0
        dask = run_grid(tasks, {"b": onnx}, data, runner=cluster)
    t_dask = time.perf_counter() - t0
    same = [{k: v for k, v in r.items() if k != "train_seconds"} for r in serial] == \
           [{k: v for k, v in r.items() if k != "train_seconds"} for r in dask]
    print(f"{len(tasks)} tasks: serial {t_serial:.1f} s, LocalCluster({args.workers} workers) {t_dask:.1f} s "
          f"({t_start:.1f} s of it starting the cluster): {t_serial / t_dask:.2f}x [target > 1], "
          f"{t_serial / (t_dask - t_start):.2f}x once started; rows identical: {same}")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
