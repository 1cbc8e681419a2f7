"""Registers by name, as a bench engineer pokes them: ``STATUS``, ``STATUS.BUSY``, ``0x024``.

Everything comes from the one register map (``nvcim.firmware_emu.contract.registers``):
names, offsets, access, fields and the limits of the settings, so a register added
there is readable, writable and decoded here without a change. Values are checked
on the host before anything is sent, and an error names the register, the field and
the range it accepts.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from enum import IntEnum

from nvcim.firmware_emu.contract.protocol import Command, ErrorCode
from nvcim.firmware_emu.contract.registers import (
    BY_NAME,
    BY_OFFSET,
    LIMITS,
    Q16,
    REGISTERS,
    Access,
    DeviceModelCode,
    Field,
    OpState,
    Register,
)

WORD_MAX = 0xFFFFFFFF
_NAME_WIDTH = max(len(r.name) for r in REGISTERS)

# Values whose meaning the register map gives as an enumeration (decoded and accepted by name).
ENUMS: dict[str, type[IntEnum]] = {"DEVICE_MODEL": DeviceModelCode, "ERROR_CODE": ErrorCode,
                                   "OP_STATUS.STATE": OpState, "OP_STATUS.COMMAND": Command}


class RegisterError(ValueError):
    """A register name, field or value the map does not allow; the message says what it allows."""


@dataclass(frozen=True)
class RegisterRef:
    """A whole register, or one field of it."""

    register: Register
    field: Field | None = None

    @property
    def name(self) -> str:
        return self.register.name + (f".{self.field.name}" if self.field else "")

    @property
    def max_value(self) -> int:
        """The largest value the host may write here (the field's width, the setting's limit)."""
        if self.field is not None:
            return (1 << self.field.width) - 1
        return LIMITS.get(self.register.name, WORD_MAX)

    @property
    def q16(self) -> bool:
        """A Q16.16 fraction of g_max: a decimal value such as 0.3 is accepted and shown."""
        return self.field is None and "Q16.16" in self.register.description

    def extract(self, register_value: int) -> int:
        if self.field is None:
            return register_value
        return (register_value & self.field.mask) >> self.field.lsb


def resolve(text: str) -> RegisterRef:
    """``NAME``, ``NAME.FIELD`` or a byte offset (``0x24``, ``0x24.BUSY``), case-insensitive."""
    reg_text, _, field_text = text.strip().partition(".")
    if not reg_text:
        raise RegisterError(f"{text!r}: expected a register name or address, e.g. STATUS or STATUS.BUSY")
    if reg_text[0].isdigit():
        try:
            offset = int(reg_text, 0)
        except ValueError:
            raise RegisterError(f"{reg_text!r} is neither a register name nor an address") from None
        if offset not in BY_OFFSET:
            raise RegisterError(f"no register at address 0x{offset:03X} in the nvcim register map "
                                f"(mapped: 0x000..0x{max(BY_OFFSET):03X}, see `nvcim regs dump`)")
        register = BY_OFFSET[offset]
    else:
        register = BY_NAME.get(reg_text.upper())
        if register is None:
            close = difflib.get_close_matches(reg_text.upper(), BY_NAME, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else " (see `nvcim regs dump`)"
            raise RegisterError(f"no register {reg_text} in the nvcim register map{hint}")
    if not field_text:
        return RegisterRef(register)
    for f in register.fields:
        if f.name == field_text.upper():
            return RegisterRef(register, f)
    known = ", ".join(f.name for f in register.fields)
    raise RegisterError(f"register {register.name} has no field {field_text}"
                        + (f" (fields: {known})" if known else " (it has no fields)"))


def parse_value(ref: RegisterRef, value: int | float | str) -> int:
    """The raw value to write: an integer (0x.., 0b.. too), an enumeration name, or for
    Q16.16 registers a decimal fraction; checked against the register's range."""
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, str):
        text = value.strip()
        enum = ENUMS.get(ref.name)
        if enum is not None and text.upper() in enum.__members__:
            value = int(enum[text.upper()])
        else:
            try:
                value = int(text, 0)
            except ValueError:
                try:
                    value = float(text)
                except ValueError:
                    names = f", or one of {', '.join(enum.__members__)}" if enum else ""
                    raise RegisterError(f"{ref.name}: {text!r} is not a number{names}") from None
    if isinstance(value, float):
        if not ref.q16:
            raise RegisterError(f"{ref.name}: {value!r} is not an integer (decimal values are taken only by "
                                f"Q16.16 registers such as SIGMA)")
        value = round(value * Q16)
    if not 0 <= value <= ref.max_value:
        shown = f" = {value / Q16:g} in Q16.16" if ref.q16 else ""
        limit = (f"0..{ref.max_value} (0x{ref.max_value:X}"
                 + (f", {ref.max_value / Q16:g} in Q16.16)" if ref.q16 else ")"))
        raise RegisterError(f"{ref.name}: value {value}{shown} out of range {limit}")
    return value


def check_writable(ref: RegisterRef) -> None:
    if ref.register.access == Access.RO:
        raise RegisterError(f"{ref.register.name} is read-only (RO); it cannot be written")


def read(dev, ref: RegisterRef) -> int:
    """The register's (or field's) current value."""
    return ref.extract(dev.read_register(ref.register.name))


def write(dev, ref: RegisterRef, value: int) -> int:
    """Write a checked raw value; a field of a RW register is read, modified and written
    back, a field of a W1C or write-only register is written alone (its other bits 0, so
    nothing else is cleared or strobed). Returns the word written."""
    check_writable(ref)
    reg = ref.register
    if ref.field is None:
        word = value
    elif reg.access == Access.RW:
        word = (dev.read_register(reg.name) & ~ref.field.mask) | (value << ref.field.lsb)
    else:
        word = value << ref.field.lsb
    dev.write_register(reg.name, word)
    return word


def describe_value(ref: RegisterRef, value: int) -> str:
    """What a value means: its enumeration name, its Q16.16 fraction, its fields."""
    enum = ENUMS.get(ref.name)
    if enum is not None:
        try:
            return enum(value).name
        except ValueError:
            return f"(not a {enum.__name__})"
    if ref.q16:
        return f"{value / Q16:.4f} (Q16.16)"
    if ref.field is None and ref.register.fields:
        return " ".join(f"{f.name}={describe_field(RegisterRef(ref.register, f), value)}" for f in ref.register.fields)
    return ""


def describe_field(ref: RegisterRef, register_value: int) -> str:
    v = ref.extract(register_value)
    enum = ENUMS.get(ref.name)
    if enum is not None and v in enum._value2member_map_:
        return f"{v}({enum(v).name})"
    return str(v)


@dataclass(frozen=True)
class RegisterValue:
    register: Register
    value: int | None  # None: write-only, nothing to read

    def as_dict(self) -> dict:
        ref = RegisterRef(self.register)
        d = dict(name=self.register.name, offset=self.register.offset, access=self.register.access.value,
                 value=self.value)
        if self.value is not None:
            d["decoded"] = describe_value(ref, self.value)
            if self.register.fields:
                d["fields"] = {f.name: RegisterRef(self.register, f).extract(self.value) for f in self.register.fields}
        return d

    def line(self) -> str:
        r = self.register
        if self.value is None:
            return f"0x{r.offset:03X}  {r.name:<{_NAME_WIDTH}}  {r.access.value:<3}  {'-':>10}  (write-only)"
        return (f"0x{r.offset:03X}  {r.name:<{_NAME_WIDTH}}  {r.access.value:<3}  0x{self.value:08X}  "
                f"{describe_value(RegisterRef(r), self.value)}").rstrip()


def dump(dev) -> list[RegisterValue]:
    """Every register of the map with its current value, in address order."""
    return [RegisterValue(r, None if r.access == Access.WO else dev.read_register(r.name))
            for r in sorted(REGISTERS, key=lambda r: r.offset)]


def combined_counters(values: list[RegisterValue]) -> dict[str, int]:
    """64-bit counters (CNT_X_LO / CNT_X_HI pairs) of a dump, by their base name."""
    by_name = {v.register.name: v.value for v in values}
    return {name[:-3]: by_name[name] | by_name[name[:-3] + "_HI"] << 32
            for name in by_name if name.endswith("_LO") and name[:-3] + "_HI" in by_name}


def identity_fields(dev) -> dict[str, int]:
    """IDENTIFY's fields by name, nested ones (a geometry) flattened: every field the chip reports,
    so a field added to the reply shows up without a change here."""
    out: dict[str, int] = {}

    def flatten(obj) -> None:
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if dataclasses.is_dataclass(v):
                flatten(v)
            else:
                out[f.name] = v
    flatten(dev.identity)
    return out
