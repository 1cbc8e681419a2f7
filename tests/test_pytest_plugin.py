"""The pytest plugin (pytest11 entry point): chip and chip_url fixtures, marker and option settings."""

from __future__ import annotations

import pytest
import serial

import nvcim.driver  # noqa: F401 - loaded once here, not again inside the pytester run

pytest_plugins = ["pytester"]
# the inner runs need no cache and no hypothesis (where installed, its summary would import it anew)
QUIET = ("-p", "no:cacheprovider", "-p", "no:hypothesispytest")


def test_chip_fixtures_in_process_and_served(pytester):
    pytester.makepyfile("""
        import pytest
        from nvcim import driver

        def test_default(chip):
            assert chip.link.port.port.startswith("emu://")
            assert chip.identity.chip_id == 0x4E564331 and chip.read_register("STATUS") & 1

        def test_fresh_each_time_a(chip):
            chip.write_register("SEED", 77)

        def test_fresh_each_time_b(chip):
            assert chip.read_register("SEED") != 77

        def test_options(chip):
            assert chip.read_register("SEED") == 5
            assert chip.read_register("CAP_ARRAYS") == 2 and chip.read_register("CAP_GEOMETRY") == 32 | 16 << 16

        @pytest.mark.nvcim_chip(seed=3, sigma=0.125, model="RRAM4", rows=8, cols=8)
        def test_marker_wins(chip):
            assert chip.read_register("SEED") == 3
            assert chip.read_register("SIGMA") == 0.125 * 65536
            assert chip.read_register("DEVICE_MODEL") == 3
            assert chip.read_register("CAP_GEOMETRY") == 8 | 8 << 16 and chip.read_register("CAP_ARRAYS") == 2

        @pytest.mark.nvcim_chip(sead=3)
        def test_bad_marker(chip):
            pass

        @pytest.mark.nvcim_chip(transport="pty", seed=4, arrays=1)
        def test_pty(chip):
            assert chip.link.port.port.startswith("/dev/pts/")
            assert chip.read_register("SEED") == 4 and chip.read_register("CAP_ARRAYS") == 1
            assert chip.read_register("CAP_GEOMETRY") == 32 | 16 << 16   # geometry from the options

        @pytest.mark.nvcim_chip(transport="tcp", rows=8, cols=8)
        def test_tcp_url(chip_url):
            assert chip_url.startswith("socket://127.0.0.1:")
            with driver.open(chip_url) as dev:
                assert dev.read_register("CAP_GEOMETRY") == 8 | 8 << 16
            with open("url.txt", "w") as f:
                f.write(chip_url)
    """)
    result = pytester.runpytest("--nvcim-seed", "5", "--nvcim-geometry", "2x32x16", *QUIET)
    result.assert_outcomes(passed=7, errors=1)
    result.stdout.fnmatch_lines(["*nvcim_chip does not know sead (known: transport, seed, sigma, model*"])
    url = (pytester.path / "url.txt").read_text()
    with pytest.raises(serial.SerialException):  # the served chip was stopped after its test
        serial.serial_for_url(url, timeout=1)


def test_bad_geometry_option_is_a_usage_error(pytester):
    pytester.makepyfile("def test_a(chip):\n    pass\n")
    result = pytester.runpytest("--nvcim-geometry", "2x32", *QUIET)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*--nvcim-geometry '2x32': expected ARRAYSxROWSxCOLS, e.g. 4x64x64*"])
