"""Splitting a model too big for one chip into consecutive stages, one program per chip.

A stage is a run of consecutive instructions (in the lowering's order, a topological
order of the graph) whose crossbar layers fit one chip. Stages are cut greedily: each
instruction joins the current stage unless the tiles of its new layers no longer fit
there (placed first-fit exactly as ``place`` will place them), and then it opens the next
stage. Digital instructions fit anywhere, so they stay with the stage before them. A
weight used by instructions in two stages is placed on both chips.

Each stage is an ordinary program: its inputs are the tensors it reads that earlier
stages (or the host) computed, its outputs those that later stages read or that the model
returns, all named as in the whole model, so a host passes activations from chip to chip
by name. Layers are quantised per ONNX tensor exactly as on one chip, so a partitioned
model computes what the single-chip program would.

A layer too big for one chip by itself (ResNet-50's 3x3 convolutions of 512 channels
need 288 arrays of 256x256) is cut by output columns into parts that each fit one; each
part is a layer of its own, the parts' outputs are joined by a CONCAT, and the parts
keep the whole layer's quantisation scale, so the results do not change.

With fewer chips than stages nothing fits: ``CapacityError`` says how many are needed.
With more, the stages are balanced: the per-chip array budget is lowered (bisection) to
the smallest that still needs no more than the chips given; with exactly as many, each
chip is filled in turn.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from nvcim.firmware_emu.contract.program_format import Instr, Opcode, Program

from .lower import Lowering
from .mapping import CapacityError, Placer
from .quantize import Quantized


@dataclass
class Stage:
    """Which of the lowering's instructions and layers one chip runs."""

    instructions: list[int] = field(default_factory=list)  # indices into lo.instructions
    layers: list[str] = field(default_factory=list)        # layer names, in the lowering's order
    placer: Placer | None = None


def instruction_layers(lo: Lowering, ins: Instr) -> list[str]:
    """The layer names an instruction reads: one for MATMUL, ``group`` for CONV, none for digital ops."""
    if ins.layer < 0:
        return []
    count = ins.attrs["group"][0] if ins.op == Opcode.CONV else 1
    names = list(lo.weights)
    return names[ins.layer:ins.layer + count]


def _tile_blocks(lo: Lowering, quantized: dict[str, Quantized], placer: Placer) -> dict[str, list]:
    """Per layer, the (sign, block) tiles ``place`` gives it."""
    from . import _has_sign

    return {name: [(sign, block) for sign in (1, -1) for block in placer.blocks(*w.shape)
                   if _has_sign(quantized[name].signs, block, sign)]
            for name, w in lo.weights.items()}


def _copy(placer: Placer) -> Placer:
    new = Placer(placer.rows, placer.cols, placer.slices)
    new.skyline, new.lowest = placer.skyline.copy(), placer.lowest.copy()
    return new


def _fits(placer: Placer, tiles: list, budget: int) -> Placer | None:
    """A copy of ``placer`` with ``tiles`` placed, or None if that takes more than ``budget`` arrays."""
    trial = _copy(placer)
    for sign, block in tiles:
        trial.place(sign, block)
        if trial.arrays_needed > budget:
            return None
    return trial


def plan(lo: Lowering, target, quantized: dict[str, Quantized], budget: int | None = None,
         bases: list[Program] | None = None, blocks: dict[str, list] | None = None) -> list[Stage]:
    """Cut the instructions into stages whose layers fit ``budget`` arrays each (default: the chip's).

    ``bases``: the programs already on the chips (incremental mode, e.g. adding a TSB): a
    layer one of them holds stays on that chip, keeping its tiles, new layers go to the
    stage their instruction falls in, and there are exactly ``len(bases)`` stages.
    """
    budget = target.arrays if budget is None else budget
    slices = target.weight_bits // target.cell_bits
    fresh = Placer(target.rows, target.cols, slices)
    blocks = _tile_blocks(lo, quantized, fresh) if blocks is None else blocks
    home: dict[str, set[int]] = {}  # layer -> the chips whose base program holds it
    stages = [Stage(placer=_copy(fresh))]
    if bases is not None:
        stages = []
        for k, base in enumerate(bases):
            placer = _copy(fresh)
            for layer in base.layers:
                home.setdefault(layer.name, set()).add(k)
                for tile in layer.tiles:
                    placer.reserve(tile)
            stages.append(Stage(placer=placer))
    current = 0
    for index, ins in enumerate(lo.instructions):
        names = instruction_layers(lo, ins)
        pinned = [home[n] for n in names if n in home]
        if pinned:
            chips = [k for k in set.intersection(*pinned) if k >= current]
            if not chips:
                raise CapacityError(f"{lo.source}: instruction '{ins.name}' reads layers the base programs hold on "
                                    f"chips {sorted(set.union(*pinned))}, none of them at or after stage {current} "
                                    f"holding them all; partition the model again without bases")
            current = min(chips)
        stage = stages[current]
        new = [n for n in names if n not in stage.layers]
        unplaced = [n for n in new if current not in home.get(n, ())]
        tiles = [t for n in unplaced for t in blocks[n]]
        placed = _fits(stage.placer, tiles, budget)
        if placed is None and bases is None and stage.layers:
            stages.append(Stage(placer=_copy(fresh)))
            current += 1
            stage = stages[current]
            new = names
            placed = _fits(stage.placer, [t for n in names for t in blocks[n]], budget)
        if placed is None:
            where = f"chip {current} (with the layers its base program holds)" if bases is not None else "one chip"
            raise CapacityError(f"{lo.source}: instruction '{ins.name}' needs layers {', '.join(names)} of "
                                f"{sum(len(blocks[n]) for n in names)} tiles, more than {where} of {budget} arrays "
                                f"of {target.rows}x{target.cols} cells holds")
        stage.placer = placed
        stage.instructions.append(index)
        stage.layers.extend(new)
    order = {name: i for i, name in enumerate(lo.weights)}
    for stage in stages:
        stage.layers.sort(key=order.__getitem__)
    return stages


def _arrays_alone(tiles: list, fresh: Placer, budget: int) -> bool:
    return _fits(fresh, tiles, budget) is not None


def split_layers(lo: Lowering, target, quantized: dict[str, Quantized], budget: int | None = None
                 ) -> tuple[Lowering, dict[str, Quantized]]:
    """A lowering in which no instruction's layers alone need more than ``budget`` arrays:
    each MATMUL or CONV (one group) over a larger layer becomes one instruction per part of
    its output columns and a CONCAT; the lowering itself when nothing is too big."""
    budget = target.arrays if budget is None else budget
    fresh = Placer(target.rows, target.cols, target.weight_bits // target.cell_bits)
    blocks = _tile_blocks(lo, quantized, fresh)
    names = list(lo.weights)
    oversized = {}
    for ins in lo.instructions:
        layers = instruction_layers(lo, ins)
        if layers and not _arrays_alone([t for n in layers for t in blocks[n]], fresh, budget):
            if len(layers) > 1:
                raise CapacityError(f"{lo.source}: instruction '{ins.name}' is a grouped convolution whose "
                                    f"{len(layers)} layers need more than one chip of {budget} arrays")
            oversized[layers[0]] = _column_parts(lo.weights[layers[0]], quantized[layers[0]], fresh, budget,
                                                 f"{lo.source}: instruction '{ins.name}'")
    if not oversized:
        return lo, quantized
    out = Lowering(lo.source, lo.consts, lo.shared, lo.uses, lo.batch_size)
    out.tensors, out.ids, out.constants = list(lo.tensors), dict(lo.ids), lo.constants
    out.channel_axes, out.graph_outputs = lo.channel_axes, lo.graph_outputs
    parts_quantized = dict(quantized)
    part_names: dict[str, list[str]] = {}
    for name in names:
        if name not in oversized:
            out.weights[name], out.weight_sources[name] = lo.weights[name], lo.weight_sources[name]
            continue
        part_names[name] = []
        for a, b in oversized[name]:
            part = f"{name}#cols{a}:{b}"
            q = quantized[name]
            scale = q.scale if np.ndim(q.scale) == 0 else q.scale[..., a:b]
            out.weights[part], out.weight_sources[part] = lo.weights[name][:, a:b], lo.weight_sources[name]
            parts_quantized[part] = Quantized(q.levels[:, a:b], q.signs[:, a:b], scale)
            part_names[name].append(part)
    out.families = [[p for n in family for p in part_names.get(n, [n])] for family in lo.families]
    index = {name: i for i, name in enumerate(out.weights)}
    for ins in lo.instructions:
        layer = names[ins.layer] if ins.layer >= 0 else None
        if layer not in oversized:
            out.instructions.append(Instr(ins.op, ins.name, ins.inputs, ins.outputs,
                                          index[layer] if layer is not None else -1, ins.attrs))
            continue
        result = lo.tensors[ins.outputs[0]]
        axis = 1 if ins.op == Opcode.CONV else len(result.shape) - 1
        pieces = []
        for part, (a, b) in zip(part_names[layer], oversized[layer]):
            shape = list(result.shape)
            shape[axis] = b - a
            pieces.append(out.tensor(f"{result.name}#cols{a}:{b}", tuple(shape)))
            out.instructions.append(Instr(ins.op, f"{ins.name}#cols{a}:{b}", ins.inputs, [pieces[-1]], index[part],
                                          ins.attrs))
        out.instructions.append(Instr(Opcode.CONCAT, ins.name, pieces, ins.outputs, -1, {"axis": [axis]}))
    return out, parts_quantized


def _column_parts(w, q: Quantized, fresh: Placer, budget: int, what: str) -> list[tuple[int, int]]:
    """Output column ranges of ``w``, as wide as fit ``budget`` arrays (whole column groups of a tile)."""
    unit, columns = fresh.units, w.shape[1]

    def fits(a: int, b: int) -> bool:
        signs = q.signs[:, a:b]
        tiles = [(sign, block) for sign in (1, -1) for block in fresh.blocks(w.shape[0], b - a)
                 if (signs[block[0]:block[0] + block[1], block[2]:block[2] + block[3]] == sign).any()]
        return _arrays_alone(tiles, fresh, budget)

    low, high = 0, -(-columns // unit)  # part width in column groups: the most the first part fits
    while low < high:
        middle = (low + high + 1) // 2
        if fits(0, middle * unit):
            low = middle
        else:
            high = middle - 1
    for width in range(low * unit, 0, -unit):  # narrower if a later part's signs need more tiles
        parts = [(a, min(a + width, columns)) for a in range(0, columns, width)]
        if all(fits(a, b) for a, b in parts):
            return parts
    raise CapacityError(f"{what}: {unit} output columns of its {w.shape[0]}x{columns} layer need more "
                        f"than one chip of {budget} arrays")


def chips_needed(lo: Lowering, target, quantized: dict[str, Quantized]) -> int:
    """How many chips of ``target``'s geometry the lowered model needs (CapacityError if none holds a part)."""
    split, parts = split_layers(lo, target, quantized)
    return len(plan(split, target, parts))


def chips_hint(lo: Lowering, target, quantized: dict[str, Quantized]) -> str:
    """The end of a CapacityError message: how many chips of this geometry would hold the model."""
    try:
        n = chips_needed(lo, target, quantized)
    except CapacityError as e:
        return f"; no number of such chips holds it: {str(e).removeprefix(lo.source + ': ')}"
    return (f"; it fits {n} chips of this geometry: driver.load(path, device=[{n} device URLs]) or "
            f"nvcim compile --chips {n}")


def balanced(lo: Lowering, target, quantized: dict[str, Quantized], chips: int) -> list[Stage]:
    """Stages for at most ``chips`` chips. With more chips than the model needs, their array
    budgets as even as the cuts allow; with exactly as many, the greedy cut (each chip
    filled in turn: bisecting the budget would cost one more placement per step)."""
    blocks = _tile_blocks(lo, quantized, Placer(target.rows, target.cols, target.weight_bits // target.cell_bits))
    stages = plan(lo, target, quantized, blocks=blocks)
    if len(stages) > chips:
        raise CapacityError(f"{lo.source}: the model needs {len(stages)} chips of {target.arrays} arrays of "
                            f"{target.rows}x{target.cols} cells; {chips} given")
    used = [s.placer.arrays_needed for s in stages]
    low, high = max(1, -(-sum(used) // chips)), max(used, default=1)
    best = stages
    while len(stages) < chips and low < high:  # the smallest budget that needs no more than ``chips`` stages
        middle = (low + high) // 2
        try:
            trial = plan(lo, target, quantized, budget=middle, blocks=blocks)
        except CapacityError:
            trial = None
        if trial is not None and len(trial) <= chips:
            best, high = trial, middle
        else:
            low = middle + 1
    return best


def _boundaries(lo: Lowering, stages: list[Stage], inputs: list[str], outputs: list[str]
                ) -> list[tuple[list[str], list[str]]]:
    """Per stage, the names of the tensors it takes and gives."""
    name = [t.name for t in lo.tensors]
    produced = [{t for i in s.instructions for t in lo.instructions[i].outputs} for s in stages]
    read = [{t for i in s.instructions for t in lo.instructions[i].inputs} for s in stages]
    returned = {lo.ids[o] for o in outputs}
    given = {lo.ids[i] for i in inputs}
    out = []
    for k in range(len(stages)):
        takes = sorted((t for t in read[k] - produced[k] if t not in lo.constants),
                       key=lambda t: (t not in given, t))
        later = set().union(*read[k + 1:]) | returned
        gives = sorted(produced[k] & later)
        out.append(([name[t] for t in takes], [name[t] for t in gives]))
    return out


def _stage_lowering(lo: Lowering, stage: Stage) -> Lowering:
    """A lowering holding one stage: its tensors, constants, layers and instructions, renumbered."""
    sub = Lowering(lo.source, lo.consts, lo.shared, lo.uses, lo.batch_size)
    local: dict[int, int] = {}

    def tid(t: int) -> int:
        if t not in local:
            decl = lo.tensors[t]
            local[t] = sub.tensor(decl.name, decl.shape)
            if t in lo.constants:
                sub.constants[local[t]] = lo.constants[t]
        return local[t]

    layer_index = {name: i for i, name in enumerate(stage.layers)}
    names = list(lo.weights)
    for name in stage.layers:
        sub.weights[name] = lo.weights[name]
        sub.weight_sources[name] = lo.weight_sources[name]
    sub.families = [f for f in lo.families if f[0] in layer_index]
    sub.channel_axes = lo.channel_axes
    for i in stage.instructions:
        ins = lo.instructions[i]
        ins_inputs = [tid(t) for t in ins.inputs]
        ins_outputs = [tid(t) for t in ins.outputs]
        layer = layer_index[names[ins.layer]] if ins.layer >= 0 else -1
        sub.instructions.append(Instr(ins.op, ins.name, ins_inputs, ins_outputs, layer, dict(ins.attrs)))
    return sub


@dataclass
class Partition:
    """One program per chip, in pipeline order, and the tensor names each takes and gives."""

    programs: list[Program]
    inputs: list[list[str]]    # per stage, its program inputs' names (earlier stages' outputs or model inputs)
    outputs: list[list[str]]   # per stage, its program outputs' names
    model_inputs: list[str]    # the model's inputs, in order
    model_outputs: list[str]   # the tensor each model output is, by name (an alias resolved)

    def __len__(self) -> int:
        return len(self.programs)


def partition(lo: Lowering, proto: onnx.ModelProto, target, chips: int | None = None, *,
              bases: list[Program] | None = None, per_channel: bool = False) -> Partition:
    """Place ``lo`` on several chips of ``target``'s geometry: the fewest that hold it, or
    ``chips`` with balanced stages, or the chips ``bases`` are on (incremental)."""
    from . import _quantize_layers, place

    lo, quantized = split_layers(lo, target, _quantize_layers(lo, target.weight_bits, per_channel))
    if bases is not None:
        stages = plan(lo, target, quantized, bases=bases)
    elif chips is not None:
        stages = balanced(lo, target, quantized, chips)
    else:
        stages = plan(lo, target, quantized)
    model_inputs = [v.name for v in proto.graph.input if v.name not in lo.consts]
    model_outputs = [lo.tensors[lo.ids_for(o.name)].name for o in proto.graph.output]
    ends = _boundaries(lo, stages, model_inputs, model_outputs)
    programs = []
    for k, (stage, (takes, gives)) in enumerate(zip(stages, ends)):
        sub = _stage_lowering(lo, stage)
        programs.append(place(sub, proto, target, base=None if bases is None else bases[k], per_channel=per_channel,
                              inputs=takes, outputs=gives, quantized=quantized))
    return Partition(programs, [e[0] for e in ends], [e[1] for e in ends], model_inputs, model_outputs)

