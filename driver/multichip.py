"""A model split over several chips: one stage per chip, activations passed from chip to chip.

``driver.load(path, device=[url1, url2, ...])`` lands here. The compiler cuts the model
into consecutive stages that each fit one chip (``compiler.partition``), every chip is
programmed with its stage (in parallel, one thread per chip), and a batch flows through
them as a pipeline: it is cut into micro-batches, and one thread per chip takes each
micro-batch from the chip before it, runs its stage and hands the result on, so while
chip 2 runs micro-batch k, chip 1 already runs k + 1. The host carries the activations
between chips (each chip's outputs are read back over its link and written to the next),
as a host-attached multi-device accelerator does.

Tensors cross stages by name: a stage's program inputs are named as the model's tensors,
so the host keeps, per micro-batch, every tensor a later stage or the caller still needs.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx

from nvcim.compiler import lower_model
from nvcim.compiler.lower import Lowering
from nvcim.compiler.partition import Partition, partition
from nvcim.firmware_emu.contract.protocol import WriteStats

from .device import Device
from .errors import InvalidArgument
from .session import Session, deploy, index_depths, without_batch

log = logging.getLogger(__name__)


class MultiChipSession(Session):
    """An inference session on several chips, each holding one stage of the model."""

    def __init__(self, model: onnx.ModelProto, part: Partition, devices: list[Device], write_stats: WriteStats):
        super().__init__(model, part.programs[0], devices[0], write_stats)
        self.partition = part
        self.programs = part.programs
        self.devices = devices
        self._depths = index_depths(part.programs)
        self._no_batch, copies = without_batch(model, part.programs)
        self._copied_outputs = [name in copies for name in part.model_outputs]

    def extend(self, model: str | os.PathLike | onnx.ModelProto, *, verify: bool = True) -> WriteStats:
        """Run ``model``, this one grown by new layers (a TSB), from now on.

        It is compiled against the chips' programs: every layer already on a chip keeps its
        tiles and cells, and each new layer goes to the chip where its instruction runs
        (CapacityError if that chip has no room left for it); only the new layers' cells are
        written, write-verified unless ``verify`` is False. Returns what that writing took.
        """
        lowered, proto = lower_model(model)
        part = partition(lowered, proto, self.devices[0].identity.geometry, bases=self.programs)
        added = WriteStats()
        for device, old, new in zip(self.devices, self.programs, part.programs):
            fresh = {layer.name for layer in new.layers} - {layer.name for layer in old.layers}
            added += deploy(device, new, verify=verify, layers=fresh)
        total = WriteStats()
        total += self.write_stats
        total += added
        MultiChipSession.__init__(self, proto, part, self.devices, total)
        return added

    def layer_chip(self, name: str) -> list[int]:
        """The chips (stage indices) holding layer ``name``: more than one for a weight used in
        several stages, or a layer split by columns over several chips."""
        return [k for k, p in enumerate(self.programs)
                if any(layer.name == name or (m := _PART.match(layer.name)) and m["layer"] == name
                       for layer in p.layers)]

    def _micro_batch(self, feeds: list[np.ndarray]) -> int:
        """Samples per micro-batch: enough micro-batches to keep every chip busy (two per chip),
        none bigger than any chip's staging buffer holds."""
        batch = len(feeds[0])
        per_sample = [sum(4 * int(np.prod(p.tensors[t].shape[1:])) for t in (*p.inputs, *p.outputs))
                      for p in self.programs]
        fits = min(max(1, d.identity.geometry.buffer_size // max(b, 1)) for d, b in zip(self.devices, per_sample))
        return max(1, min(fits, -(-batch // (2 * len(self.devices)))))

    def _execute(self, feeds: list[np.ndarray]) -> list[np.ndarray]:
        part = self.partition
        step = self._micro_batch(feeds)
        starts = list(range(0, len(feeds[0]), step))
        envs = [{name: f[a:a + step] for name, f in zip(part.model_inputs, feeds)} for a in starts]
        # a tensor leaves the host's keeping once no later stage reads it and the caller does not want it
        needed_after = [set().union(*part.inputs[k + 1:]) | set(part.model_outputs) for k in range(len(self.devices))]
        links = [queue.Queue() for _ in range(len(self.devices) + 1)]
        for i in range(len(starts)):
            links[0].put(i)
        links[0].put(None)
        failure: list[BaseException] = []

        def stage(k: int) -> None:
            while (i := links[k].get()) is not None:
                if not failure:
                    try:
                        env = envs[i]
                        outs = self.devices[k].run([env[name] for name in part.inputs[k]])
                        env.update(zip(part.outputs[k], outs))
                        for name in [n for n in env if n not in needed_after[k]]:
                            del env[name]
                    except BaseException as e:  # noqa: BLE001 - handed to the caller's thread below
                        failure.append(e)
                links[k + 1].put(i)
            links[k + 1].put(None)

        threads = [threading.Thread(target=stage, args=(k,), name=f"nvcim-stage{k}", daemon=True)
                   for k in range(len(self.devices))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if failure:
            raise failure[0]
        return [np.concatenate([env[name] for env in envs]) if len(envs) > 1 else envs[0][name]
                for name in part.model_outputs]

    def close(self) -> None:
        for device in self.devices:
            device.close()


_PART = re.compile(r"^(?P<layer>.*)#cols(?P<start>\d+):(?P<stop>\d+)$")  # a column part of a split layer


def stage_masks(part: Partition, verify_mask: dict[str, np.ndarray] | None) -> list[dict[str, np.ndarray] | None]:
    """Per chip, the ``verify_mask`` entries of the layers it holds; a layer split over chips
    by output columns gets, on each, the columns of its part."""
    if verify_mask is None:
        return [None] * len(part.programs)
    out: list[dict[str, np.ndarray] | None] = []
    found = set()
    for program in part.programs:
        masks = {}
        for layer in program.layers:
            whole = _PART.match(layer.name)
            name = whole["layer"] if whole and layer.name not in verify_mask else layer.name
            if name not in verify_mask:
                continue
            mask = np.asarray(verify_mask[name], dtype=bool)
            if name != layer.name:
                if mask.ndim != 2 or mask.shape[1] < int(whole["stop"]):
                    raise InvalidArgument(f"verify_mask for layer '{name}' has shape {mask.shape}; its parts "
                                          f"reach column {whole['stop']}")
                mask = mask[:, int(whole["start"]):int(whole["stop"])]
            masks[layer.name] = mask
            found.add(name)
        out.append(masks)
    unknown = set(verify_mask) - found
    if unknown:
        raise InvalidArgument(f"program has no verify_mask layer(s) {', '.join(sorted(unknown))}")
    return out


def load_multichip(lowered: Lowering, model: onnx.ModelProto, urls: list[str], *, policy: str,
                   verify_mask: dict[str, np.ndarray] | None, timeout: float) -> MultiChipSession:
    """Open the chips at ``urls``, split the lowered model over them, program each and return the session."""
    devices: list[Device] = []
    try:
        for url in urls:
            devices.append(Device.open(url, timeout=timeout))
        geometries = {d.identity.geometry for d in devices}
        if len(geometries) > 1:
            raise InvalidArgument(f"the chips at {', '.join(urls)} differ in geometry ({len(geometries)} kinds); "
                                  f"a partitioned model needs one geometry")
        paired = [url for url, d in zip(urls, devices) if d.differential()]
        if paired:
            raise InvalidArgument(f"the chip(s) at {', '.join(paired)} read array pairs differentially "
                                  f"(ARRAY_CONVERTERS.DIFFERENTIAL); a partitioned model is placed unpaired: "
                                  f"clear DIFFERENTIAL or load onto one chip")
        target = devices[0].identity.geometry
        part = partition(lowered, model, target, chips=len(devices))
        if len(part) < len(devices):
            log.info("the model fills %d of the %d chips given; the others stay idle", len(part), len(devices))
        masks = stage_masks(part, verify_mask)
        used = devices[:len(part)]

        def program(k: int) -> WriteStats:
            return deploy(used[k], part.programs[k], verify=policy == "write-verify", verify_mask=masks[k])

        with ThreadPoolExecutor(len(used), thread_name_prefix="nvcim-deploy") as pool:
            stats = WriteStats()
            for part_stats in pool.map(program, range(len(used))):
                stats += part_stats
        for idle in devices[len(part):]:
            idle.close()
    except BaseException:
        for d in devices:
            d.close()
        raise
    return MultiChipSession(model, part, used, stats)
