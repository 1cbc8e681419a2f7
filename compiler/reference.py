"""A reference executor for compiled programs: ideal cells, optional known weight noise.

It runs the program with the weights the program's cell image describes (every cell
exactly at its target) instead of measured conductances, the way the chip does: as the
contract's one onnxruntime graph of the program (``contract.program_graph``), or, for a
program no graph expresses exactly, with the op table's reference kernels
(``contract.interpreter``); it needs nothing of the emulator. If the chip and this
disagree at sigma = 0, the cells or the link are wrong; if this and onnxruntime on
``quantized_model`` disagree, the compiler is wrong. With ``noise`` (the per-weight
deviations a chip dumped, per layer name) it predicts what that chip computes.
"""

from __future__ import annotations

import logging

import numpy as np

from nvcim.firmware_emu.contract import interpreter
from nvcim.firmware_emu.contract.ops import NoGraphForm, WeightProvider
from nvcim.firmware_emu.contract.program_format import Program, effective_weights
from nvcim.firmware_emu.contract.program_graph import ProgramGraph

log = logging.getLogger(__name__)


def ideal_weights(program: Program, layer_index: int) -> np.ndarray:
    """The (in_features, out_features) matrix a layer holds when every cell sits at its target."""
    tiles = program.layers[layer_index].tiles
    return effective_weights(program, layer_index, lambda i: program.tile_cells(tiles[i]).astype(np.float32))


def run(program: Program, feeds: list[np.ndarray] | dict[str, np.ndarray],
        noise: dict[str, np.ndarray] | None = None) -> list[np.ndarray]:
    """Execute ``program`` on ``feeds`` (a list in program input order, or by input name).

    ``noise``: layer name -> (in_features, out_features) array added to that layer's ideal
    weights, in weight units.
    """
    if isinstance(feeds, dict):
        names = [program.tensors[t].name for t in program.inputs]
        missing = [n for n in names if n not in feeds]
        extra = [n for n in feeds if n not in names]
        if missing or extra:
            raise ValueError(f"feeds must name exactly the program inputs {names} "
                             f"(missing {missing}, unknown {extra})")
        feeds = [feeds[n] for n in names]
    noise = dict(noise or {})
    by_name = {layer.name: i for i, layer in enumerate(program.layers)}
    unknown = sorted(set(noise) - set(by_name))
    if unknown:
        raise ValueError(f"noise names layers the program does not have: {', '.join(unknown)}")
    cache: dict[int, np.ndarray] = {}

    def weights(index: int) -> np.ndarray:
        if index not in cache:
            w = ideal_weights(program, index)
            layer = program.layers[index]
            extra = noise.get(layer.name)
            if extra is not None:
                if np.shape(extra) != w.shape:
                    raise ValueError(f"noise for layer '{layer.name}' has shape {np.shape(extra)}, "
                                     f"the layer is {w.shape[0]}x{w.shape[1]}")
                w = (w + np.asarray(extra, dtype=np.float32)).astype(np.float32)
            cache[index] = w
        return cache[index]

    return _execute(program, list(feeds), weights)


def _execute(program: Program, feeds: list[np.ndarray], weights: WeightProvider) -> list[np.ndarray]:
    """The program's one graph where it has one (what the chip runs), else the interpreter."""
    env = interpreter.bind_inputs(program, feeds)
    try:
        graph = ProgramGraph(program, [weights(i) for i in range(len(program.layers))])
    except NoGraphForm:
        return interpreter.run(program, feeds, weights)
    try:
        return graph.run([env[t] for t in program.inputs])
    except Exception as e:  # noqa: BLE001 - the inputs were checked: the graph is at fault
        log.warning("the program's onnxruntime graph failed (%s: %s); the interpreter runs it", type(e).__name__, e)
        return interpreter.run(program, feeds, weights)
