"""The Tiny Shared Block pattern (issue 6) and incremental placement (issue 4).

The TSB exports as: Pad channels to G*c -> Reshape (N, G, c, H, W) -> Transpose to
(N, G, H, W, c) -> MatMul by ONE shared (c, c) initializer -> Transpose back -> Reshape
(N, G*c, H, W) -> Slice channels back, at every insertion point, all using the same weight.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from test_models import TOLERANCE

from nvcim import driver
from nvcim.compiler import CompileError, Target, compile_model, quantized_model, reference
from nvcim.firmware_emu.contract.program_format import Opcode

from zoo import TSB, Backbone, export

SHAPE = (1, 12, 12)


@pytest.fixture(scope="module", params=[("torchscript", True), ("torchscript", False), ("dynamo", False)],
                ids=lambda p: f"{p[0]}-{'batch_as_0' if p[1] else 'batch_as_-1'}")
def tsb_model(request, tmp_path_factory):
    exporter, batch_as_zero = request.param
    torch.manual_seed(4)
    model = Backbone(TSB(4, batch_as_zero)).eval()
    return export(model, tmp_path_factory.mktemp("tsb") / f"tsb_{exporter}.onnx", SHAPE, exporter == "dynamo")


def _tsb_layers(program):
    return [i for i, layer in enumerate(program.layers) if layer.in_features == layer.out_features == 4]


def test_shared_tsb_weight_is_placed_once_and_runs_on_the_chip(tsb_model):
    program = compile_model(tsb_model)
    tsb, = _tsb_layers(program)
    uses = [ins for ins in program.instructions if ins.op == Opcode.MATMUL and ins.layer == tsb]
    assert len(uses) == 2  # both insertion points read the one common crossbar layer
    x = np.random.default_rng(0).standard_normal((3, *SHAPE)).astype(np.float32)
    with driver.load(tsb_model, device="emu://?sigma=0&arrays=8") as sess:
        y, = sess.run(None, {"x": x})
    ref, = ort.InferenceSession(quantized_model(tsb_model).SerializeToString()).run(None, {"x": x})
    np.testing.assert_allclose(y, ref, rtol=0, atol=TOLERANCE * np.abs(ref).max())


def test_separate_mode_places_one_copy_per_use(tsb_model):
    program = compile_model(tsb_model, shared="separate")
    copies = _tsb_layers(program)
    assert len(copies) == 2 and len({program.layers[i].name for i in copies}) == 2
    assert all("@" in program.layers[i].name for i in copies)
    backbone = {layer.name for layer in compile_model(tsb_model).layers} - {program.layers[i].name.split("@")[0]
                                                                            for i in copies}
    assert backbone <= {layer.name for layer in program.layers}  # unshared weights keep their names
    x = np.random.default_rng(1).standard_normal((2, *SHAPE)).astype(np.float32)
    y, = reference.run(program, [x])
    ref, = ort.InferenceSession(quantized_model(tsb_model).SerializeToString()).run(None, {"x": x})
    np.testing.assert_allclose(y, ref, rtol=0, atol=TOLERANCE * np.abs(ref).max())


@pytest.fixture(scope="module")
def backbone_and_augmented(tmp_path_factory):
    d = tmp_path_factory.mktemp("incremental")
    backbone = export(Backbone().eval(), d / "backbone.onnx", SHAPE, dynamo=False)
    torch.manual_seed(5)
    augmented = export(Backbone(TSB(4, True)).eval(), d / "augmented.onnx", SHAPE, dynamo=False)
    return backbone, augmented


def test_incremental_compile_keeps_every_backbone_tile_and_cell(backbone_and_augmented):
    backbone, augmented = backbone_and_augmented
    target = Target(arrays=8, rows=64, cols=64)  # small arrays: layers span several tiles
    base = compile_model(backbone, target)
    assert sum(len(layer.tiles) for layer in base.layers) > len(base.layers)
    new = compile_model(augmented, target, base=base)
    by_name = {layer.name: layer for layer in new.layers}
    for layer in base.layers:
        kept = by_name[layer.name]
        assert kept.tiles and [(t.sign, t.array, t.row, t.col, t.in_start, t.in_count, t.out_start, t.out_count)
                               for t in kept.tiles] == \
               [(t.sign, t.array, t.row, t.col, t.in_start, t.in_count, t.out_start, t.out_count)
                for t in layer.tiles]
        assert [new.tile_cells_bytes(t) for t in kept.tiles] == [base.tile_cells_bytes(t) for t in layer.tiles]
    # the new layer lies in cells no backbone tile uses
    s = new.slices
    used = {(t.array, r, c) for layer in base.layers for t in layer.tiles
            for r in range(t.row, t.row + t.in_count) for c in range(t.col, t.col + t.out_count * s)}
    tsb = [layer for layer in new.layers if layer.name not in {b.name for b in base.layers}]
    assert len(tsb) == 1
    for t in tsb[0].tiles:
        assert not any((t.array, r, c) in used for r in range(t.row, t.row + t.in_count)
                       for c in range(t.col, t.col + t.out_count * s))


def test_a_tsb_added_to_a_paired_program_is_paired_and_the_chip_finds_every_mirror(backbone_and_augmented):
    from nvcim.firmware_emu.contract.pairing import pair_units

    backbone, augmented = backbone_and_augmented
    target = Target(arrays=16, rows=64, cols=64)
    base = compile_model(backbone, target, pairs=True)
    new = compile_model(augmented, target, base=base, pairs=True)
    units = pair_units(new, np.ones(16, bool))               # raises if any tile faces a foreign one
    names = {layer.name for layer in base.layers}
    added = [i for i, layer in enumerate(new.layers) if layer.name not in names]
    assert added and all(u.mirror is not None for i in added for u in units[i])


@pytest.mark.parametrize("pairs", [False, True])
def test_own_arrays_put_the_new_layers_on_arrays_no_backbone_tile_uses(backbone_and_augmented, pairs):
    backbone, augmented = backbone_and_augmented
    target = Target(arrays=16, rows=64, cols=64)
    base = compile_model(backbone, target, pairs=pairs)
    names = {layer.name for layer in base.layers}
    taken = {t.array for layer in base.layers for t in layer.tiles}
    if pairs:
        taken |= {a ^ 1 for a in taken}
    shared = compile_model(augmented, target, base=base, pairs=pairs)
    own = compile_model(augmented, target, base=base, pairs=pairs, own_arrays=True)
    new = [t.array for layer in own.layers if layer.name not in names for t in layer.tiles]
    assert new and not set(new) & taken
    assert {t.array for layer in shared.layers if layer.name not in names for t in layer.tiles} & taken  # free columns
    assert [layer.tiles for layer in own.layers if layer.name in names] == \
        [layer.tiles for layer in shared.layers if layer.name in names]


def test_incremental_compile_refuses_changed_backbone_weights(tmp_path, backbone_and_augmented):
    backbone, _ = backbone_and_augmented
    base = compile_model(backbone)
    retrained = Backbone().eval()
    with torch.no_grad():
        retrained.conv2.weight.mul_(-1)
    path = export(retrained, tmp_path / "retrained.onnx", SHAPE, dynamo=False)
    with pytest.raises(CompileError, match="layer 'conv2.weight' is pinned on the chip by the base program"):
        compile_model(path, base=base)
