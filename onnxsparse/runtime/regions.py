"""Partition a model into regions of native chains, each one custom operator in onnxruntime.

Every boundary between onnxruntime and a region copies the activations that cross it, so chains
that feed one another (or read the same tensor) are grouped into one region when that keeps the
graph acyclic: a chain joins the region of a chain it reads from, or of a chain reading the same
input, unless one of its inputs is computed by onnxruntime from that region's outputs (the region
would then wait on itself).
"""

from __future__ import annotations

import heapq
import threading
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from onnxsparse import model as model_io
from onnxsparse.runtime import hosting
from onnxsparse.runtime.steps import (FLOAT_OPS, INTEGER_OPS, POOL_OPS, Chain, Unsupported, float_chain,
                                      integer_chain, pool_chain)


@dataclass
class Region:
    """Chains run in graph order on numpy arrays; intermediate tensors are dropped after last use.

    A chain writes its output into memory the region has just used, which is likely still in
    cache: into its residual when the residual dies there (the kernels read each residual element
    before writing that output element), else into a dead intermediate of the same shape and type
    (the most recently freed first). Writing a fresh allocation instead reads every output line
    from memory first; 1.02-1.10x on packed ResNet-50 at 80% (docs/RUNTIME.md).

    The first run for a set of input shapes makes those choices and records them: the later runs
    with the same shapes write into the same intermediate arrays, kept by the region, in a loop
    with no planning left (docs/RUNTIME.md, "Replay"). A run that finds the recorded arrays
    in use (a concurrent call) plans its own."""

    replay = True  # False: plan every run (for comparisons)
    RECORDINGS = 4  # input shapes recorded for replay, each with its intermediates; a fifth drops the oldest

    chains: list[Chain] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)

    def finish(self) -> None:
        """Derive the region's inputs, the element types at its boundary, and the per-chain plan."""
        produced = {chain.output for chain in self.chains}
        self.input_types = []
        for chain in self.chains:
            for name, dtype in ((chain.input, chain.input_type), (chain.residual, chain.output_type)):
                if name and name not in produced and name not in self.inputs:
                    self.inputs.append(name)
                    self.input_types.append(dtype)
        self.output_types = [next(c.output_type for c in self.chains if c.output == name) for name in self.outputs]
        last_use = {name: position for position, chain in enumerate(self.chains)
                    for name in (chain.input, chain.residual) if name}
        # per chain, planned once: the tensors that die after it (and whether the region allocated
        # them and nothing outside sees them: spares then), and whether it writes into its residual
        recyclable = {chain.output for chain in self.chains if not chain.matrix} - set(self.outputs)
        self._plan = []
        for position, chain in enumerate(self.chains):
            dying = tuple(dict.fromkeys(name for name in (chain.input, chain.residual) if name
                                        and last_use[name] == position and name not in self.outputs))
            in_place = (not chain.matrix and chain.residual in recyclable and chain.residual != chain.input
                        and last_use[chain.residual] == position)
            self._plan.append((chain, tuple((name, name in recyclable) for name in dying), in_place))
        self._output_shapes: dict[tuple, tuple] = {}  # (position, input shape) -> output shape
        # slots: the region's inputs, then each chain's output
        slot = {name: index for index, name in enumerate(self.inputs)}
        slot.update({chain.output: len(self.inputs) + position for position, chain in enumerate(self.chains)})
        self._slots = [(slot[chain.input], slot[chain.residual] if chain.residual else -1) for chain in self.chains]
        self._output_slots = [slot[name] for name in self.outputs]
        self._recorded: dict[tuple, list] = {}  # input shapes -> per chain (run, out array or None)
        self._replaying = threading.Lock()
        self._recording = threading.Lock()

    def __call__(self, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
        key = tuple(array.shape for array in arrays)
        recorded = self._recorded.get(key) if self.replay else None
        if recorded is None or not self._replaying.acquire(blocking=False):
            return self._planned(arrays, key)
        try:
            values = [np.ascontiguousarray(array) for array in arrays] + [None] * len(self.chains)
            position = len(self.inputs)
            for (run, out), (x_slot, residual_slot) in zip(recorded, self._slots):
                values[position] = run(values[x_slot], values[residual_slot] if residual_slot >= 0 else None, out)
                position += 1
            return tuple(values[slot] for slot in self._output_slots)
        except ValueError as exc:  # the kernels' argument checks: name the node
            raise ValueError(f"node {self.chains[position - len(self.inputs)].label}: {exc}") from exc
        finally:
            self._replaying.release()

    def _planned(self, arrays, key) -> tuple[np.ndarray, ...]:
        """Plan the run as it goes; the first run for these input shapes records its choices."""
        values = dict(zip(self.inputs, arrays))
        spare: dict[tuple, list[np.ndarray]] = {}  # dead intermediates by (shape, dtype), newest last
        written: list[np.ndarray] = []
        for position, (chain, dying, in_place) in enumerate(self._plan):
            x, residual = values[chain.input], values[chain.residual] if chain.residual else None
            try:
                out = residual if in_place else None if chain.matrix else self._spare(position, chain, x, spare)
                values[chain.output] = chain.run(x, residual, out)
            except ValueError as exc:  # the kernels' argument checks: name the node
                raise ValueError(f"node {chain.label}: {exc}") from exc
            written.append(values[chain.output])
            for name, recyclable in dying:
                dead = values.pop(name)
                if recyclable and dead is not out:
                    spare.setdefault((dead.shape, dead.dtype), []).append(dead)
        if self.replay and key not in self._recorded:
            # matrix chains (their output is a 2-D view) get fresh arrays, and so does every chain
            # that wrote an array handed to the caller (a region output, or memory one reused: the
            # next run would overwrite the caller's result); every other chain writes into the
            # array it wrote this time
            handed_out = {id(values[name]) for name in self.outputs}
            recording = [
                (chain.run, None) if chain.matrix else (chain.kernel.run, None if id(array) in handed_out else array)
                for chain, array in zip(self.chains, written)]
            with self._recording:  # concurrent first runs
                if len(self._recorded) >= self.RECORDINGS:
                    self._recorded.pop(next(iter(self._recorded)))
                self._recorded[key] = recording
        return tuple(values[name] for name in self.outputs)

    def _spare(self, position: int, chain: Chain, x: np.ndarray, spare: dict) -> np.ndarray | None:
        """A dead intermediate of the chain's output shape and type (matrix chains: never, their
        output is reshaped to 2-D, a view)."""
        key = (position, x.shape)
        shape = self._output_shapes.get(key)
        if shape is None:
            shape = self._output_shapes[key] = tuple(chain.kernel.output_shape(x.shape))
        buffers = spare.get((shape, chain.output_type))
        return buffers.pop() if buffers else None


@dataclass(frozen=True)
class Partition:
    model: onnx.ModelProto  # what onnxruntime runs: regions as custom nodes
    regions: tuple[Region, ...]
    region_ids: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...]  # (node, why it stays in onnxruntime)


def partition(model: onnx.ModelProto, sparse_nodes: set[str], native,
              shapes: dict[str, tuple[int, ...] | None] | None = None) -> Partition:
    """Replace the chains starting at `sparse_nodes` (node names) by region nodes; `shapes` are
    model_io.infer_shapes(model) when the caller has them already."""
    lookups = model_io.GraphIndex(model)
    shapes = model_io.infer_shapes(model) if shapes is None else shapes
    ranks = {name: len(shape) for name, shape in shapes.items() if shape is not None}
    rank_of = ranks.get
    chains, skipped, taken = {}, [], set()
    for index, node in enumerate(model.graph.node):
        if node.name not in sparse_nodes or index in taken:
            continue
        builder = float_chain if node.op_type in FLOAT_OPS else integer_chain if node.op_type in INTEGER_OPS else None
        if builder is None:
            skipped.append((node.name, f"{node.op_type} has no native kernel"))
            continue
        try:
            chain = builder(native, lookups, index, rank_of, taken, shapes.get)
        except (Unsupported, ValueError) as exc:
            skipped.append((node.name, str(exc)))
            continue
        taken.update(chain.node_indices)
        chains[chain.anchor] = chain
    # MaxPools fed by a chain join it: the native one is faster than onnxruntime's on float32
    # (1.4x) and far faster on uint8/int8 (64x112x112: 0.1 against 3.7 ms), and every pool that joins
    # saves a crossing into onnxruntime and back (VGG-19 at 80%: 7 regions become 3, 1.08x). An
    # 8-bit pool fed by onnxruntime (a dense stem conv) runs natively too when the model has native
    # chains at all (a model without them stays plain onnxruntime): the crossing costs far less
    # than onnxruntime's 8-bit pool.
    produced = {chain.output: chain for chain in chains.values()}
    types: dict[str, int] | None = None
    eight_bit = {onnx.TensorProto.UINT8: np.dtype(np.uint8), onnx.TensorProto.INT8: np.dtype(np.int8)}
    for index, node in enumerate(model.graph.node):
        if (node.op_type not in POOL_OPS or node.domain or index in taken or not node.input
                or rank_of(node.input[0]) != 4):
            continue
        source = produced.get(node.input[0])
        if source is not None:
            input_type = source.output_type
        elif not produced:
            break
        else:
            types = model_io.element_types(model) if types is None else types
            input_type = eight_bit.get(types.get(node.input[0]))
            if input_type is None:
                continue
        try:
            chain = pool_chain(native, lookups, index, input_type)
        except Unsupported:
            continue
        taken.add(index)
        chains[index] = chain
        produced[chain.output] = chain

    regions: list[Region] = []
    region_of_tensor: dict[str, int] = {}  # outputs of chains
    readers: dict[str, list[int]] = {}  # regions reading a tensor
    depends: dict[str, frozenset[int]] = {}  # regions a tensor is (transitively) computed from
    for index, node in enumerate(model.graph.node):
        chain = chains.get(index)
        if chain is None:
            if index in taken:
                continue
            needed = frozenset().union(*(depends.get(name, frozenset()) for name in node.input))
            for out in node.output:
                depends[out] = needed
            continue
        reads = [name for name in (chain.input, chain.residual) if name]
        target = None
        producers = [region_of_tensor[name] for name in reads if name in region_of_tensor]
        siblings = [region for name in reads for region in readers.get(name, [])]  # same input, e.g. a downsample
        for candidate in dict.fromkeys(producers + siblings):
            if all(region_of_tensor.get(name) == candidate or candidate not in depends.get(name, frozenset())
                   for name in reads):
                target = candidate
                break
        if target is None:
            regions.append(Region())
            target = len(regions) - 1
        regions[target].chains.append(chain)
        region_of_tensor[chain.output] = target
        for name in reads:
            readers.setdefault(name, []).append(target)
        depends[chain.output] = frozenset({target}).union(*(depends.get(name, frozenset()) for name in reads))

    consumed_outside = set(lookups.graph_outputs)
    for index, node in enumerate(model.graph.node):
        if index not in taken:
            consumed_outside.update(node.input)
    while True:
        for region in regions:
            _finish(region, regions, consumed_outside)
        unhostable = next((r for r in regions if hosting.operator_type(r.input_types, r.output_types) is None), None)
        if unhostable is None:
            break
        # too many ports or mixed types: one region per chain (always a registered signature)
        regions.remove(unhostable)
        regions.extend(Region(chains=[chain]) for chain in unhostable.chains)
    region_ids = tuple(hosting.register_region(region) for region in regions)
    rewritten = _rewrite(model, regions, region_ids, taken)
    return Partition(rewritten, tuple(regions), region_ids, tuple(skipped))


def _finish(region: Region, regions: list[Region], consumed_outside: set[str]) -> None:
    """Set the region's outputs (what onnxruntime or another region reads) and boundary types."""
    inside_reads = {name for other in regions if other is not region for chain in other.chains
                    for name in (chain.input, chain.residual) if name}
    region.inputs = []
    region.outputs = [chain.output for chain in region.chains
                      if chain.output in consumed_outside or chain.output in inside_reads]
    region.finish()


def _rewrite(model: onnx.ModelProto, regions: list[Region], region_ids, taken: set[int]) -> onnx.ModelProto:
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    graph = rewritten.graph
    nodes = [node for index, node in enumerate(graph.node) if index not in taken]
    for region, region_id in zip(regions, region_ids):
        op_type = hosting.operator_type(region.input_types, region.output_types)
        nodes.append(helper.make_node(op_type, region.inputs, region.outputs, name=f"onnxsparse_{region_id}",
                                      domain=hosting.DOMAIN, **{hosting.REGION_ATTRIBUTE: region_id}))
    del graph.node[:]
    graph.node.extend(_topological(nodes))
    if not any(opset.domain == hosting.DOMAIN for opset in rewritten.opset_import):
        rewritten.opset_import.append(helper.make_opsetid(hosting.DOMAIN, 1))
    model_io.remove_unused(rewritten)
    return rewritten


def _topological(nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """Nodes in an order where every input is produced first (stable: graph order where possible)."""
    produced_by = {out: i for i, node in enumerate(nodes) for out in node.output}
    waiting = {i: {name for name in node.input if name and name in produced_by} for i, node in enumerate(nodes)}
    consumers: dict[int, list[int]] = {}
    for i, needs in waiting.items():
        for name in needs:
            consumers.setdefault(produced_by[name], []).append(i)
    pending = {i: len({produced_by[name] for name in needs}) for i, needs in waiting.items()}
    ready = [i for i, count in pending.items() if count == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(nodes[i])
        for consumer in dict.fromkeys(consumers.get(i, [])):
            pending[consumer] -= 1
            if pending[consumer] == 0:
                heapq.heappush(ready, consumer)
    if len(order) != len(nodes):
        raise Unsupported("the partition would make the graph cyclic")
    return order
