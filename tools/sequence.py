"""Programming sequences as data: a YAML file of steps run on a chip, with a pass/fail report.

A sequence is what a firmware developer would otherwise script by hand: register writes,
cell writes, waits on status bits, expected reads, loops. Written as data it runs the
same in process (``emu://``), over a pty and over TCP, and a failure names the file, the
line and the step::

    name: program a region and check the counters
    steps:
      - reset:
      - write: {VERIFY_TOL: 0.06, VERIFY_MAX_ITER: 16}
      - cells_write: {array: 0, rows: 32, cols: 32, targets: {random: 1}, verify: true}
        expect: {verify_failures: 0}
      - counters: {cells_written: 1024}
      - wait: STATUS.BUSY
        equals: 0
        timeout: 2

YAML rather than TOML: PyYAML's composer gives every mapping and key the line it was
written on, so an error can say "bringup.yaml:14: step 5 (wait)"; stdlib tomllib
returns bare dicts without positions, and a loop's nested step list would be an
array of tables there. The file format is described step by step in STEP_HELP.
"""

from __future__ import annotations

import ast
import operator
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from nvcim.firmware_emu.contract.protocol import CellQuantity, ErrorCode
from nvcim.firmware_emu.contract.registers import BY_NAME

from . import regs

DEFAULT_TIMEOUT = 5.0  # seconds a wait or op_wait step waits unless it says otherwise
COUNTERS = tuple(name[4:-3].lower() for name in BY_NAME if name.startswith("CNT_") and name.endswith("_LO"))
REGION_KEYS = ("array", "row", "col", "rows", "cols")
QUANTITIES = tuple(q.name.lower() for q in CellQuantity) + ("deviation",)  # deviation: conductance - target
STATS = ("mean", "std", "min", "max", "abs_max")
WRITE_STATS = ("cells", "write_pulses", "read_pulses", "verify_failures")
COMMON_OPTIONS = ("name", "expect_error")

STEP_HELP = """\
Steps (one action key each; `name:` labels a step, `expect_error: CODE` makes a chip error its pass):
  identify: {FIELD: VALUE, ...}         IDENTIFY, checking the fields given (chip_id, rows, ...)
  read: REG[.FIELD]   expect: V|[LO,HI]   mask: M
  write: {REG: V, REG.FIELD: V, ...}      in order; V an integer, an enum name, or a fraction for Q16.16
  wait: REG[.FIELD]   equals: V   mask: M   timeout: S (default 5)   poll: S (default 0.001)
  erase: {array, row, col, rows, cols, arrays: N|all, background}   default: all of array 0
  cells_write: {array, row, col, rows, cols, targets, verify, background}   expect: {cells|write_pulses|
               read_pulses|verify_failures: V|[LO,HI]}; targets: LEVEL, [[...], ...] or {random: SEED}
  cells_read: {array, row, col, rows, cols, quantity}   expect: {mean|std|min|max|abs_max: V|[LO,HI]}
              save: FILE.npy|FILE.csv; quantity: conductance, noise, target, program_time, deviation (g - target)
  counters: {write_pulses|read_pulses|verify_iters|verify_fails|cells_written|...: V|[LO,HI]}
  op_wait: {timeout: S}   expect: done|aborted|failed       the background operation started last
  abort:                     CONTROL.ABORT, then wait until STATUS.BUSY clears
  reset:                     CONTROL.SOFT_RESET
  sleep: SECONDS
  repeat: N   as: VAR   steps: [...]       loop; ${VAR * 8} in a value is computed per iteration
Cell values (targets, conductance, noise) are in cell-state units: g_max = 2^K - 1 (3 for 2-bit cells).
A region's rows and cols default to the rest of the array from row and col.
"""


class SequenceError(ValueError):
    """A sequence file that cannot run as written; the message names the file, line and step."""


class StepFailed(Exception):
    """A step ran and its check failed; the message says what was expected and what came."""


class _Problem(Exception):
    """A value in a step is wrong; ``line``: where, when more precise than the step's line."""

    def __init__(self, message: str, line: int | None = None):
        super().__init__(message)
        self.line = line


# -- YAML with line numbers ----------------------------------------------------------------------
class _Map(dict):
    line: int = 0
    key_lines: dict


class _List(list):
    line: int = 0


class _Loader(yaml.SafeLoader):
    """Safe YAML whose mappings and lists know their line; a repeated key is an error."""


def _construct_map(loader: _Loader, node: yaml.MappingNode) -> _Map:
    loader.flatten_mapping(node)
    out = _Map()
    out.line, out.key_lines = node.start_mark.line + 1, {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in out:
            raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice", key_node.start_mark)
        out[key] = loader.construct_object(value_node, deep=True)
        out.key_lines[key] = key_node.start_mark.line + 1
    return out


def _construct_list(loader: _Loader, node: yaml.SequenceNode) -> _List:
    out = _List(loader.construct_object(child, deep=True) for child in node.value)
    out.line = node.start_mark.line + 1
    return out


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_map)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_list)


# -- the sequence ---------------------------------------------------------------------------------
@dataclass
class Step:
    action: str
    value: Any                 # what follows the action key
    options: dict[str, Any]    # the step's other keys
    line: int
    number: str                # "3", or "5.2" inside a loop
    key_lines: dict[str, int] = field(default_factory=dict)
    steps: list[Step] = field(default_factory=list)  # a loop's body

    @property
    def label(self) -> str:
        if "name" in self.options:
            return str(self.options["name"])
        if isinstance(self.value, str | int | float) and not isinstance(self.value, bool):
            return f"{self.action} {self.value}"
        return self.action


@dataclass
class Sequence:
    path: Path
    name: str
    steps: list[Step]
    device: str | None = None      # the chip to use when none is given
    description: str = ""

    def where(self, step: Step, line: int | None = None) -> str:
        return f"{self.path}:{line or step.line}: step {step.number} ({step.label})"


def load(path: str | Path) -> Sequence:
    """Read and check a sequence file; every error names the file, line and step."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise SequenceError(f"{path}: {e.strerror}") from None
    try:
        doc = yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f":{mark.line + 1}" if mark else ""
        raise SequenceError(f"{path}{line}: not valid YAML: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise SequenceError(f"{path}: not valid YAML: {e}") from None
    if isinstance(doc, _List):
        doc_steps, meta = doc, _Map()
    elif isinstance(doc, _Map):
        meta = doc
        unknown = set(doc) - {"name", "description", "device", "steps"}
        if unknown:
            key = sorted(unknown, key=str)[0]
            raise SequenceError(f"{path}:{doc.key_lines[key]}: unknown top-level key {key!r} "
                                f"(known: name, description, device, steps)")
        doc_steps = doc.get("steps")
        if not isinstance(doc_steps, _List) or not doc_steps:
            raise SequenceError(f"{path}:{doc.key_lines.get('steps', doc.line)}: 'steps' must be a non-empty "
                                f"list of steps")
    else:
        raise SequenceError(f"{path}:1: a sequence is a mapping with 'steps' (or a list of steps)")
    seq = Sequence(path, str(meta.get("name", path.stem)), [], meta.get("device"), str(meta.get("description", "")))
    seq.steps = _parse_steps(seq, doc_steps, "")
    return seq


def _parse_steps(seq: Sequence, items: _List, prefix: str) -> list[Step]:
    steps = []
    for index, item in enumerate(items, start=1):
        number = f"{prefix}{index}"
        if not isinstance(item, _Map):
            raise SequenceError(f"{seq.path}:{getattr(items, 'line', 0)}: step {number}: each step is a mapping "
                                f"such as '- read: STATUS', got {item!r}")
        actions = [k for k in item if k in ACTIONS]
        if len(actions) != 1:
            what = "no action" if not actions else f"several actions ({', '.join(actions)})"
            raise SequenceError(f"{seq.path}:{item.line}: step {number}: {what}; a step has exactly one of "
                                f"{', '.join(ACTIONS)}")
        action = actions[0]
        options = {k: v for k, v in item.items() if k != action}
        step = Step(action, item[action], options, item.line, number, item.key_lines)
        allowed = ACTIONS[action].options + COMMON_OPTIONS
        for key in options:
            if key not in allowed:
                raise SequenceError(f"{seq.where(step, item.key_lines[key])}: option {key!r} is not known "
                                    f"for {action} (known: {', '.join(allowed)})")
        if action == "repeat":
            body = options.get("steps")
            if not isinstance(body, _List) or not body:
                raise SequenceError(f"{seq.where(step)}: repeat needs 'steps:', a non-empty list of steps")
            step.steps = _parse_steps(seq, body, f"{number}.")
        try:
            if "expect_error" in options:
                _error_code(options["expect_error"])
            if not _has_variables(item):
                ACTIONS[action].check(step.value, step.options)
        except _Problem as e:
            raise SequenceError(f"{seq.where(step, e.line)}: {e}") from None
        steps.append(step)
    return steps


# -- values -------------------------------------------------------------------------------------
_VAR = re.compile(r"\$\{([^}]*)\}")
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
        ast.Div: operator.truediv, ast.Mod: operator.mod, ast.Pow: operator.pow, ast.USub: operator.neg,
        ast.UAdd: operator.pos}


def _has_variables(value: Any) -> bool:
    if isinstance(value, str):
        return bool(_VAR.search(value))
    if isinstance(value, dict):
        return any(_has_variables(v) for k, v in value.items() if k != "steps")
    if isinstance(value, list):
        return any(_has_variables(v) for v in value)
    return False


def _evaluate(expr: str, env: dict[str, int]) -> int | float:
    """Arithmetic on numbers and loop variables, nothing else."""
    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            return node.value
        if isinstance(node, ast.Name):
            if node.id not in env:
                raise _Problem(f"${{{expr}}}: no loop variable {node.id!r} here"
                               + (f" (defined: {', '.join(env)})" if env else ""))
            return env[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.operand))
        raise _Problem(f"${{{expr}}}: only numbers, loop variables and + - * / // % ** are allowed")
    try:
        return ev(ast.parse(expr.strip(), mode="eval"))
    except SyntaxError:
        raise _Problem(f"${{{expr}}} is not an arithmetic expression") from None
    except ZeroDivisionError:
        raise _Problem(f"${{{expr}}} divides by zero") from None


def _substitute(value: Any, env: dict[str, int]) -> Any:
    if isinstance(value, str):
        whole = _VAR.fullmatch(value.strip())
        if whole:
            return _evaluate(whole.group(1), env)
        return _VAR.sub(lambda m: str(_evaluate(m.group(1), env)), value)
    if isinstance(value, dict):
        return {k: v if k == "steps" else _substitute(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, env) for v in value]
    return value


def _number(value: Any, what: str, integer: bool = False, minimum: float | None = 0) -> int | float:
    if isinstance(value, str):
        try:
            value = int(value, 0) if integer else float(value)
        except ValueError:
            raise _Problem(f"{what}: {value!r} is not a number") from None
    if isinstance(value, bool) or not isinstance(value, int | float) or (integer and not isinstance(value, int)):
        raise _Problem(f"{what}: expected {'an integer' if integer else 'a number'}, got {value!r}")
    if minimum is not None and value < minimum:
        raise _Problem(f"{what}: {value} is below {minimum}")
    return value


def _expectation(value: Any, what: str) -> tuple[float, float]:
    """An exact value or an inclusive [LO, HI] range."""
    if isinstance(value, list):
        if len(value) != 2:
            raise _Problem(f"{what}: a range is [LO, HI], got {value!r}")
        lo, hi = (_number(v, what, minimum=None) for v in value)
        if lo > hi:
            raise _Problem(f"{what}: range [{lo}, {hi}] is empty")
        return lo, hi
    v = _number(value, what, minimum=None)
    return v, v


def _check_expected(what: str, got: float, want: tuple[float, float]) -> str:
    lo, hi = want
    if not lo <= got <= hi:
        expected = f"{lo:g}" if lo == hi else f"[{lo:g}, {hi:g}]"
        raise StepFailed(f"{what} is {got:g}, expected {expected}")
    return f"{what}={got:g}"


def _mapping(value: Any, what: str, keys: tuple[str, ...], optional: bool = True) -> dict:
    if value is None and optional:
        return {}
    if not isinstance(value, dict):
        raise _Problem(f"{what}: expected a mapping of {', '.join(keys)}, got {value!r}")
    for key in value:
        if key not in keys:
            line = getattr(value, "key_lines", {}).get(key)
            raise _Problem(f"{what}: {key!r} is not one of {', '.join(keys)}", line)
    return value


def _error_code(value: Any) -> ErrorCode:
    name = str(value).upper()
    if name not in ErrorCode.__members__:
        raise _Problem(f"expect_error: {value!r} is not a chip error code (one of {', '.join(ErrorCode.__members__)})")
    return ErrorCode[name]


def _ref(value: Any) -> regs.RegisterRef:
    if not isinstance(value, str):
        raise _Problem(f"expected a register name such as STATUS or STATUS.BUSY, got {value!r}")
    try:
        return regs.resolve(value)
    except regs.RegisterError as e:
        raise _Problem(str(e)) from None


def _reg_value(ref: regs.RegisterRef, value: Any) -> int:
    try:
        return regs.parse_value(ref, value)
    except regs.RegisterError as e:
        raise _Problem(str(e)) from None


# -- actions ------------------------------------------------------------------------------------
class Runner:
    """Runs a sequence's steps on one open device; remembers the background operation started last."""

    def __init__(self, dev, out_dir: Path, echo: Callable[[str], None] | None = None):
        self.dev, self.out_dir, self.echo = dev, out_dir, echo
        self.operation = None

    def identity(self) -> dict[str, int]:
        return regs.identity_fields(self.dev)


@dataclass(frozen=True)
class Action:
    options: tuple[str, ...]
    check: Callable[[Any, dict], Any]                      # static check of value and options
    run: Callable[[Runner, Any, dict], str]                # -> a short result line


def _check_identify(value, options):
    if value is not None and not isinstance(value, dict):
        raise _Problem(f"identify: expected nothing or a mapping of IDENTIFY fields, got {value!r}")
    for k, v in (value or {}).items():
        _expectation(v, f"identify {k}")


def _run_identify(runner: Runner, value, options) -> str:
    ident = runner.identity()
    checked = []
    for k, v in (value or {}).items():
        if k not in ident:
            raise _Problem(f"identify: the chip reports no field {k!r} (it reports {', '.join(ident)})")
        checked.append(_check_expected(k, ident[k], _expectation(v, k)))
    return " ".join(f"{k}=0x{v:X}" if k.endswith("id") or k == "version" else f"{k}={v}" for k, v in ident.items())


def _check_read(value, options):
    ref = _ref(value)
    _read_expectation(ref, options)


def _read_expectation(ref: regs.RegisterRef, options) -> tuple[tuple[float, float] | None, int]:
    mask = _number(options.get("mask", regs.WORD_MAX), "mask", integer=True)
    want = options.get("expect")
    if want is None:
        return None, mask
    if isinstance(want, list):
        return _expectation(want, "expect"), mask
    v = _reg_value(ref, want) if not isinstance(want, int | float) or isinstance(want, bool) or ref.q16 \
        else _number(want, "expect", integer=True)
    return (v, v), mask


def _run_read(runner: Runner, value, options) -> str:
    ref = _ref(value)
    want, mask = _read_expectation(ref, options)
    got = regs.read(runner.dev, ref)
    shown = f"{ref.name} = 0x{got:X}" + (f" {d}" if (d := regs.describe_value(ref, got)) else "")
    if want is not None:
        masked = got & mask
        lo, hi = want
        if mask != regs.WORD_MAX:
            lo, hi = int(lo) & mask, int(hi) & mask
        if not lo <= masked <= hi:
            expected = f"0x{int(lo):X}" if lo == hi else f"[0x{int(lo):X}, 0x{int(hi):X}]"
            raise StepFailed(f"{shown}, expected {expected}" + (f" under mask 0x{mask:X}" if mask != regs.WORD_MAX
                                                               else ""))
    return shown


def _check_write(value, options):
    if not isinstance(value, dict) or not value:
        raise _Problem(f"write: expected a mapping REGISTER[.FIELD]: VALUE, got {value!r}")
    for name, v in value.items():
        ref = _ref(name)
        try:
            regs.check_writable(ref)
        except regs.RegisterError as e:
            raise _Problem(str(e), value.key_lines.get(name) if hasattr(value, "key_lines") else None) from None
        _reg_value(ref, v)


def _run_write(runner: Runner, value, options) -> str:
    done = []
    for name, v in value.items():
        ref = _ref(name)
        raw = _reg_value(ref, v)
        regs.write(runner.dev, ref, raw)
        done.append(f"{ref.name}=0x{raw:X}")
    return " ".join(done)


def _check_wait(value, options):
    ref = _ref(value)
    if "equals" not in options:
        raise _Problem("wait: needs 'equals:', the value to wait for")
    _reg_value(ref, options["equals"])
    _number(options.get("mask", regs.WORD_MAX), "mask", integer=True)
    _number(options.get("timeout", DEFAULT_TIMEOUT), "timeout")
    _number(options.get("poll", 0.001), "poll")


def _run_wait(runner: Runner, value, options) -> str:
    ref = _ref(value)
    want = _reg_value(ref, options["equals"])
    mask = _number(options.get("mask", regs.WORD_MAX), "mask", integer=True)
    timeout = _number(options.get("timeout", DEFAULT_TIMEOUT), "timeout")
    poll = _number(options.get("poll", 0.001), "poll")
    start = time.monotonic()
    while True:
        got = regs.read(runner.dev, ref)
        if got & mask == want & mask:
            return f"{ref.name} == 0x{want:X} after {time.monotonic() - start:.3f} s"
        if time.monotonic() - start >= timeout:
            raise StepFailed(f"timed out after {timeout:g} s: {ref.name} is still 0x{got:X}, waited for 0x{want:X}")
        time.sleep(poll)


def _region(runner: Runner | None, value: dict) -> dict[str, int]:
    r = {k: _number(value[k], k, integer=True) for k in REGION_KEYS if k in value}
    if runner is not None:
        ident = runner.identity()
        r.setdefault("array", 0)
        r.setdefault("row", 0)
        r.setdefault("col", 0)
        r.setdefault("rows", ident["rows"] - r["row"])
        r.setdefault("cols", ident["cols"] - r["col"])
    return r


def _flag(value: dict, key: str) -> bool:
    v = value.get(key, False)
    if not isinstance(v, bool):
        raise _Problem(f"{key}: expected true or false, got {v!r}")
    return v


def _array_count(value: dict, runner: Runner | None) -> int | None:
    """``arrays``: a count, or ``all`` (every array from ``array`` on; None until the chip is known)."""
    count = value.get("arrays", 1)
    if count == "all":
        return None if runner is None else runner.identity()["arrays"] - _number(value.get("array", 0), "array",
                                                                                 integer=True)
    return _number(count, "arrays (a count or all)", integer=True, minimum=1)


def _check_erase(value, options):
    value = _mapping(value, "erase", REGION_KEYS + ("arrays", "background"))
    _region(None, value)
    _array_count(value, None)
    _flag(value, "background")


def _run_erase(runner: Runner, value, options) -> str:
    value = _mapping(value, "erase", REGION_KEYS + ("arrays", "background"))
    r = _region(runner, value)
    arrays = _array_count(value, runner)
    op = runner.dev.erase(r["array"], r["row"], r["col"], r["rows"], r["cols"], arrays=arrays,
                          background=_flag(value, "background"))
    where = f"array {r['array']}" if arrays == 1 else f"arrays {r['array']}..{r['array'] + arrays - 1}"
    if op is not None:
        runner.operation = op
        return f"erase of {where} started in the background"
    return f"erased {r['rows']}x{r['cols']} cells of {where}"


CELLS_WRITE_KEYS = REGION_KEYS + ("targets", "verify", "background")


def _targets(spec: Any, shape: tuple[int, int] | None, levels: int | None) -> np.ndarray | None:
    """LEVEL, a list of rows, or {random: SEED}; None while the region's size is not known."""
    if isinstance(spec, list):
        try:
            t = np.array(spec, dtype=np.int64)
        except (ValueError, TypeError):
            raise _Problem("targets: a list of rows of integer levels, all rows the same length") from None
        if t.ndim != 2:
            raise _Problem(f"targets: a list of rows of integer levels, got an array of shape {t.shape}")
        return t
    if isinstance(spec, dict):
        _mapping(spec, "targets", ("random",))
        seed = _number(spec.get("random"), "targets.random", integer=True)
        return None if shape is None else np.random.default_rng(seed).integers(0, levels, size=shape)
    level = _number(spec, "targets", integer=True)
    return None if shape is None else np.full(shape, level, dtype=np.int64)


def _check_cells_write(value, options):
    value = _mapping(value, "cells_write", CELLS_WRITE_KEYS, optional=False)
    if "targets" not in value:
        raise _Problem("cells_write: needs 'targets:' (a level, a list of rows, or {random: SEED})")
    _region(None, value)
    _targets(value["targets"], None, None)
    _flag(value, "verify")
    _flag(value, "background")
    for k, v in _mapping(options.get("expect"), "expect", WRITE_STATS).items():
        _expectation(v, k)


def _run_cells_write(runner: Runner, value, options) -> str:
    value = _mapping(value, "cells_write", CELLS_WRITE_KEYS, optional=False)
    explicit = isinstance(value["targets"], list)
    r = _region(runner, value)
    levels = 1 << runner.identity()["cell_bits"]
    targets = _targets(value["targets"], (r["rows"], r["cols"]), levels)
    if explicit and ("rows" in value or "cols" in value) and targets.shape != (r["rows"], r["cols"]):
        raise _Problem(f"cells_write: targets are {targets.shape[0]}x{targets.shape[1]}, the region "
                       f"{r['rows']}x{r['cols']}")
    h, w = targets.shape
    where = f"array {r['array']} rows {r['row']}..{r['row'] + h - 1} cols {r['col']}..{r['col'] + w - 1}"
    result = runner.dev.write_cells(r["array"], r["row"], r["col"], targets, verify=_flag(value, "verify"),
                                    background=_flag(value, "background"))
    if _flag(value, "background"):
        runner.operation = result
        return f"write of {where} started in the background"
    for k, v in _mapping(options.get("expect"), "expect", WRITE_STATS).items():
        _check_expected(k, getattr(result, k), _expectation(v, k))
    return f"wrote {where}: " + " ".join(f"{k}={getattr(result, k)}" for k in WRITE_STATS)


CELLS_READ_KEYS = REGION_KEYS + ("quantity",)


def _check_cells_read(value, options):
    value = _mapping(value, "cells_read", CELLS_READ_KEYS)
    _region(None, value)
    if str(value.get("quantity", "conductance")).lower() not in QUANTITIES:
        raise _Problem(f"cells_read: quantity {value['quantity']!r} is not one of {', '.join(QUANTITIES)}")
    for k, v in _mapping(options.get("expect"), "expect", STATS).items():
        _expectation(v, k)
    save = options.get("save")
    if save is not None and Path(str(save)).suffix not in (".npy", ".csv"):
        raise _Problem(f"save: {save!r} must end in .npy or .csv")


def _run_cells_read(runner: Runner, value, options) -> str:
    value = _mapping(value, "cells_read", CELLS_READ_KEYS)
    r = _region(runner, value)
    quantity = str(value.get("quantity", "conductance")).lower()
    args = (r["array"], r["row"], r["col"], r["rows"], r["cols"])
    if quantity == "deviation":
        data = (runner.dev.read_cells(*args, CellQuantity.CONDUCTANCE)
                - runner.dev.read_cells(*args, CellQuantity.TARGET))
    else:
        data = runner.dev.read_cells(*args, CellQuantity[quantity.upper()])
    stats = dict(mean=float(data.mean()), std=float(data.std()), min=float(data.min()), max=float(data.max()),
                 abs_max=float(np.abs(data).max()))
    shown = [_check_expected(k, stats[k], _expectation(v, k))
             for k, v in _mapping(options.get("expect"), "expect", STATS).items()]
    text = f"{quantity} of {r['rows']}x{r['cols']} cells: " + (" ".join(shown) or
                                                                f"mean={stats['mean']:.4g} std={stats['std']:.4g}")
    if options.get("save") is not None:
        path = runner.out_dir / str(options["save"])
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".npy":
            np.save(path, data)
        else:
            np.savetxt(path, data, delimiter=",", fmt="%.6g")
        text += f"; saved to {path}"
    return text


def _check_counters(value, options):
    for k, v in _mapping(value, "counters", COUNTERS, optional=False).items():
        _expectation(v, k)


def _run_counters(runner: Runner, value, options) -> str:
    counters = runner.dev.counters()
    return " ".join(_check_expected(k, counters[k], _expectation(v, k)) for k, v in value.items())


OP_OUTCOMES = ("done", "aborted", "failed")


def _check_op_wait(value, options):
    _number(_mapping(value, "op_wait", ("timeout",)).get("timeout", DEFAULT_TIMEOUT), "timeout")
    if str(options.get("expect", "done")).lower() not in OP_OUTCOMES:
        raise _Problem(f"expect: {options['expect']!r} is not one of {', '.join(OP_OUTCOMES)}")


def _run_op_wait(runner: Runner, value, options) -> str:
    from nvcim.driver import DeviceError, LinkTimeout

    timeout = _number(_mapping(value, "op_wait", ("timeout",)).get("timeout", DEFAULT_TIMEOUT), "timeout")
    want = str(options.get("expect", "done")).lower()
    op = runner.operation
    if op is None:
        raise _Problem("op_wait: no background operation was started before it (background: true)")
    try:
        result = op.wait(timeout=timeout)
        outcome, detail = "done", "" if result is None else " ".join(f"{k}={v}" for k, v in vars(result).items())
    except LinkTimeout as e:
        raise StepFailed(f"timed out: {e}") from None
    except DeviceError as e:
        outcome = "aborted" if e.code == ErrorCode.ABORTED else "failed"
        detail = e.chip_message
    runner.operation = None
    if outcome != want:
        raise StepFailed(f"{op.command.name} ended {outcome}, expected {want}: {detail}")
    return f"{op.command.name} {outcome}: {detail}".rstrip(": ")


def _check_none(action: str):
    def check(value, options):
        if value is not None:
            raise _Problem(f"{action}: takes no value, got {value!r}")
    return check


def _run_abort(runner: Runner, value, options) -> str:
    runner.dev.abort()
    return "CONTROL.ABORT written; STATUS.BUSY = 0"


def _run_reset(runner: Runner, value, options) -> str:
    runner.dev.reset()
    return "CONTROL.SOFT_RESET written"


def _check_sleep(value, options):
    _number(value, "sleep")


def _run_sleep(runner: Runner, value, options) -> str:
    time.sleep(_number(value, "sleep"))
    return f"slept {value} s"


def _check_repeat(value, options):
    _number(value, "repeat", integer=True, minimum=1)
    name = options.get("as")
    if name is not None and not (isinstance(name, str) and name.isidentifier()):
        raise _Problem(f"as: {name!r} is not a variable name")


ACTIONS: dict[str, Action] = {
    "identify": Action((), _check_identify, _run_identify),
    "read": Action(("expect", "mask"), _check_read, _run_read),
    "write": Action((), _check_write, _run_write),
    "wait": Action(("equals", "mask", "timeout", "poll"), _check_wait, _run_wait),
    "erase": Action((), _check_erase, _run_erase),
    "cells_write": Action(("expect",), _check_cells_write, _run_cells_write),
    "cells_read": Action(("expect", "save"), _check_cells_read, _run_cells_read),
    "counters": Action((), _check_counters, _run_counters),
    "op_wait": Action(("expect",), _check_op_wait, _run_op_wait),
    "abort": Action((), _check_none("abort"), _run_abort),
    "reset": Action((), _check_none("reset"), _run_reset),
    "sleep": Action((), _check_sleep, _run_sleep),
    "repeat": Action(("steps", "as"), _check_repeat, lambda runner, value, options: ""),
}


# -- running --------------------------------------------------------------------------------------
@dataclass
class StepResult:
    step: Step
    ok: bool
    detail: str
    where: str          # file:line: step N (label), with the loop iteration if any
    seconds: float


@dataclass
class Report:
    sequence: Sequence
    results: list[StepResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return all(r.ok for r in self.results)

    @property
    def failure(self) -> StepResult | None:
        return next((r for r in self.results if not r.ok), None)

    def summary(self) -> str:
        done = sum(r.ok for r in self.results)
        if self.passed:
            return f"PASS: {self.sequence.path}: {done} steps in {self.seconds:.2f} s"
        f = self.failure
        return f"FAIL: {f.where}: {f.detail}  [{done} steps passed before it, {self.seconds:.2f} s]"


def run(seq: Sequence, dev, out_dir: str | Path = ".", echo: Callable[[str], None] | None = None) -> Report:
    """Run every step in order on ``dev`` until one fails; ``echo`` gets a line per step.

    A background operation still running when the sequence stops is aborted, so the chip
    is left idle for whoever comes next.
    """
    from nvcim.driver import DeviceError, NvcimError

    runner = Runner(dev, Path(out_dir), echo)
    report = Report(seq)
    start = time.monotonic()

    def do(steps: list[Step], env: dict[str, int], suffix: str) -> bool:
        for step in steps:
            where = seq.where(step) + suffix
            t0 = time.monotonic()
            ok, detail = True, ""
            try:
                value, options = _substitute(step.value, env), _substitute(
                    {k: v for k, v in step.options.items() if k != "steps"}, env)
                if step.action == "repeat":
                    var = step.options.get("as")
                    count = _number(value, "repeat", integer=True, minimum=1)
                    if echo:
                        echo(f"  ...   {step.number:<6} line {step.line:<4} repeat {count} times")
                    for i in range(count):
                        inner = {**env, var: i} if var else env
                        if not do(step.steps, inner, suffix + (f" [{var}={i}]" if var else f" [iteration {i + 1}]")):
                            return False
                    continue
                expected = _error_code(options["expect_error"]) if "expect_error" in options else None
                try:
                    detail = ACTIONS[step.action].run(runner, value, options)
                    if expected is not None:
                        raise StepFailed(f"expected the chip to refuse with {expected.name}, it accepted: {detail}")
                except DeviceError as e:
                    if expected is None or e.code != expected:
                        raise StepFailed(str(e)) from None
                    detail = f"refused as expected: {e}"
            except _Problem as e:
                ok, detail = False, str(e)
                where = seq.where(step, e.line) + suffix
            except StepFailed as e:
                ok, detail = False, str(e)
            except NvcimError as e:
                ok, detail = False, str(e)
            result = StepResult(step, ok, detail, where, time.monotonic() - t0)
            report.results.append(result)
            if echo:
                echo(f"  {'ok' if ok else 'FAIL':<5} {step.number:<6} line {step.line:<4} "
                     f"{step.label}{suffix}: {detail}")
            if not ok:
                return False
        return True

    try:
        do(seq.steps, {}, "")
    finally:
        if runner.operation is not None:
            try:
                if runner.operation.busy:
                    dev.abort()
                    if echo:
                        echo("  (the background operation still running was aborted)")
            except NvcimError as e:  # the report already has the failure that matters
                if echo:
                    echo(f"  (could not abort the background operation still running: {e})")
        report.seconds = time.monotonic() - start
    return report
