"""Chip and link throughput, measured through the driver as a host sees them.

Prints open-loop programming (+ read-after-write capture) and write-verify rates in
cells/s, and staging-buffer throughput in MB/s over the in-process link and over a pty,
each next to its target from issue 3.
"""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np

from nvcim import driver

ARRAYS, ROWS, COLS = 64, 256, 256
TARGETS = {"open loop": 20e6, "write-verify": 5e6, "in-process": 100e6, "pty": 10e6}


def _rate(label: str, work: float, unit: str, seconds: float, target: float, size: str) -> None:
    rate = work / seconds
    print(f"{label:<34} {rate / 1e6:8.1f} M{unit}/s   target {target / 1e6:5.0f} M{unit}/s  "
          f"x{rate / target:5.2f}   ({size}, {seconds:.2f} s)")


def programming(dev: driver.Device) -> None:
    targets = np.random.default_rng(0).integers(0, 4, (ROWS, COLS)).astype(np.uint8)
    cells = ARRAYS * ROWS * COLS
    for label, verify in (("open loop", False), ("write-verify", True)):
        t0 = time.perf_counter()
        for a in range(ARRAYS):
            dev.write_cells(a, 0, 0, targets, verify=verify)
        _rate(f"programming, {label}", cells, "cells", time.perf_counter() - t0, TARGETS[label],
              f"{cells / 1e6:.1f} M cells in {ARRAYS} arrays of {ROWS}x{COLS}")


def link(dev: driver.Device, label: str, megabytes: int) -> None:
    data = np.random.default_rng(1).integers(0, 256, megabytes << 20, dtype=np.uint8).tobytes()
    t0 = time.perf_counter()
    dev.buffer_write(data)
    back = dev.buffer_read(len(data))
    seconds = time.perf_counter() - t0
    assert back == data
    _rate(f"link {label}, write+read", 2 * len(data), "B", seconds, TARGETS[label], f"{megabytes} MiB each way")


def main() -> None:
    with driver.open(f"emu://?arrays={ARRAYS}&rows={ROWS}&cols={COLS}") as dev:
        programming(dev)
        link(dev, "in-process", 32)
    server = subprocess.Popen([sys.executable, "-m", "nvcim.firmware_emu", "serve", "--pty"],
                              stdout=subprocess.PIPE, text=True)
    try:
        address = server.stdout.readline().strip().removeprefix("serving on ")
        with driver.open(address) as dev:
            link(dev, "pty", 8)
    finally:
        server.kill()


if __name__ == "__main__":
    main()
