"""Native sparse conv kernels vs dense onnxruntime on every ResNet-50 conv layer shape.

Per unique conv shape of the (materialized) ResNet-50, batch 1, 2 threads: the median latency of
onnxruntime's dense float32 Conv and of onnxsparse._native.ConvF32 at 1x16 sparsities, then of
onnxruntime's QLinearConv (uint8 activations, int8 per-channel weights) and of ConvQ8. Repeats are
interleaved (every variant once per round), so machine noise hits all of them alike. Totals weigh
each shape by how many of the 53 convs have it.

    .venv/bin/python benchmarks/kernel_layers.py [--quick] [--json results.json]
    .venv/bin/python benchmarks/kernel_layers.py --pool   # ResNet-50's MaxPool in float32, uint8, int8
    .venv/bin/python benchmarks/kernel_layers.py --fc     # ResNet-50's FC (2048 -> 1000), batch 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper, shape_inference

from onnxsparse import _native
from onnxsparse.quant.arithmetic import requantize_multiplier
from onnxsparse.runtime.bench import SETTLE_SECONDS
from onnxsparse.zoo import zoo_model_path

SPARSITIES = (0.5, 0.75, 0.8, 0.9)
BLOCK = 16
THREADS = 2


@dataclass(frozen=True)
class ConvShape:
    channels: int
    height: int
    width: int
    out_channels: int
    kernel: int
    stride: int
    pad: int

    @property
    def label(self) -> str:
        return (f"{self.kernel}x{self.kernel}/s{self.stride} {self.channels:>4}->{self.out_channels:<4} "
                f"{self.height}x{self.width}")


@dataclass
class LayerResult:
    shape: str
    count: int
    latency_ms: dict[str, float]  # variant -> median latency


def resnet50_conv_shapes() -> Counter:
    """Unique conv shapes of ResNet-50 and how many convs have each."""
    model = shape_inference.infer_shapes(onnx.load(zoo_model_path("resnet50")))
    shapes = {value.name: [d.dim_value for d in value.type.tensor_type.shape.dim]
              for value in list(model.graph.value_info) + list(model.graph.input)}
    weights = {init.name: list(init.dims) for init in model.graph.initializer}
    counts: Counter = Counter()
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        _, channels, height, width = shapes[node.input[0]]
        out_channels, _, kernel, _ = weights[node.input[1]]
        counts[ConvShape(channels, height, width, out_channels, kernel, attrs.get("strides", [1, 1])[0],
                         attrs.get("pads", [0] * 4)[0])] += 1
    return counts


def block_pruned(weight: np.ndarray, sparsity: float, rng: np.random.Generator) -> np.ndarray:
    """Zero whole (16 output channels x 1 input channel x kernel) units; every block keeps the same count."""
    out_channels, channels = weight.shape[:2]
    kept = max(1, round((1 - sparsity) * channels))
    units = np.zeros((out_channels // BLOCK, channels), bool)
    for row in units:
        row[rng.choice(channels, kept, replace=False)] = True
    return weight * np.repeat(units, BLOCK, axis=0)[:, :, None, None]


def ort_session(nodes, initializers, x_type) -> ort.InferenceSession:
    graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", x_type, None)],
                              [helper.make_tensor_value_info("y", x_type, None)],
                              [numpy_helper.from_array(v, k) for k, v in initializers.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def layer_variants(shape: ConvShape, rng: np.random.Generator):
    """name -> zero-argument callable running the layer once."""
    conv = dict(strides=(shape.stride,) * 2, pads=(shape.pad,) * 4, dilations=(1, 1), groups=1)
    attrs = dict(kernel_shape=[shape.kernel] * 2, strides=[shape.stride] * 2, pads=[shape.pad] * 4)
    weight = (rng.standard_normal((shape.out_channels, shape.channels, shape.kernel, shape.kernel))
              * np.sqrt(2.0 / (shape.channels * shape.kernel ** 2))).astype(np.float32)
    bias = rng.standard_normal(shape.out_channels).astype(np.float32) * 0.1
    x = rng.standard_normal((1, shape.channels, shape.height, shape.width)).astype(np.float32)
    variants = {}

    session = ort_session([helper.make_node("Conv", ["x", "w", "b"], ["y"], **attrs)], {"w": weight, "b": bias},
                          TensorProto.FLOAT)
    variants["ort_f32"] = lambda: session.run(None, {"x": x})
    for sparsity in SPARSITIES:
        native = _native.ConvF32(block_pruned(weight, sparsity, rng).astype(np.float32), bias, **conv)
        variants[f"f32_{sparsity:.0%}"] = lambda native=native: native.run(x)

    # 8-bit: uint8 activations, int8 per-channel symmetric weights (7-bit for onnxruntime, whose
    # vpmaddubsw kernel saturates on full-range int8 weights here; its speed does not depend on it)
    x_q = rng.integers(0, 256, x.shape).astype(np.uint8)
    x_scale, x_zero_point, y_scale = np.float32(0.02), 128, np.float32(0.05)
    w_scale = (np.abs(weight).reshape(shape.out_channels, -1).max(axis=1) / 63).astype(np.float32)
    weight_q = np.clip(np.rint(weight / w_scale[:, None, None, None]), -63, 63).astype(np.int8)
    bias_q = rng.integers(-1000, 1000, shape.out_channels).astype(np.int32)
    initializers = {"xs": x_scale, "xz": np.uint8(x_zero_point), "w": weight_q, "ws": w_scale,
                    "wz": np.zeros(shape.out_channels, np.int8), "ys": y_scale, "yz": np.uint8(100), "b": bias_q}
    q_session = ort_session([helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz", "b"],
                                              ["y"], **attrs)], initializers, TensorProto.UINT8)
    variants["ort_q8"] = lambda: q_session.run(None, {"x": x_q})
    multiplier = requantize_multiplier(x_scale, w_scale, y_scale)
    for sparsity in SPARSITIES:
        pruned = block_pruned(weight_q, sparsity, rng).astype(np.int8)
        native = _native.ConvQ8(pruned, bias_q, x_zero_point, False, multiplier.multiplier, multiplier.shift, 100,
                                False, **conv)
        variants[f"q8_{sparsity:.0%}"] = lambda native=native: native.run(x_q)
    return variants


POOL_ELEMENT_TYPES = {"float32": TensorProto.FLOAT, "uint8": TensorProto.UINT8, "int8": TensorProto.INT8}


def pool_variants(rng: np.random.Generator):
    """ResNet-50's MaxPool (3x3, stride 2, pads 1 on 64x112x112) in onnxruntime and natively, per type."""
    attrs = dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    native = _native.MaxPool([3, 3], [2, 2], [1, 1, 1, 1], [1, 1])
    variants = {}
    for name, element in POOL_ELEMENT_TYPES.items():
        dtype = np.dtype(name)
        if dtype.kind == "f":
            x = rng.standard_normal((1, 64, 112, 112)).astype(dtype)
        else:
            x = rng.integers(np.iinfo(dtype).min, np.iinfo(dtype).max + 1, (1, 64, 112, 112)).astype(dtype)
        session = ort_session([helper.make_node("MaxPool", ["x"], ["y"], **attrs)], {}, element)
        np.testing.assert_array_equal(native.run(x), session.run(None, {"x": x})[0])
        variants[f"ort_{name}"] = lambda session=session, x=x: session.run(None, {"x": x})
        variants[f"native_{name}"] = lambda x=x: native.run(x)
    return variants


def fc_variants(rng: np.random.Generator):
    """ResNet-50's FC (Gemm 2048 -> 1000, batch 1): onnxruntime dense, native at 1x8 sparsities."""
    weight = (rng.standard_normal((1000, 2048)) * np.sqrt(1 / 2048)).astype(np.float32)
    bias = rng.standard_normal(1000).astype(np.float32) * 0.1
    x = rng.standard_normal((1, 2048)).astype(np.float32)
    session = ort_session([helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)], {"w": weight, "b": bias},
                          TensorProto.FLOAT)
    variants = {"ort_f32": lambda: session.run(None, {"x": x})}
    for sparsity in SPARSITIES:
        units = rng.random((1000 // 8, 2048)) >= sparsity
        pruned = (weight * np.repeat(units, 8, axis=0)).reshape(1000, 2048, 1, 1)
        native = _native.ConvF32(pruned, bias, strides=(1, 1), pads=(0,) * 4, dilations=(1, 1), groups=1)
        variants[f"f32_{sparsity:.0%}"] = lambda native=native: native.run(x.reshape(1, 2048, 1, 1))
    return variants


def median_latencies_ms(variants: dict, rounds: int, sample_seconds: float) -> dict[str, float]:
    """Interleaved rounds; each sample averages enough calls to last about sample_seconds."""
    calls = {}
    for name, run in variants.items():
        run()
        start = time.perf_counter()
        run()
        calls[name] = max(1, int(sample_seconds / max(time.perf_counter() - start, 1e-6)))
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, run in variants.items():
            time.sleep(SETTLE_SECONDS)  # let the previous variant's onnxruntime workers stop spinning
            start = time.perf_counter()
            for _ in range(calls[name]):
                run()
            samples[name].append((time.perf_counter() - start) / calls[name] * 1e3)
    return {name: statistics.median(values) for name, values in samples.items()}


def print_table(results: list[LayerResult], kind: str) -> None:
    baseline = f"ort_{kind}"
    names = [baseline] + [f"{kind}_{s:.0%}" for s in SPARSITIES]
    header = f"{'layer':<32}{'n':>3}" + "".join(f"{name:>10}" for name in names) + \
        "".join(f"{'x' + name.split('_')[1]:>8}" for name in names[1:])
    print(f"\n{kind}: median latency (ms) and speed-up over onnxruntime dense (x = ort / ours)")
    print(header)
    totals = dict.fromkeys(names, 0.0)
    for result in results:
        for name in names:
            totals[name] += result.count * result.latency_ms[name]
        line = f"{result.shape:<32}{result.count:>3}" + "".join(f"{result.latency_ms[n]:>10.3f}" for n in names)
        line += "".join(f"{result.latency_ms[baseline] / result.latency_ms[n]:>8.2f}" for n in names[1:])
        print(line)
    line = f"{'total (53 convs)':<32}{sum(r.count for r in results):>3}" + "".join(f"{totals[n]:>10.2f}" for n in names)
    print(line + "".join(f"{totals[baseline] / totals[n]:>8.2f}" for n in names[1:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and shorter samples")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--pool", action="store_true", help="time ResNet-50's MaxPool instead of the convs")
    parser.add_argument("--fc", action="store_true", help="time ResNet-50's FC layer instead of the convs")
    args = parser.parse_args()
    rounds, sample_seconds = (3, 0.01) if args.quick else (9, 0.03)
    _native.set_num_threads(THREADS)
    rng = np.random.default_rng(0)
    if args.pool:
        latency = median_latencies_ms(pool_variants(rng), rounds, sample_seconds)
        print(f"MaxPool 3x3/s2 pads 1 on 64x112x112, batch 1, {THREADS} threads, native SIMD path: "
              f"{_native.simd_level()}; median ms")
        for name in POOL_ELEMENT_TYPES:
            ours, theirs = latency[f"native_{name}"], latency[f"ort_{name}"]
            print(f"{name:<8} onnxruntime {theirs:7.3f}  native {ours:7.3f}  {theirs / ours:6.2f}x")
        return
    if args.fc:
        latency = median_latencies_ms(fc_variants(rng), rounds, sample_seconds)
        print(f"FC 2048 -> 1000 (Gemm), batch 1, {THREADS} threads, 1x8 blocks; median ms")
        for name, value in latency.items():
            print(f"{name:<8} {value:7.3f}  {latency['ort_f32'] / value:6.2f}x")
        return
    results = []
    for shape, count in resnet50_conv_shapes().items():
        latency = median_latencies_ms(layer_variants(shape, rng), rounds, sample_seconds)
        results.append(LayerResult(shape.label, count, latency))
        print(f"measured {shape.label}", flush=True)
    print(f"\nbatch 1, {THREADS} threads, native SIMD path: {_native.simd_level()}, onnxruntime {ort.__version__}")
    print_table(results, "f32")
    print_table(results, "q8")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump([asdict(r) for r in results], handle, indent=1)


if __name__ == "__main__":
    main()
