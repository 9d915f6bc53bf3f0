"""Pack's kernel choice: run a layer sparse only where the native kernel beats dense onnxruntime.

Measured, not predicted: the layer alone (its node and constants, a seeded random input of its
inferred batch-1 shape) runs in dense onnxruntime and in the native kernel the runtime would build
for it (the same chain code, called directly: in a model, consecutive sparse layers share one
region, so hosting costs are per region, not per layer): 9 runs of each, one side after the other
with a pause between, each side's fastest run counting (the least disturbed by other work on the
machine, which distorts short multi-threaded runs far more than it slows them evenly). The sparse kernel must win by a margin (a region boundary costs a
copy the single layer does not see).
The choice and both times are recorded on the packed node (docs/RUNTIME.md).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxsparse import model as model_io
from onnxsparse.runtime.bench import SETTLE_SECONDS

# Sparse runs only when it takes at most this fraction of the dense time.
WIN_MARGIN = 0.85
ROUNDS = 9
# A layer without zeros runs dense unless the whole model runs faster with it in the native kernels
# (the "all native" variant of choose_for_model).
NO_ZEROS = "no zeros"
NATIVE_WITHOUT_ZEROS = "no zeros; native with the rest of the model"


@dataclass(frozen=True)
class KernelChoice:
    kernel: str  # "sparse" | "dense"
    reason: str
    sparse_ms: float | None = None
    dense_ms: float | None = None

    def record(self) -> dict:
        return {"kernel": self.kernel, "reason": self.reason, "sparse_ms": self.sparse_ms, "dense_ms": self.dense_ms}


def _layer_model(model: onnx.ModelProto, lookups: model_io.GraphIndex, node: onnx.NodeProto,
                 shapes: dict, types: dict) -> onnx.ModelProto | None:
    """The node alone: its activation input as the graph input, every other input a constant."""
    x = node.input[0]
    if shapes.get(x) is None or x not in types:
        return None
    initializers = []
    for name in node.input[1:]:
        if not name:
            continue
        value = lookups.constant(name)
        if value is None:
            return None
        initializers.append(numpy_helper.from_array(value, name))
    single = onnx.NodeProto()
    single.CopyFrom(node)
    single.output[:] = [node.output[0]]
    output_type = types.get(node.output[0], types[x])
    graph = helper.make_graph([single], "layer", [helper.make_tensor_value_info(x, types[x], shapes[x])],
                              [helper.make_tensor_value_info(node.output[0], output_type, None)], initializers)
    return helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=8)


class KernelChooser:
    """Measures each weight-bearing layer of one model (shape inference done once)."""

    def __init__(self, model: onnx.ModelProto, threads: int = 2):
        self.model = model
        self.threads = threads
        self.lookups = model_io.GraphIndex(model)
        self.shapes = model_io.infer_shapes(model)
        self.types = model_io.element_types(model)

    def choose(self, node: onnx.NodeProto) -> KernelChoice:
        from onnxsparse.model import onnxruntime_session
        from onnxsparse.runtime.regions import partition
        from onnxsparse.runtime.session import native_kernels

        weight = self.lookups.constant(node.input[1] if node.op_type in ("Conv", "Gemm", "MatMul") else node.input[3])
        if weight is not None and np.count_nonzero(weight) == weight.size:
            return KernelChoice("dense", NO_ZEROS)
        layer = _layer_model(self.model, self.lookups, node, self.shapes, self.types)
        if layer is None:
            return KernelChoice("dense", "input shape unknown")
        native = native_kernels()
        named = onnx.ModelProto()
        named.CopyFrom(layer)
        named.graph.node[0].name = node.name or "layer"
        split = partition(named, {named.graph.node[0].name}, native)
        try:
            if not split.regions:
                return KernelChoice("dense", split.skipped[0][1] if split.skipped else "no native kernel")
            native.set_num_threads(self.threads)
            dense = onnxruntime_session(layer, self.threads)
            region = split.regions[0]
            x = _random_input(layer.graph.input[0])
            dense_ms, sparse_ms = _interleaved(lambda: dense.run(None, {layer.graph.input[0].name: x}),
                                               lambda: region(x))
        finally:
            from onnxsparse.runtime import hosting

            hosting.release_regions(split.region_ids)
        if sparse_ms <= WIN_MARGIN * dense_ms:
            return KernelChoice("sparse", f"alone {dense_ms / sparse_ms:.2f}x faster than dense", sparse_ms, dense_ms)
        return KernelChoice("dense", f"alone, sparse kernel not faster ({sparse_ms:.3f} vs {dense_ms:.3f} ms)",
                            sparse_ms, dense_ms)


def _random_input(value: onnx.ValueInfoProto) -> np.ndarray:
    rng = np.random.default_rng(0)
    dtype = helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
    shape = [d.dim_value if d.dim_value > 0 else 1 for d in value.type.tensor_type.shape.dim]
    if np.issubdtype(dtype, np.floating):
        return rng.standard_normal(shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, shape, endpoint=True).astype(dtype)


def _interleaved(dense, sparse) -> tuple[float, float]:
    """Fastest of ROUNDS runs each: the dense runs back to back (onnxruntime's threads spin
    between them, as in a model), then a pause for them to stop, then the sparse runs."""
    times = []
    for run in (dense, sparse):
        time.sleep(SETTLE_SECONDS)
        run()  # warm-up
        samples = []
        for _ in range(ROUNDS):
            started = time.perf_counter()
            run()
            samples.append((time.perf_counter() - started) * 1e3)
        times.append(min(samples))
    return times[0], times[1]


@dataclass(frozen=True)
class ModelChoice:
    model: onnx.ModelProto  # the packed model with the winning variant's records
    chosen: str
    times_ms: dict[str, float]
    records: dict[str, dict]  # node name -> its execution record
    rounds: int  # rounds measured per variant


def _records(model: onnx.ModelProto) -> dict[str, dict]:
    from onnxsparse.formats.pack import EXECUTION_ATTRIBUTE

    found = {}
    for node in model.graph.node:
        for attribute in node.attribute:
            if attribute.name == EXECUTION_ATTRIBUTE:
                found[model_io.display_name(node)] = json.loads(helper.get_attribute_value(attribute))
    return found


def _with_records(model: onnx.ModelProto, update) -> onnx.ModelProto:
    """A copy whose execution records are update(record)."""
    from onnxsparse.formats.pack import EXECUTION_ATTRIBUTE

    variant = onnx.ModelProto()
    variant.CopyFrom(model)
    for node in variant.graph.node:
        for attribute in node.attribute:
            if attribute.name == EXECUTION_ATTRIBUTE:
                record = update(json.loads(helper.get_attribute_value(attribute)))
                attribute.CopyFrom(helper.make_attribute(EXECUTION_ATTRIBUTE, json.dumps(record, sort_keys=True)))
    return variant


def _with_kernels(model: onnx.ModelProto, kernel_of) -> onnx.ModelProto:
    """A copy whose execution records say kernel_of(record) instead."""
    return _with_records(model, lambda r: {**r, "kernel": kernel_of(r)})


def _native_without_zeros(record: dict) -> dict:
    return {**record, "kernel": "sparse", "reason": NATIVE_WITHOUT_ZEROS} if record.get("reason") == NO_ZEROS else record


def model_variants(packed: onnx.ModelProto) -> dict[str, onnx.ModelProto]:
    """The packed model as measured per layer, all sparse, all native (only when some layer has no
    zeros) and all dense, in that order."""
    variants = {
        "per layer": packed,
        "all sparse": _with_kernels(packed, lambda r: "sparse" if r.get("sparse_ms") is not None else r["kernel"]),
    }
    if any(r.get("reason") == NO_ZEROS for r in _records(packed).values()):
        variants["all native"] = _with_records(variants["all sparse"], _native_without_zeros)
    variants["all dense"] = _with_kernels(packed, lambda r: "dense")
    return variants


def choose_for_model(packed: onnx.ModelProto, threads: int = 2, rounds: int = 15) -> ModelChoice:
    """Settle the per-layer choices on the whole model: per-layer winners can lose together (each
    dense layer between sparse ones splits a region and its copies; onnxruntime's threads then run
    without spinning), so the variants run end to end, interleaved (odd rounds in reverse) — as
    measured per layer, every layer that has a native kernel sparse, the same with the layers
    without zeros in the native kernels too (when there are any: a dense stem convolution in front
    of a region costs more in onnxruntime, whose threads do not spin there, than in the region),
    and all dense (plain onnxruntime) — and the one with the largest speed-up over all dense (the
    median over rounds of each round's ratio, as bench reports) is kept if it beats all dense by
    the same margin as a layer must and wins at least three rounds in four (`decide`); when that is
    close, as many rounds again, and the decision is made on all of them. All dense being the
    default is what keeps a packed model from running slower than dense onnxruntime."""
    from onnxsparse.runner import random_inputs, runtime_session

    variants = model_variants(packed)
    feeds = random_inputs(packed)
    sessions = {name: runtime_session(model, threads) for name, model in variants.items()}
    times: dict[str, list[float]] = {name: [] for name in variants}
    order = list(sessions.items())

    def measure(count: int) -> None:
        for round_index in range(count + 1):  # round 0 warms up
            for name, session in (order if round_index % 2 == 0 else order[::-1]):
                time.sleep(SETTLE_SECONDS)
                started = time.perf_counter()
                session.run(None, feeds)
                if round_index:
                    times[name].append((time.perf_counter() - started) * 1e3)

    measure(rounds)
    chosen, close = decide(times)
    if close:  # near the margin: as many rounds again, and decide on all of them
        measure(rounds)
        chosen, _ = decide(times)
    for session in sessions.values():
        session.close()
    summary = {name: round(statistics.median(values), 3) for name, values in times.items()}
    model = _with_records(variants[chosen], lambda r: {**r, "model_variant": chosen, "model_ms": summary})
    return ModelChoice(model, chosen, summary, _records(model), len(times["all dense"]))


# A decision is measured again with twice the rounds when the best speed-up is within this factor
# of the margin (1/WIN_MARGIN), or the second best within this factor of the best: a slow phase of
# a shared machine moves 15 rounds that far (all sparse and all native on ResNet-50 at 80%: 6% apart,
# and either was kept on 15 rounds).
CLOSE_FACTOR = 1.15
RIVAL_FACTOR = 1.08


def decide(times: dict[str, list[float]]) -> tuple[str, bool]:
    """(the variant to keep, whether the decision was close) from per-round times (ms) of each
    variant, "all dense" among them. The speed-up is the median over rounds of each round's ratio to
    all dense, as bench reports; of two variants within RIVAL_FACTOR of each other, the one faster
    head to head in the median round. It is kept only when its median round wins by the margin and
    at least three rounds in four are faster than all dense, else all dense."""
    ratios = {name: [d / v for d, v in zip(times["all dense"], values)]
              for name, values in times.items() if name != "all dense"}
    if not ratios:
        return "all dense", False
    speedups = {name: statistics.median(values) for name, values in ratios.items()}
    ranked = sorted(speedups, key=speedups.get, reverse=True)
    best = ranked[0]
    if len(ranked) > 1 and speedups[ranked[1]] * RIVAL_FACTOR >= speedups[best]:
        # two variants within a slow phase of each other: keep the one faster head to head (the
        # median round's ratio of their own times, which all dense's run does not enter)
        runner = ranked[1]
        if statistics.median(r / b for r, b in zip(times[runner], times[best])) < 1.0:
            best = runner
    margin = 1.0 / WIN_MARGIN
    close = margin / CLOSE_FACTOR <= speedups[best] <= margin * CLOSE_FACTOR
    rivals = sorted(speedups.values(), reverse=True)
    close = close or (len(rivals) > 1 and rivals[0] >= margin and rivals[1] * RIVAL_FACTOR >= rivals[0])
    # a small or uncertain gain is not worth the risk
    if speedups[best] < margin or float(np.percentile(ratios[best], 25)) < 1.0:
        return "all dense", close
    return best, close
