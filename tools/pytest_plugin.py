"""pytest plugin (entry point ``pytest11``): a fresh emulated nvcim chip for each test.

    def test_ready(chip):                          # a driver.Device on a fresh chip
        assert chip.read_register("STATUS") & 1

    @pytest.mark.nvcim_chip(seed=3, sigma=0.1, model="RRAM4", arrays=4, rows=64, cols=64)
    def test_small_noisy_chip(chip): ...

    @pytest.mark.nvcim_chip(transport="pty")     # the chip in its own process, over a pty
    def test_over_a_pty(chip): ...

    def test_another_process(chip_url):            # a served chip's URL (pty, or TCP by option)
        subprocess.run(["nvcim", "regs", "dump", "--device", chip_url], check=True)

``chip`` is in process by default (``emu://``); with ``transport="pty"`` or ``"tcp"`` it
is a ``python -m nvcim.firmware_emu serve`` process reached over that link, as a bench
reaches a board. ``chip_url`` always serves one (pty unless the transport is tcp) and
stops it after the test. Settings come from the ``nvcim_chip`` marker, else the command
line (``--nvcim-seed``, ``--nvcim-sigma``, ``--nvcim-model``, ``--nvcim-geometry
ARRAYSxROWSxCOLS``, ``--nvcim-transport``), else the chip's defaults.
"""

from __future__ import annotations

import subprocess
import sys
import urllib.parse
from collections.abc import Iterator

import pytest

TRANSPORTS = ("inprocess", "pty", "tcp")
# chip settings a marker may give, and the serve flag of each
SETTINGS = {"seed": "--seed", "sigma": "--sigma", "model": "--model", "read_noise": "--read-noise",
            "dac_bits": "--dac-bits", "adc_bits": "--adc-bits", "arrays": "--arrays", "rows": "--rows",
            "cols": "--cols"}
START_TIMEOUT = 30.0


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("nvcim", "nvcim emulated chip (the chip and chip_url fixtures)")
    group.addoption("--nvcim-transport", choices=TRANSPORTS, default=None,
                    help="How the chip fixture reaches its chip [default: inprocess].")
    group.addoption("--nvcim-seed", type=int, default=None, help="Chip seed.")
    group.addoption("--nvcim-sigma", type=float, default=None, help="Programming variation, units of g_max.")
    group.addoption("--nvcim-model", default=None, help="Device model: GAUSSIAN, RRAM1, FEFET2, RRAM4, FEFET6.")
    group.addoption("--nvcim-geometry", default=None, metavar="ARRAYSxROWSxCOLS",
                    help="Chip geometry, e.g. 4x64x64 (small chips start faster).")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "nvcim_chip(transport='inprocess', seed=None, sigma=None, model=None, "
                                       "read_noise=None, dac_bits=None, adc_bits=None, arrays=None, rows=None, "
                                       "cols=None): settings of the test's chip / chip_url fixtures")


def chip_settings(request: pytest.FixtureRequest) -> tuple[str, dict[str, object]]:
    """(transport, settings) of the requesting test: marker over command line over defaults."""
    opt = request.config.getoption
    settings: dict[str, object] = {}
    geometry = opt("--nvcim-geometry")
    if geometry is not None:
        try:
            settings["arrays"], settings["rows"], settings["cols"] = (int(v) for v in geometry.lower().split("x"))
        except ValueError:
            raise pytest.UsageError(f"--nvcim-geometry {geometry!r}: expected ARRAYSxROWSxCOLS, e.g. 4x64x64") from None
    for name in ("seed", "sigma", "model"):
        if opt(f"--nvcim-{name}") is not None:
            settings[name] = opt(f"--nvcim-{name}")
    transport = opt("--nvcim-transport") or "inprocess"
    marker = request.node.get_closest_marker("nvcim_chip")
    if marker is not None:
        if marker.args:
            raise pytest.UsageError(f"{request.node.nodeid}: nvcim_chip takes keyword arguments only")
        given = dict(marker.kwargs)
        transport = given.pop("transport", transport)
        unknown = set(given) - set(SETTINGS)
        if unknown:
            raise pytest.UsageError(f"{request.node.nodeid}: nvcim_chip does not know {', '.join(sorted(unknown))} "
                                    f"(known: transport, {', '.join(SETTINGS)})")
        settings.update({k: v for k, v in given.items() if v is not None})
    if transport not in TRANSPORTS:
        raise pytest.UsageError(f"{request.node.nodeid}: transport {transport!r} is not one of {', '.join(TRANSPORTS)}")
    return transport, settings


class ServedChip:
    """A ``python -m nvcim.firmware_emu serve`` process and the URL it announced."""

    def __init__(self, transport: str, settings: dict[str, object]):
        args = ["--pty"] if transport == "pty" else ["--tcp", "0"]
        for name, value in settings.items():
            args += [SETTINGS[name], str(value)]
        self.proc = subprocess.Popen([sys.executable, "-m", "nvcim.firmware_emu", "serve", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().strip()  # the first thing it prints; '' if it died
        if not line.startswith("serving on "):
            self.proc.kill()
            _, err = self.proc.communicate(timeout=START_TIMEOUT)
            why = line or (err.strip().splitlines() or ["it exited without a word"])[-1]
            raise RuntimeError(f"the emulated chip did not start (serve {' '.join(args)}): {why}")
        self.url = line.removeprefix("serving on ")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=START_TIMEOUT)
        self.proc.stdout.close()
        self.proc.stderr.close()


def in_process_url(settings: dict[str, object]) -> str:
    return "emu://" + (f"?{urllib.parse.urlencode(settings)}" if settings else "")


@pytest.fixture
def chip_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """The URL of a fresh chip served in its own process (pty, or TCP with transport tcp)."""
    transport, settings = chip_settings(request)
    served = ServedChip("tcp" if transport == "tcp" else "pty", settings)
    try:
        yield served.url
    finally:
        served.stop()


@pytest.fixture
def chip(request: pytest.FixtureRequest):
    """A ``driver.Device`` on a fresh chip: in process by default, else served (transport pty / tcp)."""
    from nvcim import driver

    transport, settings = chip_settings(request)
    url = in_process_url(settings) if transport == "inprocess" else request.getfixturevalue("chip_url")
    dev = driver.open(url)
    try:
        yield dev
    finally:
        dev.close()
