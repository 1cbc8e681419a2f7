"""What of a chip survives a power cycle: powering up from its ``NvmImage``, committing to it.

The image (``nvm_image``) is the file format; this is the chip's side of it. A chip with
an image commits the arrays and program a command changed before the command's reply is
sent (a background operation when it ends), and a chip powered up from an image gets
back its geometry, settings, cells (with their programming times), program, random generator
state and retention clock.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from .commands import parse_program
from .config import ChipConfig
from .contract.geometry import GEOMETRY_FIELDS
from .errors import ChipError
from .nvm_image import MANIFEST, ImageError, ImageState, NvmImage

CLOCK_MAX = 0xFFFFFFFF  # CLOCK is a 32-bit register

if TYPE_CHECKING:
    from .chip import Chip


def power_up(chip_class: type[Chip], path: str, explicit: dict) -> Chip:
    """A chip powered up from the non-volatile image at ``path`` (created if absent or empty).

    The image keeps the chip's geometry and settings; ``explicit`` settings (from
    ChipConfig.parse_options) override the settings, but not an existing geometry. Anything
    stored that this chip cannot take is an ImageError naming the file, and the image stays
    as it is.
    """
    image = NvmImage(path)
    if not image.exists():
        config = ChipConfig(**explicit)
        # the unique-ID fuse is burnt with the image: later seed options do not change it
        chip = chip_class(dataclasses.replace(config, uid=config.unique_id), image)
        commit(chip, set(), program_changed=False)
        return chip
    state = image.load()
    manifest = image.path / MANIFEST
    try:
        stored = ChipConfig.from_dict(state.config)
    except (TypeError, ValueError, KeyError) as e:
        raise ImageError(f"{manifest}: stored chip configuration is not usable ({e})") from None
    stored = dataclasses.replace(stored, uid=stored.unique_id)  # an image from before the fuse: burn it now
    clash = [f"{k}={explicit[k]} (image has {getattr(stored, k)})" for k in (*GEOMETRY_FIELDS, "uid")
             if k in explicit and explicit[k] != getattr(stored, k)]
    if clash:
        raise ValueError(f"image {path} was made for another chip geometry or ID: {', '.join(clash)}")
    config = dataclasses.replace(stored, **explicit)
    _check_fits(state, stored, manifest)
    program = None
    if state.program_code is not None:
        try:
            program = parse_program(config, state.program_code)
        except ChipError as e:
            raise ImageError(f"{state.files['program']}: stored program refused ({e})") from None
    chip = chip_class(config, image)
    cells = chip.cells
    for index, (g, target, noise, programmed_at) in state.arrays.items():
        cells.restore(index, g, target, noise, programmed_at)
    cells.generation += 1
    chip.registers.regs["CLOCK"] = state.clock
    if program is not None:
        chip.program_code, chip.program = state.program_code, program
    if state.rng_state is not None and config.seed == stored.seed:
        try:
            chip.registers.rng.bit_generator.state = state.rng_state
        except (TypeError, ValueError, KeyError, OverflowError) as e:
            raise ImageError(f"{manifest}: stored random generator state is not usable ({e})") from None
    image.sweep()
    return chip


def _check_fits(state: ImageState, config: ChipConfig, manifest: Path) -> None:
    """ImageError unless every stored array and the clock fit the stored geometry and registers."""
    if not 0 <= state.clock <= CLOCK_MAX:
        raise ImageError(f"{manifest}: clock {state.clock} outside 0..{CLOCK_MAX}")
    for index, planes in state.arrays.items():
        if not 0 <= index < config.arrays or planes[0].shape != (config.rows, config.cols):
            raise ImageError(f"{state.files[f'array:{index}']}: array {index} of shape {list(planes[0].shape)} does "
                             f"not fit the stored geometry ({config.arrays} arrays of {config.rows}x{config.cols})")


def commit(chip: Chip, arrays: set[int], program_changed: bool) -> None:
    """Persist what the last command changed to the chip's image, atomically."""
    cells = chip.cells
    planes = {a: ((cells.g[a], cells.target[a], cells.noise[a], cells.ages.programmed_at[a])
                  if cells.target[a].any() or cells.g[a].any() else None) for a in sorted(arrays)}
    chip.image.commit(chip.config.to_dict(), planes, chip.program_code if program_changed else False,
                      chip.registers.rng.bit_generator.state, chip.registers.regs["CLOCK"])
