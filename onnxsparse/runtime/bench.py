"""`onnxsparse bench`: a packed model against dense onnxruntime fp32 and int8, side by side.

All sessions live in one process and run interleaved (round r runs every session once, in turn,
with a short pause before each run so the previous engine's threads stop spinning; odd rounds
run them in reverse order), so machine noise hits them alike. Times are medians over the rounds;
a speed-up is the median over rounds of that round's ratio: the runs of one round are within a
second of each other, so a slow phase of a shared machine hits both sides of each ratio (the
ratio of two medians can mix a slow phase on one side with a fast one on the other).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from onnxsparse.errors import OnnxSparseError, UsageError
from onnxsparse.formats.pack import DOMAIN, unpack_model
from onnxsparse.runner import random_inputs


@dataclass(frozen=True)
class Timing:
    name: str  # what ran
    engine: str  # "onnxsparse" | "onnxruntime"
    precision: str  # "fp32" | "int8"
    median_ms: float
    p10_ms: float
    p90_ms: float
    runs: int


@dataclass(frozen=True)
class BenchResult:
    batch: int
    threads: int
    timings: tuple[Timing, ...]
    max_output_difference: float  # packed vs its unpacked model in onnxruntime (float outputs; ints in units)
    sparse_layers: int
    dense_layers: int
    regions: int
    speedups: dict[str, float]  # baseline Timing name -> median over rounds of baseline / packed

    def ratio(self, baseline: str) -> float | None:
        """How many times faster the packed model runs than `baseline` (a Timing name)."""
        return self.speedups.get(baseline)


def is_quantized(model: onnx.ModelProto) -> bool:
    return any(node.op_type in ("QuantizeLinear", "QLinearConv", "QGemm", "QLinearMatMul", "DequantizeLinear")
               for node in model.graph.node)


def with_batch(model: onnx.ModelProto, batch: int) -> onnx.ModelProto:
    """A copy whose graph inputs and outputs have batch dimension `batch` (stale inner shapes
    dropped). Constant Reshape targets written for batch 1 ([1, ...]) get 0 there ("copy the
    input's dimension"), as exporters of fixed-batch models write the batch into them."""
    if batch < 1:
        raise UsageError(f"batch must be at least 1, not {batch}")
    edited = onnx.ModelProto()
    edited.CopyFrom(model)
    initializers = {init.name for init in edited.graph.initializer}
    if batch != 1:
        targets = {node.input[1] for node in edited.graph.node if node.op_type == "Reshape" and len(node.input) > 1}
        for init in edited.graph.initializer:
            if init.name in targets:
                shape = numpy_helper.to_array(init)
                if shape.ndim == 1 and shape.size >= 2 and shape[0] == 1:
                    init.CopyFrom(numpy_helper.from_array(np.concatenate([[0], shape[1:]]).astype(shape.dtype),
                                                          init.name))
    for value in [*edited.graph.input, *edited.graph.output]:
        if value.name in initializers or not value.type.tensor_type.HasField("shape"):
            continue
        dims = value.type.tensor_type.shape.dim
        if len(dims):
            dims[0].Clear()
            dims[0].dim_value = batch
    del edited.graph.value_info[:]
    return edited


def _int8_dense(float_model: onnx.ModelProto, seed: int) -> onnx.ModelProto:
    """onnxruntime's int8 form of the dense model: QDQ from onnxsparse quantize on seeded random
    calibration inputs (timing does not depend on the values), 7-bit weights as onnxruntime's
    reduce_range (docs/QUANTIZATION.md: its u8s8 kernels saturate on full-range weights here)."""
    from onnxsparse.quant.quantize import quantize

    samples = [{name: value[0] for name, value in random_inputs(float_model, seed + k).items()} for k in range(4)]
    return quantize(float_model, samples, weight_bits=7)


# Before each run: onnxruntime's workers keep spinning for tens of milliseconds after a run and
# would compete with the next engine's threads in the same process (measured with ResNet-50: the
# engine run next took 63-68 ms instead of 38 ms after a pause of 0-20 ms, 38-41 ms after 100 ms+).
SETTLE_SECONDS = 0.1


def round_speedups(samples: dict[str, list[float]], packed: str = "packed") -> dict[str, float]:
    """Per baseline: the median over rounds of baseline time / packed time in that round."""
    return {name: statistics.median(b / p for b, p in zip(values, samples[packed]))
            for name, values in samples.items() if name != packed}


def _timed(run: Callable[[], object], rounds_sink: list[float]) -> None:
    time.sleep(SETTLE_SECONDS)
    started = time.perf_counter()
    run()
    rounds_sink.append((time.perf_counter() - started) * 1e3)


def bench(packed: onnx.ModelProto, against: onnx.ModelProto | None = None, *, threads: int = 2, batch: int = 1,
          rounds: int = 30, warmup: int = 3, seed: int = 0, int8_baseline: bool = True,
          on_round: Callable[[], None] | None = None) -> BenchResult:
    from onnxsparse.model import onnxruntime_session
    from onnxsparse.runner import runtime_session

    if not any(node.domain == DOMAIN for node in packed.graph.node):
        raise UsageError("MODEL is not packed; `onnxsparse pack` it first (bench compares a packed model "
                         "with dense onnxruntime)")
    if rounds < 1 or warmup < 0 or threads < 1:
        raise UsageError("rounds and threads must be at least 1, warmup at least 0")
    unpacked = unpack_model(packed)
    quantized = is_quantized(unpacked)
    float_model = against if against is not None else (None if quantized else unpacked)
    candidates: list[tuple[str, str, str, onnx.ModelProto]] = []
    if float_model is not None:
        candidates.append(("onnxruntime fp32", "onnxruntime", "fp32", float_model))
    if int8_baseline or quantized:
        int8_model = unpacked if quantized else _int8_dense(float_model, seed)
        candidates.append(("onnxruntime int8", "onnxruntime", "int8", int8_model))

    sessions = [(name, engine, precision, onnxruntime_session(with_batch(model, batch), threads))
                for name, engine, precision, model in candidates]
    packed_session = runtime_session(with_batch(packed, batch), threads)
    sessions.append(("packed", "onnxsparse", "int8" if quantized else "fp32", packed_session))
    feeds = random_inputs(with_batch(packed, batch), seed)

    try:
        reference = onnxruntime_session(with_batch(unpacked, batch), threads).run(None, feeds)
        got = packed_session.run(None, feeds)
    except Exception as exc:  # onnxruntime's message says which node failed on these inputs
        raise OnnxSparseError(f"the model does not run at batch {batch}: {str(exc).splitlines()[0][:300]}") from exc
    difference = max((float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0)
                     for a, b in zip(got, reference))

    samples: dict[str, list[float]] = {name: [] for name, *_ in sessions}
    for round_index in range(warmup + rounds):
        for name, _, _, session in (sessions if round_index % 2 == 0 else sessions[::-1]):
            sink = samples[name] if round_index >= warmup else []
            _timed(lambda s=session: s.run(None, feeds), sink)
        if on_round is not None and round_index >= warmup:
            on_round()
    timings = []
    for name, engine, precision, _ in sessions:
        values = sorted(samples[name])
        timings.append(Timing(name, engine, precision, statistics.median(values),
                              float(np.percentile(values, 10)), float(np.percentile(values, 90)), len(values)))
    speedups = round_speedups(samples)
    plan = packed_session.plan
    return BenchResult(batch, threads, tuple(timings), difference, len(plan.sparse_layers), len(plan.dense_layers),
                       len(plan.partition.regions), speedups)
