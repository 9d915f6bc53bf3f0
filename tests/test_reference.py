"""The integer reference executor: agreement with onnxruntime, the exact rounding rule, rejections."""

from __future__ import annotations

import time

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

from onnxsparse.errors import OnnxSparseError, UsageError
from onnxsparse.model import onnxruntime_session
from onnxsparse.quant.reference import SUPPORTED_OPS, ReferenceExecutor, run_reference

MS = "com.microsoft"


# ---------------------------------------------------------------------------------------------
# Building integer-form models
# ---------------------------------------------------------------------------------------------


class GraphBuilder:
    """Collects nodes and initializers of a small integer-form model."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []

    def constant(self, name: str, value) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def input(self, name: str, dtype, shape) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), shape))
        return name

    def node(self, op_type: str, inputs: list[str], output: str, domain: str = "", **attrs) -> str:
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=f"{op_type}_{len(self.nodes)}",
                                           domain=domain, **attrs))
        return output

    def quant_params(self, prefix: str, scale, zero_point, dtype) -> list[str]:
        return [self.constant(f"{prefix}_scale", np.asarray(scale, np.float32)),
                self.constant(f"{prefix}_zero_point", np.asarray(zero_point, dtype))]

    def model(self, *outputs: str) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "integer_form", self.inputs,
                                  [helper.make_empty_tensor_value_info(name) for name in outputs], self.initializers)
        # make_model_gen_version knows no IR version for com.microsoft: stamp it from the default domain's
        model = helper.make_model_gen_version(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.opset_import.append(helper.make_opsetid(MS, 1))
        return model


def activation_params(dtype, rng: np.random.Generator) -> tuple[np.float32, int]:
    """A scale and zero point as the quantizer makes them (uint8 asymmetric, int8 symmetric)."""
    scale = np.float32(rng.uniform(0.01, 0.05))
    return scale, (int(rng.integers(100, 156)) if dtype == np.uint8 else 0)


def random_activation(rng: np.random.Generator, dtype, shape) -> np.ndarray:
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, shape, endpoint=True).astype(dtype)


def random_weight(rng: np.random.Generator, shape, activation_type) -> np.ndarray:
    """int8 weights; 7-bit against uint8 activations, as onnxruntime's quantizer makes them (reduce_range).

    onnxruntime's uint8 x int8 kernels on x86 without VNNI (AVX2, as here) add pairs of products in int16
    with saturation (vpmaddubsw), so 8-bit weights there give errors of many units; int8 activations take
    a path that does not saturate.
    """
    limit = 63 if np.dtype(activation_type) == np.uint8 else 127
    return rng.integers(-limit, limit, shape, endpoint=True).astype(np.int8)


def output_scale(x_scale: float, w_scale: np.ndarray, fan_in: int) -> np.float32:
    """y_scale that spreads a random accumulator over a few dozen output steps, with little saturation."""
    return np.float32(float(x_scale) * float(np.mean(w_scale)) * np.sqrt(fan_in) * 74 * 50 / 60)


def add_conv(g: GraphBuilder, x: str, x_scale, x_zero_point, dtype, in_channels: int, out_channels: int,
             kernel: tuple[int, ...], rng: np.random.Generator, *, group: int = 1, per_channel: bool = True,
             bias: bool = True, output: str = "y", **attrs) -> tuple[str, np.float32, int]:
    """A QLinearConv with random int8 weights; returns (output, its scale, its zero point)."""
    weight = random_weight(rng, (out_channels, in_channels // group) + kernel, dtype)
    w_scale = rng.uniform(0.002, 0.01, out_channels if per_channel else ()).astype(np.float32)
    y_scale, y_zero_point = output_scale(x_scale, w_scale, weight[0].size), activation_params(dtype, rng)[1]
    inputs = [x, *g.quant_params(f"{output}_x", x_scale, x_zero_point, dtype), g.constant(f"{output}_w", weight),
              *g.quant_params(f"{output}_w", w_scale, np.zeros_like(w_scale, np.int8), np.int8),
              *g.quant_params(output, y_scale, y_zero_point, dtype)]
    if bias:
        inputs.append(g.constant(f"{output}_bias", rng.integers(-3000, 3000, out_channels).astype(np.int32)))
    return g.node("QLinearConv", inputs, output, group=group, **attrs), y_scale, y_zero_point


def run_both(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    ours = ReferenceExecutor(model).run(feeds)
    theirs = onnxruntime_session(model).run(None, feeds)
    return list(zip(ours, theirs))


def agreement(ours: np.ndarray, theirs: np.ndarray) -> tuple[int, int]:
    """(number of differing elements, largest |difference|) of two quantized tensors: a count, not a
    fraction, so that limits compare exactly ((1 - 0.98) * 50 is 1.0000000000000009)."""
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    difference = np.abs(ours.astype(np.int64) - theirs.astype(np.int64))
    return int(np.count_nonzero(difference)), int(difference.max(initial=0))


def assert_agrees_with_onnxruntime(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> None:
    for ours, theirs in run_both(model, feeds):
        differing, largest = agreement(ours, theirs)
        assert largest <= 1, f"differs by {largest}"
        # ties that float rounding decides are rare: at most 1% of elements, or one in a small tensor
        assert differing <= max(1, 0.01 * ours.size), f"{differing} of {ours.size} differ"


# ---------------------------------------------------------------------------------------------
# Agreement with onnxruntime, op by op
# ---------------------------------------------------------------------------------------------

CONV_CASES = {
    "uint8_3x3_pads_per_tensor": dict(dtype=np.uint8, channels=(8, 16), kernel=(3, 3), per_channel=False,
                                      pads=[1, 1, 1, 1]),
    "int8_group2_stride2_bias": dict(dtype=np.int8, channels=(8, 12), kernel=(3, 3), group=2, strides=[2, 2],
                                     pads=[1, 1, 1, 1]),
    "uint8_depthwise": dict(dtype=np.uint8, channels=(16, 16), kernel=(3, 3), group=16, pads=[1, 1, 1, 1]),
    "int8_depthwise_multiplier2_stride2": dict(dtype=np.int8, channels=(8, 16), kernel=(3, 3), group=8,
                                               strides=[2, 2], pads=[0, 1, 1, 0]),
    "uint8_dilation2": dict(dtype=np.uint8, channels=(6, 8), kernel=(3, 3), dilations=[2, 2], pads=[2, 2, 2, 2]),
    "uint8_1x1_no_bias": dict(dtype=np.uint8, channels=(32, 16), kernel=(1, 1), bias=False),
    "uint8_5x3_asymmetric_pads": dict(dtype=np.uint8, channels=(4, 8), kernel=(5, 3), pads=[2, 0, 1, 1]),
    "uint8_same_upper_stride2": dict(dtype=np.uint8, channels=(8, 8), kernel=(3, 3), strides=[2, 2],
                                     auto_pad="SAME_UPPER"),
    "int8_same_lower_stride2": dict(dtype=np.int8, channels=(8, 8), kernel=(4, 4), strides=[2, 2],
                                    auto_pad="SAME_LOWER"),
    "uint8_valid": dict(dtype=np.uint8, channels=(8, 8), kernel=(3, 3), auto_pad="VALID"),
    "int8_1d": dict(dtype=np.int8, channels=(8, 16), kernel=(5,), strides=[2], pads=[2, 2], spatial=(31,)),
}


@pytest.mark.parametrize("case", CONV_CASES, ids=list(CONV_CASES))
def test_qlinear_conv_agrees_with_onnxruntime(case):
    params = dict(CONV_CASES[case])
    rng = np.random.default_rng(sum(map(ord, case)))
    dtype, (in_channels, out_channels), kernel = params.pop("dtype"), params.pop("channels"), params.pop("kernel")
    spatial = params.pop("spatial", (15, 13))
    g = GraphBuilder()
    x_scale, x_zero_point = activation_params(dtype, rng)
    x = g.input("x", dtype, [2, in_channels, *spatial])
    y, _, _ = add_conv(g, x, x_scale, x_zero_point, dtype, in_channels, out_channels, kernel, rng, **params)
    assert_agrees_with_onnxruntime(g.model(y), {"x": random_activation(rng, dtype, (2, in_channels, *spatial))})


@st.composite
def window_geometries(draw, pool: bool = False) -> dict:
    """A small 2-D input size and conv (dilations) or pool (ceil_mode) window attributes that fit it."""
    kernel = [draw(st.integers(1, 3)) for _ in range(2)]
    strides = [draw(st.integers(1, 3)) for _ in range(2)]
    auto_pad = draw(st.sampled_from(["NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"]))
    attrs = dict(kernel_shape=kernel, strides=strides)
    if auto_pad == "NOTSET":
        attrs["pads"] = [draw(st.integers(0, k - 1)) for k in kernel * 2]  # pads below the kernel, as pools need
        if pool:
            attrs["ceil_mode"] = draw(st.integers(0, 1))
    else:
        attrs["auto_pad"] = auto_pad
    if pool and auto_pad.startswith("SAME"):
        # a stride above the kernel makes SAME's padding negative: onnxruntime's pools then start the first
        # window inside the input, its conv and this executor clamp the padding at 0 (as TensorFlow does)
        attrs["strides"] = [min(s, k) for s, k in zip(strides, kernel)]
    if not pool and not auto_pad.startswith("SAME"):  # onnxruntime has no dilated SAME conv
        attrs["dilations"] = [draw(st.integers(1, 2)) for _ in range(2)]
    extents = [(k - 1) * d + 1 for k, d in zip(kernel, attrs.get("dilations", [1, 1]))]
    size = tuple(max(draw(st.integers(3, 9)), extent) for extent in extents)
    return dict(size=size, attrs=attrs)


@settings(max_examples=40, deadline=None)
@given(geometry=window_geometries(), groups=st.sampled_from([1, 2, 4]), seed=st.integers(0, 2**16))
def test_qlinear_conv_window_geometry_agrees_with_onnxruntime(geometry, groups, seed):
    rng = np.random.default_rng(seed)
    attrs = dict(geometry["attrs"])
    kernel = tuple(attrs.pop("kernel_shape"))
    g = GraphBuilder()
    x = g.input("x", np.int8, [1, 4, *geometry["size"]])
    y, _, _ = add_conv(g, x, np.float32(0.03), 0, np.int8, 4, 8, kernel, rng, group=groups, **attrs)
    assert_agrees_with_onnxruntime(g.model(y), {"x": random_activation(rng, np.int8, (1, 4, *geometry["size"]))})


@settings(max_examples=40, deadline=None)
@given(geometry=window_geometries(pool=True), seed=st.integers(0, 2**16))
def test_max_pool_window_geometry_matches_onnxruntime(geometry, seed):
    rng = np.random.default_rng(seed)
    g = GraphBuilder()
    model = g.model(g.node("MaxPool", [g.input("x", np.int8, [1, 2, *geometry["size"]])], "y", **geometry["attrs"]))
    feeds = {"x": random_activation(rng, np.int8, (1, 2, *geometry["size"]))}
    for ours, theirs in run_both(model, feeds):
        assert np.array_equal(ours, theirs)


@settings(max_examples=40, deadline=None)
@given(geometry=window_geometries(pool=True), include_pad=st.integers(0, 1), seed=st.integers(0, 2**16))
def test_qlinear_average_pool_window_geometry_agrees_with_onnxruntime(geometry, include_pad, seed):
    attrs = dict(geometry["attrs"])  # ceil_mode with count_include_pad: see test_average_pool_window_past_the_pad…
    attrs["count_include_pad"] = 0 if attrs.get("ceil_mode") else include_pad
    rng = np.random.default_rng(seed)
    g = GraphBuilder()
    x_scale, x_zero_point, y_scale = 0.0314, 3, 0.0217
    inputs = [g.input("x", np.int8, [1, 2, *geometry["size"]]), *g.quant_params("x", x_scale, x_zero_point, np.int8),
              *g.quant_params("y", y_scale, -5, np.int8)]
    model = g.model(g.node("QLinearAveragePool", inputs, "y", domain=MS, **attrs))
    x = random_activation(rng, np.int8, (1, 2, *geometry["size"]))
    [(ours, theirs)] = run_both(model, {"x": x})
    # Where they differ (by at most 1), the real value must lie at a rounding tie that onnxruntime's
    # float32 arithmetic decides: mean(x - x_zero_point) * scale ratio, the mean from a float
    # AveragePool of the same window geometry (within 1e-5). Equal window sums repeat a tie, so no
    # count of differences is safe.
    average = helper.make_graph([helper.make_node("AveragePool", ["x"], ["y"], **attrs)], "average",
                                [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None)],
                                [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)])
    average_model = helper.make_model(average, opset_imports=[helper.make_opsetid("", 19)], ir_version=8)
    mean = onnxruntime_session(average_model).run(None, {"x": x.astype(np.float32) - x_zero_point})[0]
    real = mean.astype(np.float64) * float(np.float32(x_scale)) / float(np.float32(y_scale))
    assert agreement(ours, theirs)[1] <= 1
    differing = ours != theirs
    assert np.all(np.abs(np.abs(real[differing] % 1.0) - 0.5) < 1e-3), real[differing]


@pytest.mark.parametrize("weight_type, weight_zero_point",
                         [(np.uint8, np.arange(100, 108)), (np.int8, np.arange(-4, 4)), (np.uint8, 128)])
def test_qlinear_conv_subtracts_weight_zero_points_per_channel(weight_type, weight_zero_point):
    rng = np.random.default_rng(11)
    info = np.iinfo(weight_type)
    weight = rng.integers(info.min // 2, info.max // 2 + 1, (8, 4, 3, 3)) + (128 if weight_type == np.uint8 else 0)
    weight_zero_point = np.asarray(weight_zero_point, weight_type)
    g = GraphBuilder()
    inputs = [g.input("x", np.uint8, [1, 4, 9, 9]), *g.quant_params("x", 0.02, 120, np.uint8),
              g.constant("w", weight.astype(weight_type)),
              *g.quant_params("w", np.full(weight_zero_point.shape, 0.005, np.float32), weight_zero_point, weight_type),
              *g.quant_params("y", 0.05, 128, np.uint8)]
    model = g.model(g.node("QLinearConv", inputs, "y", pads=[1, 1, 1, 1]))
    assert_agrees_with_onnxruntime(model, {"x": random_activation(rng, np.uint8, (1, 4, 9, 9))})


def matmul_model(a_shape, b_shape, per_column: bool, rng) -> onnx.ModelProto:
    g = GraphBuilder()
    a_scale, a_zero_point = activation_params(np.uint8, rng)
    b = random_weight(rng, b_shape, np.uint8)
    b_scale = rng.uniform(0.002, 0.01, b_shape[-1] if per_column else ()).astype(np.float32)
    y_scale = output_scale(a_scale, b_scale, b_shape[-2])
    inputs = [g.input("a", np.uint8, list(a_shape)), *g.quant_params("a", a_scale, a_zero_point, np.uint8),
              g.constant("b", b), *g.quant_params("b", b_scale, np.zeros_like(b_scale, np.int8), np.int8),
              *g.quant_params("y", y_scale, 128, np.uint8)]
    return g.model(g.node("QLinearMatMul", inputs, "y"))


@pytest.mark.parametrize("a_shape, b_shape, per_column", [((7, 20), (20, 9), False), ((3, 7, 20), (20, 9), True),
                                                          ((2, 3, 5, 16), (3, 16, 4), False)])
def test_qlinear_matmul_agrees_with_onnxruntime(a_shape, b_shape, per_column):
    rng = np.random.default_rng(len(a_shape) + per_column)
    model = matmul_model(a_shape, b_shape, per_column, rng)
    assert_agrees_with_onnxruntime(model, {"a": random_activation(rng, np.uint8, a_shape)})


def qgemm_model(rows: int, depth: int, columns: int, rng, y_scale=None) -> onnx.ModelProto:
    """QGemm A[rows, depth] · B^T with B stored [columns, depth] (transB), per-column b, int32 bias."""
    g = GraphBuilder()
    a_scale, a_zero_point = activation_params(np.uint8, rng)
    b = random_weight(rng, (columns, depth), np.uint8)
    b_scale = rng.uniform(0.002, 0.01, columns).astype(np.float32)
    inputs = [g.input("a", np.uint8, [rows, depth]), *g.quant_params("a", a_scale, a_zero_point, np.uint8),
              g.constant("b", b), *g.quant_params("b", b_scale, np.zeros(columns, np.int8), np.int8),
              g.constant("c", rng.integers(-5000, 5000, columns).astype(np.int32))]
    if y_scale is not False:
        inputs += g.quant_params("y", output_scale(a_scale, b_scale, depth) if y_scale is None else y_scale, 128,
                                 np.uint8)
    return g.model(g.node("QGemm", inputs, "y", domain=MS, transB=1))


def test_qgemm_transb_agrees_with_onnxruntime():
    rng = np.random.default_rng(3)
    assert_agrees_with_onnxruntime(qgemm_model(6, 64, 10, rng), {"a": random_activation(rng, np.uint8, (6, 64))})


@pytest.mark.parametrize("dtype, a_shape, b_shape", [(np.uint8, (2, 4, 6, 6), (1, 4, 1, 1)),
                                                     (np.int8, (3, 1, 5), (4, 1)), (np.uint8, (8, 8), (8, 8))])
def test_qlinear_add_agrees_with_onnxruntime(dtype, a_shape, b_shape):
    rng = np.random.default_rng(len(a_shape) * 10 + len(b_shape))
    g = GraphBuilder()
    inputs = []
    for name, shape in (("a", a_shape), ("b", b_shape)):
        inputs += [g.input(name, dtype, list(shape)), *g.quant_params(name, *activation_params(dtype, rng), dtype)]
    inputs += g.quant_params("y", *activation_params(dtype, rng), dtype)
    model = g.model(g.node("QLinearAdd", inputs, "y", domain=MS))
    feeds = {"a": random_activation(rng, dtype, a_shape), "b": random_activation(rng, dtype, b_shape)}
    assert_agrees_with_onnxruntime(model, feeds)


def concat_model(params: list[tuple[float, int]], y_params: tuple[float, int], shapes, axis: int) -> onnx.ModelProto:
    g = GraphBuilder()
    inputs = g.quant_params("y", *y_params, np.uint8)
    for index, ((scale, zero_point), shape) in enumerate(zip(params, shapes)):
        inputs += [g.input(f"x{index}", np.uint8, list(shape)),
                   *g.quant_params(f"x{index}", scale, zero_point, np.uint8)]
    return g.model(g.node("QLinearConcat", inputs, "y", domain=MS, axis=axis))


@pytest.mark.parametrize("equal", [True, False], ids=["equal_params", "unequal_params"])
def test_qlinear_concat_agrees_with_onnxruntime(equal):
    rng = np.random.default_rng(int(equal))
    y_params = (0.03, 120)
    params = [y_params] * 3 if equal else [(0.02, 100), y_params, (0.05, 140)]
    shapes = [(1, 3, 5, 5), (1, 4, 5, 5), (1, 2, 5, 5)]
    feeds = {f"x{i}": random_activation(rng, np.uint8, shape) for i, shape in enumerate(shapes)}
    model = concat_model(params, y_params, shapes, axis=1)
    assert_agrees_with_onnxruntime(model, feeds)
    if equal:
        assert np.array_equal(run_reference(model, feeds)[0], np.concatenate(list(feeds.values()), axis=1))


AVERAGE_POOL_CASES = {
    "3x3_stride2_pads_include": dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=1),
    "3x3_stride2_pads_exclude": dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=0),
    "ceil_mode_exclude": dict(kernel_shape=[2, 3], strides=[2, 2], pads=[1, 0, 1, 0], ceil_mode=1),
    "same_upper": dict(kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER"),
    "channels_last": dict(kernel_shape=[2, 2], strides=[1, 1], pads=[1, 1, 0, 0], channels_last=1),
}


@pytest.mark.parametrize("case", AVERAGE_POOL_CASES, ids=list(AVERAGE_POOL_CASES))
@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
def test_qlinear_average_pool_agrees_with_onnxruntime(case, dtype):
    attrs = AVERAGE_POOL_CASES[case]
    rng = np.random.default_rng(sum(map(ord, case)))
    shape = (2, 10, 10, 6) if attrs.get("channels_last") else (2, 6, 10, 10)
    g = GraphBuilder()
    inputs = [g.input("x", dtype, list(shape)), *g.quant_params("x", *activation_params(dtype, rng), dtype),
              *g.quant_params("y", *activation_params(dtype, rng), dtype)]
    model = g.model(g.node("QLinearAveragePool", inputs, "y", domain=MS, **attrs))
    assert_agrees_with_onnxruntime(model, {"x": random_activation(rng, dtype, shape)})


def test_average_pool_window_past_the_padding_divides_by_its_padded_part():
    # ceil_mode adds last windows that run past the end pad. With count_include_pad, n counts the window's
    # positions inside the padded input, as AveragePool does (ONNX's reference, onnxruntime, PyTorch);
    # onnxruntime's QLinearAveragePool divides by the whole kernel there instead.
    attrs = dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 0, 1, 0], ceil_mode=1, count_include_pad=1)
    g = GraphBuilder()
    inputs = [g.input("x", np.uint8, [1, 1, 10, 10]), *g.quant_params("x", 1.0, 0, np.uint8),
              *g.quant_params("y", 1 / 36, 0, np.uint8)]
    quantized = g.model(g.node("QLinearAveragePool", inputs, "y", domain=MS, **attrs))
    g = GraphBuilder()
    float_pool = g.model(g.node("AveragePool", [g.input("x", np.float32, [1, 1, 10, 10])], "y", **attrs))
    ones = np.ones((1, 1, 10, 10), np.uint8)
    ours = run_reference(quantized, {"x": ones})[0]  # 36 · (input elements) / n
    expected = onnxruntime_session(float_pool).run(None, {"x": ones.astype(np.float32)})[0] * 36
    assert np.array_equal(ours, np.rint(expected))
    assert ours[0, 0, -1, 0] == 18 and ours[0, 0, 0, -1] == 24  # 3 of 6 and 6 of 9 positions are input


@pytest.mark.parametrize("channels_last", [0, 1])
def test_qlinear_global_average_pool_agrees_with_onnxruntime(channels_last):
    rng = np.random.default_rng(channels_last)
    shape = (2, 7, 7, 64) if channels_last else (2, 64, 7, 7)
    g = GraphBuilder()
    inputs = [g.input("x", np.uint8, list(shape)), *g.quant_params("x", *activation_params(np.uint8, rng), np.uint8),
              *g.quant_params("y", 0.01, 128, np.uint8)]
    model = g.model(g.node("QLinearGlobalAveragePool", inputs, "y", domain=MS, channels_last=channels_last))
    assert_agrees_with_onnxruntime(model, {"x": random_activation(rng, np.uint8, shape)})


@pytest.mark.parametrize("attrs", [dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
                                   dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
                                   dict(kernel_shape=[2, 2], dilations=[2, 2], pads=[0, 1, 1, 0]),
                                   dict(kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_LOWER")],
                         ids=["pads", "ceil_mode", "dilations", "same_lower"])
def test_max_pool_on_uint8_matches_onnxruntime_exactly(attrs):
    rng = np.random.default_rng(5)
    g = GraphBuilder()
    model = g.model(g.node("MaxPool", [g.input("x", np.uint8, [1, 4, 12, 11])], "y", **attrs))
    feeds = {"x": random_activation(rng, np.uint8, (1, 4, 12, 11))}
    for ours, theirs in run_both(model, feeds):
        assert np.array_equal(ours, theirs)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
def test_quantize_dequantize_per_axis_matches_onnxruntime(dtype):
    rng = np.random.default_rng(6)
    g = GraphBuilder()
    scale = rng.uniform(0.01, 0.1, 5).astype(np.float32)
    zero_point = rng.integers(-20, 20, 5).astype(dtype) if dtype == np.int8 else rng.integers(100, 150, 5).astype(dtype)
    q = g.node("QuantizeLinear", [g.input("x", np.float32, [3, 4, 5]), *g.quant_params("q", scale, zero_point, dtype)],
               "q", axis=2)
    g.node("DequantizeLinear", [q, "q_scale", "q_zero_point"], "r", axis=-1)
    x = rng.normal(0, 4, (3, 4, 5)).astype(np.float32)
    x[0, 0] = scale * 2.5  # exact ties round to even
    for ours, theirs in run_both(g.model("q", "r"), {"x": x}):
        assert ours.dtype == theirs.dtype and np.array_equal(ours, theirs)


def test_float_island_after_dequantize_matches_onnxruntime():
    rng = np.random.default_rng(7)
    g = GraphBuilder()
    r = g.node("DequantizeLinear", [g.input("q", np.uint8, [2, 3, 4]), *g.quant_params("q", 0.05, 128, np.uint8)], "r")
    flat = g.node("Flatten", [g.node("Relu", [r], "relu")], "flat", axis=1)
    clipped = g.node("Clip", [flat, g.constant("low", np.float32(-1)), g.constant("high", np.float32(2))], "clip")
    model = g.model(g.node("Softmax", [clipped], "y", axis=-1))
    for ours, theirs in run_both(model, {"q": random_activation(rng, np.uint8, (2, 3, 4))}):
        np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# The documented rounding rule decides
# ---------------------------------------------------------------------------------------------


def one_by_one_conv(x_scale: float, w_scale: float, y_scale: float, weight: int, dtype=np.int8,
                    bias: int | None = None) -> onnx.ModelProto:
    """x[1, 1, 1, n] convolved with a single 1x1 weight: y = sat(z_y + R((x − z_x) · w + b, M))."""
    g = GraphBuilder()
    inputs = [g.input("x", dtype, [1, 1, 1, None]), *g.quant_params("x", x_scale, 0, dtype),
              g.constant("w", np.full((1, 1, 1, 1), weight, np.int8)), *g.quant_params("w", w_scale, 0, np.int8),
              *g.quant_params("y", y_scale, 0, dtype)]
    if bias is not None:
        inputs.append(g.constant("b", np.array([bias], np.int32)))
    return g.model(g.node("QLinearConv", inputs, "y"))


def test_requantization_ties_round_to_even():
    # M = 0.5: accumulators 1, 3, 5, -1, -3, -5 land on .5 and go to the even neighbour
    x = np.array([1, 3, 5, -1, -3, -5, 4, 7], np.int8).reshape(1, 1, 1, -1)
    y = run_reference(one_by_one_conv(0.5, 1.0, 1.0, weight=1), {"x": x})[0]
    assert y.reshape(-1).tolist() == [0, 2, 2, 0, -2, -2, 2, 4]


def test_requantization_ties_with_bias_and_three_eighths():
    # M = 3/8 (multiplier 0.75·2^31, shift 32): A = 4 → 1.5 → 2; A = 12 → 4.5 → 4; A = 4 + bias 8 = 12 → 4
    x = np.array([4, 12, 20], np.int8).reshape(1, 1, 1, -1)
    assert run_reference(one_by_one_conv(0.375, 1.0, 1.0, weight=1), {"x": x})[0].reshape(-1).tolist() == [2, 4, 8]
    x = np.array([4], np.int8).reshape(1, 1, 1, 1)
    assert run_reference(one_by_one_conv(0.375, 1.0, 1.0, weight=1, bias=8), {"x": x})[0].item() == 4


def test_requantization_rounds_the_exact_product_where_float_finds_a_tie():
    # x_scale = float32(0.1) = 13421773 · 2^-27, slightly above 0.1: A = 5 gives A·M = 0.5000000075, which the
    # fixed-point rule rounds up to 1; float32 arithmetic rounds the product to 0.5 and then to 0.
    model = one_by_one_conv(0.1, 1.0, 1.0, weight=1)
    x = np.array([5, -5, 15], np.int8).reshape(1, 1, 1, -1)
    ours = run_reference(model, {"x": x})[0].reshape(-1)
    assert ours.tolist() == [1, -1, 2]
    theirs = onnxruntime_session(model).run(None, {"x": x})[0].reshape(-1)
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1


def test_qlinear_add_ties_round_to_even():
    # s_a = s_b = 1, s_y = 2: y = rhe((a + b) / 2)
    g = GraphBuilder()
    inputs = [g.input("a", np.int8, [6]), *g.quant_params("a", 1.0, 0, np.int8),
              g.input("b", np.int8, [6]), *g.quant_params("b", 1.0, 0, np.int8), *g.quant_params("y", 2.0, 0, np.int8)]
    model = g.model(g.node("QLinearAdd", inputs, "y", domain=MS))
    a, b = np.array([1, 2, 4, -1, -2, 127], np.int8), np.array([0, 1, 1, 0, -1, 127], np.int8)
    assert run_reference(model, {"a": a, "b": b})[0].tolist() == [0, 2, 2, 0, -2, 127]


def test_average_pool_ties_round_to_even_and_saturate():
    # 2x2 windows at s_x = s_y: the sums 2, 6, 10 over 4 land on .5; a zero point shifts before saturation
    g = GraphBuilder()
    inputs = [g.input("x", np.uint8, [1, 1, 2, 8]), *g.quant_params("x", 0.1, 0, np.uint8),
              *g.quant_params("y", 0.1, 250, np.uint8)]
    model = g.model(g.node("QLinearAveragePool", inputs, "y", domain=MS, kernel_shape=[2, 2], strides=[2, 2]))
    x = np.array([[1, 1, 1, 2, 2, 3, 9, 9], [0, 0, 1, 2, 2, 3, 9, 9]], np.uint8).reshape(1, 1, 2, 8)
    assert run_reference(model, {"x": x})[0].reshape(-1).tolist() == [250, 252, 252, 255]


def test_concat_requantizes_only_inputs_with_other_parameters():
    # input 0 at scale 0.5 into output scale 1.0: q = rhe((q − z) / 2) + z_y; input 1 shares the output's parameters
    model = concat_model([(0.5, 10), (1.0, 20)], (1.0, 20), [(1, 4), (1, 2)], axis=1)
    feeds = {"x0": np.array([[11, 13, 15, 0]], np.uint8), "x1": np.array([[7, 255]], np.uint8)}
    assert run_reference(model, feeds)[0].tolist() == [[20, 22, 22, 15, 7, 255]]


# ---------------------------------------------------------------------------------------------
# A ResNet-50 bottleneck block in integer form
# ---------------------------------------------------------------------------------------------


def bottleneck_model(channels: int, width: int, size: int, rng: np.random.Generator) -> onnx.ModelProto:
    """QuantizeLinear → 1x1 → 3x3 → 1x1 QLinearConv → QLinearAdd with the block input → DequantizeLinear."""
    g = GraphBuilder()
    x_scale, x_zero_point = np.float32(0.04), 0
    q = g.node("QuantizeLinear", [g.input("x", np.float32, [1, channels, size, size]),
                                  *g.quant_params("input", x_scale, x_zero_point, np.uint8)], "q")
    a, a_scale, a_zero_point = add_conv(g, q, x_scale, x_zero_point, np.uint8, channels, width, (1, 1), rng,
                                        output="conv1")
    b, b_scale, b_zero_point = add_conv(g, a, a_scale, a_zero_point, np.uint8, width, width, (3, 3), rng,
                                        output="conv2", pads=[1, 1, 1, 1])
    c, c_scale, c_zero_point = add_conv(g, b, b_scale, b_zero_point, np.uint8, width, channels, (1, 1), rng,
                                        output="conv3")
    add_inputs = [c, *g.quant_params("add_c", c_scale, c_zero_point, np.uint8),
                  q, *g.quant_params("add_q", x_scale, x_zero_point, np.uint8),
                  *g.quant_params("sum", 0.08, 0, np.uint8)]
    total = g.node("QLinearAdd", add_inputs, "sum", domain=MS)
    return g.model(g.node("DequantizeLinear", [total, "sum_scale", "sum_zero_point"], "y"))


def block_input(rng: np.random.Generator, channels: int, size: int) -> np.ndarray:
    return np.abs(rng.normal(0, 3, (1, channels, size, size))).astype(np.float32)  # post-ReLU activations


def test_bottleneck_block_agrees_with_onnxruntime_within_one_step():
    rng = np.random.default_rng(50)
    model = bottleneck_model(64, 16, 14, rng)
    feeds = {"x": block_input(rng, 64, 14)}
    outputs = ["conv1", "conv2", "conv3", "sum"]
    ours = ReferenceExecutor(model).run(feeds, outputs)
    theirs = onnxruntime_session(_with_outputs(model, outputs)).run(outputs, feeds)
    for name, our, their in zip(outputs, ours, theirs):
        differing, largest = agreement(our, their)
        assert largest <= 1 and differing <= 0.01 * our.size, \
            f"{name}: {differing} of {our.size} differ, max diff {largest}"
        assert len(np.unique(our)) > 20, f"{name} is degenerate"


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    del exposed.graph.output[:]
    exposed.graph.output.extend(helper.make_empty_tensor_value_info(name) for name in names)
    return exposed


def test_resnet50_bottleneck_block_runs_in_well_under_five_seconds():
    rng = np.random.default_rng(56)
    executor = ReferenceExecutor(bottleneck_model(256, 64, 56, rng))
    feeds = {"x": block_input(rng, 256, 56)}
    start = time.perf_counter()
    first = executor.run(feeds)[0]
    elapsed = time.perf_counter() - start
    assert elapsed < 5.0
    assert np.array_equal(first, executor.run(feeds)[0])  # deterministic


# ---------------------------------------------------------------------------------------------
# What the executor refuses
# ---------------------------------------------------------------------------------------------


def test_unsupported_op_is_rejected_naming_the_node():
    g = GraphBuilder()
    model = g.model(g.node("Sigmoid", [g.input("x", np.float32, [4])], "y"))
    with pytest.raises(OnnxSparseError, match=r"node Sigmoid_0 \(Sigmoid\): not supported .*supported: .*QLinearConv"):
        ReferenceExecutor(model)


@pytest.mark.parametrize("op_type", ["Relu", "Clip"])
def test_relu_and_clip_on_integers_are_rejected_naming_the_node(op_type):
    g = GraphBuilder()
    model = g.model(g.node(op_type, [g.input("q", np.uint8, [4])], "y"))
    with pytest.raises(OnnxSparseError, match=rf"node {op_type}_0 \({op_type}\): .*not part of the integer form"):
        ReferenceExecutor(model)


def test_float_output_qgemm_is_rejected():
    with pytest.raises(OnnxSparseError, match="float output QGemm not supported"):
        ReferenceExecutor(qgemm_model(2, 4, 3, np.random.default_rng(0), y_scale=False))


def test_scale_fed_at_run_time_is_rejected():
    g = GraphBuilder()
    inputs = [g.input("x", np.uint8, [4]), g.input("x_scale", np.float32, []),
              g.constant("x_zero_point", np.uint8(0))]
    model = g.model(g.node("DequantizeLinear", inputs, "y"))
    with pytest.raises(OnnxSparseError, match=r"node DequantizeLinear_0 .*x_scale.*must be a constant"):
        ReferenceExecutor(model)


def test_missing_feed_and_wrong_type_are_usage_errors_naming_the_input():
    executor = ReferenceExecutor(matmul_model((2, 4), (4, 3), False, np.random.default_rng(0)))
    with pytest.raises(UsageError, match="input a: missing"):
        executor.run({})
    with pytest.raises(UsageError, match="input a: expected uint8, got int8"):
        executor.run({"a": np.zeros((2, 4), np.int8)})


def test_any_intermediate_tensor_can_be_asked_for():
    rng = np.random.default_rng(9)
    model = bottleneck_model(8, 4, 5, rng)
    feeds = {"x": block_input(rng, 8, 5)}
    q, y = ReferenceExecutor(model).run(feeds, ["q", "y"])
    assert q.dtype == np.uint8 and q.shape == (1, 8, 5, 5)
    assert np.array_equal(y, run_reference(model, feeds)[0])


def test_supported_ops_cover_the_integer_form():
    for op in ("QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "MaxPool", "Softmax"):
        assert ("", op) in SUPPORTED_OPS
    for op in ("QGemm", "QLinearAdd", "QLinearConcat", "QLinearAveragePool", "QLinearGlobalAveragePool"):
        assert (MS, op) in SUPPORTED_OPS


@pytest.mark.parametrize("shift", [0, 1, 2, 13, 31, 62])
def test_shift_round_half_even_has_one_rule_for_one_shift_and_for_many(shift):
    """The rounding rule's two paths (one shift for every value, and a shift per value) both round
    v / 2**shift to nearest with ties to even, exactly, on random values and on every kind of tie."""
    from fractions import Fraction

    from onnxsparse.quant.arithmetic import shift_round_half_even

    rng = np.random.default_rng(shift)
    ties = [(2 * k + 1) << (shift - 1) for k in range(-40, 40)] if shift else []
    values = [int(v) for v in rng.integers(-2**61, 2**61, 500)] + ties + [k << shift for k in range(-40, 40)]
    values = np.array([v for v in values if abs(v) < 2**62], np.int64)
    expected = np.array([round(Fraction(int(v), 2**shift)) for v in values], np.int64)
    np.testing.assert_array_equal(shift_round_half_even(values, shift), expected)
    np.testing.assert_array_equal(shift_round_half_even(values, np.full(values.shape, shift)), expected)
