"""A whole program as one onnxruntime graph: the chip's fast way to run it.

The graph is the contract's (``contract.program_graph``: one node per instruction, from
the op table's ONNX forms), with the layers' effective weights (what the programmed
conductances encode) frozen into it as initializers. This module is the emulator's part:
it keeps one graph per program and cell generation, built again whenever a layer's
effective weights change (new cells), which costs milliseconds to a second, once per
programming, and it declines programs no graph expresses exactly; the interpreter in
``executor`` runs those, as it runs every product through finite converters.
``executor.run`` decides; see its ``engine`` argument.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable

import numpy as np

from .contract.ops import NoGraphForm
from .contract.program_format import Program
from .contract.program_graph import ProgramGraph

log = logging.getLogger(__name__)

# (program id, weight array ids) -> (weak references to them, graph or None). No lock: the
# dict's own operations are atomic, and a finalizer (which may run inside any allocation,
# on any thread) must never wait for one. Two threads may build the same graph; one wins.
_graphs: dict[tuple[int, ...], tuple[tuple[weakref.ref, ...], ProgramGraph | None]] = {}


def cached_graphs() -> int:
    """How many program graphs (onnxruntime sessions) the cache holds: a leak shows here."""
    return len(_graphs)


def graph_for(program: Program, weights: Callable[[int], np.ndarray]) -> ProgramGraph | None:
    """The graph of ``program`` with the layer weights the provider gives now, or None if
    the program cannot be expressed as a graph (or its graph failed to run).

    Cached while the program and the weight arrays live: a chip keeps one array per layer
    per cell generation, so inference after inference reuses one session, and programming
    new cells (new arrays) builds a new one.
    """
    arrays = [weights(i) for i in range(len(program.layers))]
    key = _key(program, arrays)
    hit = _graphs.get(key)
    if hit is not None and all(ref() is obj for ref, obj in zip(hit[0], (program, *arrays))):
        return hit[1]
    for stale in [k for k, (refs, _) in list(_graphs.items()) if any(ref() is None for ref in refs)]:
        _graphs.pop(stale, None)  # ids of dead objects may come back on new ones
    try:
        graph: ProgramGraph | None = ProgramGraph(program, arrays)
    except NoGraphForm as e:
        log.debug("program runs on the interpreter: %s", e)
        graph = None
    _graphs[key] = (tuple(weakref.ref(obj) for obj in (program, *arrays)), graph)
    # freed with the first weight array (a new cell generation), or the program if it has none
    weakref.finalize(arrays[0] if arrays else program, _graphs.pop, key, None)
    return graph


def decline(program: Program, weights: Callable[[int], np.ndarray], reason: Exception) -> None:
    """Record that the graph of ``program`` with these weights failed to run: it is not
    tried again, and the interpreter runs the program from now on."""
    key = _key(program, [weights(i) for i in range(len(program.layers))])
    hit = _graphs.get(key)
    if hit is not None and hit[1] is not None:
        log.warning("the program's onnxruntime graph failed (%s: %s); the interpreter runs it",
                    type(reason).__name__, reason)
        _graphs[key] = (hit[0], None)


def _key(program: Program, arrays: list[np.ndarray]) -> tuple[int, ...]:
    return (id(program), *map(id, arrays))
