"""A readable listing of a compiled program: header, tensors, layers with tiles, instructions."""

from __future__ import annotations

import numpy as np

from nvcim.firmware_emu.contract.program_format import FORMAT_VERSION, Program, packed_size


def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join("N" if d == -1 else str(d) for d in shape) + ")"


def _scale(scale) -> str:
    if np.ndim(scale) == 0:
        return f"scale {float(scale):.6g} per tensor"
    s = np.asarray(scale)
    return f"scale per channel, {s.size} values in [{s.min():.6g}, {s.max():.6g}]"


def _attr(values: list) -> str:
    text = [f"{v:.6g}" if isinstance(v, float) else str(v) for v in values]
    return text[0] if len(text) == 1 else "[" + ",".join(text) + "]"


def disassemble(program: Program) -> str:
    """The whole program as text, one item per line, in the order the chip sees it."""
    p = program
    code = p.code_bytes()
    lines = [
        f"; nvcim program, format version {FORMAT_VERSION}",
        f"; weights {p.weight_bits} bits on {p.cell_bits}-bit cells ({p.slices} slices per weight), "
        f"arrays of {p.array_rows}x{p.array_cols} cells, {p.arrays_used} arrays used",
        f"; code section {len(code)} bytes, cell image {len(p.cells)} bytes",
        "",
        f"tensors ({len(p.tensors)}):",
    ]
    role = {t: "input" for t in p.inputs} | {t: "output" for t in p.outputs}
    for tid, t in enumerate(p.tensors):
        kind = role.get(tid) or ("const" if tid in p.constants else "")
        lines.append(f"  %{tid:<4d} {_shape(t.shape):<20s} {kind:<6s} {t.name}")
    lines += ["", f"layers ({len(p.layers)}):"]
    for li, layer in enumerate(p.layers):
        lines.append(f"  L{li:<3d} {layer.name}: {layer.in_features}x{layer.out_features}, {_scale(layer.scale)}, "
                     f"{len(layer.tiles)} tiles")
        for ti, t in enumerate(layer.tiles):
            size = packed_size(t.in_count * t.out_count * p.slices, p.cell_bits)
            lines.append(f"        tile {ti}: {'+' if t.sign > 0 else '-'} array {t.array} "
                         f"rows {t.row}..{t.row + t.in_count - 1} cols {t.col}..{t.col + t.out_count * p.slices - 1}"
                         f" <- W[{t.in_start}:{t.in_start + t.in_count}, {t.out_start}:{t.out_start + t.out_count}]"
                         f", cells @{t.cells_offset} ({size} bytes)")
    lines += ["", f"code ({len(p.instructions)} instructions):"]
    for i, ins in enumerate(p.instructions):
        outs = ", ".join(f"%{t}" for t in ins.outputs)
        ins_ = ", ".join(f"%{t}" for t in ins.inputs)
        layer = f" L{ins.layer}" if ins.layer >= 0 else ""
        attrs = " ".join(f"{k}={_attr(v)}" for k, v in ins.attrs.items())
        lines.append(f"  {i:04d} {ins.op.name:<14s} {outs} <- {ins_}{layer}{' ' + attrs if attrs else ''}"
                     f"    ; {ins.name}")
    inputs = ", ".join(f"%{t} {p.tensors[t].name}" for t in p.inputs)
    outputs = ", ".join(f"%{t} {p.tensors[t].name}" for t in p.outputs)
    lines += ["", f"inputs: {inputs}", f"outputs: {outputs}", ""]
    return "\n".join(lines)


def partition_summary(programs: list[Program], names: list[str] | None = None) -> str:
    """How a model split over several chips flows: per chip, its arrays and layers, where its
    inputs come from (the host or an earlier chip) and where its outputs go."""
    names = names or [f"chip {k}" for k in range(len(programs))]
    made_by: dict[str, int] = {}
    read_by: dict[str, list[int]] = {}
    for k, p in enumerate(programs):
        for t in p.inputs:
            read_by.setdefault(p.tensors[t].name, []).append(k)
    lines = [f"; partition: {len(programs)} chips, "
             f"{sum(p.arrays_used for p in programs)} arrays of {programs[0].array_rows}x{programs[0].array_cols}"]
    for k, p in enumerate(programs):
        takes = ", ".join(f"{p.tensors[t].name} {_shape(p.tensors[t].shape)} <- "
                          + (f"chip {made_by[p.tensors[t].name]}" if p.tensors[t].name in made_by else "host")
                          for t in p.inputs)
        gives = ", ".join(f"{p.tensors[t].name} -> "
                          + (", ".join(f"chip {j}" for j in read_by.get(p.tensors[t].name, []) if j > k) or "host")
                          for t in p.outputs)
        lines += [f";   chip {k} ({names[k]}): {p.arrays_used} arrays, {len(p.layers)} layers "
                  f"({', '.join(layer.name for layer in p.layers) or 'none'}), {len(p.instructions)} instructions",
                  f";     in:  {takes}", f";     out: {gives}"]
        for t in p.outputs:
            made_by.setdefault(p.tensors[t].name, k)
    return "\n".join(lines) + "\n"
