"""Every chip tells itself apart: UID_HI:UID_LO and IDENTIFY carry a per-chip ID, fixed like a fuse."""

from __future__ import annotations

import pytest

from nvcim import driver
from nvcim.firmware_emu.contract.protocol import ErrorCode


def _uid_registers(dev: driver.Device) -> int:
    return dev.read_register("UID_HI") << 32 | dev.read_register("UID_LO")


def test_chips_built_with_different_seeds_have_different_ids_and_identify_agrees_with_the_registers():
    ids = set()
    for seed in range(50):
        with driver.open(f"emu://?seed={seed}") as dev:
            assert dev.identity.unique_id == _uid_registers(dev)
            ids.add(dev.identity.unique_id)
    assert len(ids) == 50 and 0 not in ids


def test_the_id_is_a_fuse_writing_seed_or_resetting_does_not_change_it():
    with driver.open("emu://?seed=7") as dev:
        uid = _uid_registers(dev)
        dev.write_register("SEED", 123)
        dev.reset()
        assert _uid_registers(dev) == uid
        with pytest.raises(driver.DeviceError) as e:
            dev.write_register("UID_LO", 0)
        assert e.value.code == ErrorCode.READ_ONLY and "UID_LO" in str(e.value)
        assert _uid_registers(dev) == uid


def test_an_image_keeps_its_chip_id_across_power_cycles_and_seed_options(tmp_path):
    with driver.open(f"emu://?image={tmp_path / 'chip'}&seed=3") as dev:
        uid = dev.identity.unique_id
    with driver.open(f"emu://?image={tmp_path / 'chip'}") as dev:
        assert dev.identity.unique_id == uid
    with driver.open(f"emu://?image={tmp_path / 'chip'}&seed=9") as dev:  # another seed: the same chip
        assert dev.identity.unique_id == uid and dev.read_register("SEED") == 9
    with pytest.raises(Exception, match="uid"):  # a fuse cannot be set again
        driver.open(f"emu://?image={tmp_path / 'chip'}&uid=5")


def test_an_explicit_uid_option_sets_the_fuse_and_a_bad_one_is_refused():
    with driver.open("emu://?uid=0xDEADBEEF01") as dev:
        assert _uid_registers(dev) == 0xDEADBEEF01
    with pytest.raises(Exception, match="uid"):
        driver.open("emu://?uid=-1")
