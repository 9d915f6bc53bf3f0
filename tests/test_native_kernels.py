"""onnxsparse._native: ConvF32 against onnxruntime, ConvQ8 bit for bit against the integer reference.

Every case runs on both SIMD paths (the `simd` fixture); weights follow the sparsity patterns the
kernels must recognise (dense, unstructured, 1x16, 1x4, 2:4, bank) or handle generally.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnxsparse import _native
from onnxsparse.quant.arithmetic import add_rescale, requantize_multiplier
from onnxsparse.quant.reference import run_reference

SIMD_LEVELS = ["avx2", "scalar"]


@pytest.fixture(params=SIMD_LEVELS)
def simd(request):
    if request.param == "avx2" and not _cpu_has_avx2():
        pytest.skip("this CPU has no AVX2+FMA")
    _native.set_simd_level(request.param)
    yield request.param
    _native.set_simd_level("auto")


def _cpu_has_avx2() -> bool:
    try:
        _native.set_simd_level("avx2")
    except ValueError:
        return False
    finally:
        _native.set_simd_level("auto")
    return True


@dataclass(frozen=True)
class Case:
    name: str
    batch: int
    channels: int
    height: int
    width: int
    out_channels: int
    kernel: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)  # top, left, bottom, right
    dilations: tuple[int, int] = (1, 1)
    groups: int = 1
    pattern: str = "dense"

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        return (self.out_channels, self.channels // self.groups) + self.kernel


CASES = [
    Case("1x1_1x16", 1, 32, 9, 9, 32, (1, 1), pattern="1x16"),
    Case("1x1_direct_1x16", 1, 64, 14, 14, 64, (1, 1), pattern="1x16"),
    Case("1x1_stride2_unstructured", 1, 32, 9, 9, 32, (1, 1), strides=(2, 2), pattern="unstructured"),
    Case("1x1_dense_batch3", 3, 24, 5, 7, 20, (1, 1)),
    Case("3x3_pad1_1x16", 1, 16, 10, 12, 32, (3, 3), pads=(1, 1, 1, 1), pattern="1x16"),
    Case("3x3_stride2_asymmetric_1x4", 3, 16, 11, 9, 16, (3, 3), strides=(2, 2), pads=(0, 1, 2, 1), pattern="1x4"),
    Case("3x3_dilation2_2to4", 1, 8, 12, 12, 16, (3, 3), pads=(2, 2, 2, 2), dilations=(2, 2), pattern="2:4"),
    Case("3x3_groups2_bank", 3, 16, 8, 8, 32, (3, 3), pads=(1, 1, 1, 1), groups=2, pattern="bank"),
    Case("3x3_depthwise", 1, 16, 9, 9, 16, (3, 3), pads=(1, 1, 1, 1), groups=16),
    Case("3x3_unpadded_unstructured", 1, 8, 9, 9, 16, (3, 3), pattern="unstructured"),
    Case("3x1_unpadded_unstructured", 1, 8, 30, 10, 16, (3, 1), pattern="unstructured"),
    Case("7x7_stride2_stem", 1, 3, 20, 20, 16, (7, 7), strides=(2, 2), pads=(3, 3, 3, 3)),
    Case("5x5_stride3_1x16", 3, 8, 17, 16, 16, (5, 5), strides=(3, 3), pads=(2, 0, 1, 2), pattern="1x16"),
    # more pixels than one work item's tile (768 float, 896 8-bit): several tiles, a partial last chunk
    Case("1x1_many_tiles_1x16", 1, 8, 41, 45, 32, (1, 1), pattern="1x16"),
    Case("3x3_pad1_many_tiles_1x4", 2, 8, 37, 41, 16, (3, 3), pads=(1, 1, 1, 1), pattern="1x4"),
    # one output pixel (Gemm rows): the kernels vectorize over a block's rows instead of pixels
    Case("gemm_rows_1x16", 3, 64, 1, 1, 48, (1, 1), pattern="1x16"),
    Case("gemm_rows_1x8", 2, 50, 1, 1, 24, (1, 1), pattern="1x8"),
    Case("gemm_rows_dense_partial_block", 1, 33, 1, 1, 20, (1, 1)),
    Case("gemm_rows_unstructured", 2, 40, 1, 1, 12, (1, 1), pattern="unstructured"),
    Case("gemm_rows_1x4_groups2", 2, 16, 1, 1, 8, (1, 1), groups=2, pattern="1x4"),
]

EXPECTED_ENCODING = {"dense": "dense", "1x16": "block16", "1x8": "block8", "1x4": "block4", "unstructured": "csr",
                     "2:4": "csr", "bank": "csr"}


def pattern_mask(shape: tuple[int, ...], pattern: str, rng: np.random.Generator) -> np.ndarray:
    """A keep-mask of `pattern` on a conv weight [O, C/g, kh, kw] (a 1xN unit is N rows x 1 channel x kernel)."""
    out_channels, channels = shape[:2]
    if pattern == "dense":
        return np.ones(shape, bool)
    if pattern == "unstructured":
        return rng.random(shape) >= 0.7
    if pattern in ("1x16", "1x8", "1x4"):
        block = int(pattern[2:])
        units = rng.random((out_channels // block, channels)) >= 0.75
        units[:, 0] |= ~units.any(axis=1)  # every block keeps at least one channel
        return np.broadcast_to(np.repeat(units, block, axis=0)[:, :, None, None], shape).copy()
    keep, group = {"2:4": (2, 4), "bank": (2, 8)}[pattern]
    # along each strip (one output channel at one kernel position), `keep` of every `group` channels
    scores = rng.random((out_channels, shape[2], shape[3], channels // group, group))
    ranks = scores.argsort(axis=-1).argsort(axis=-1)
    return (ranks < keep).reshape(out_channels, shape[2], shape[3], channels).transpose(0, 3, 1, 2)


def float_weight(case: Case, rng: np.random.Generator) -> np.ndarray:
    weight = rng.standard_normal(case.weight_shape).astype(np.float32)
    weight[weight == 0] = 1.0
    return weight * pattern_mask(case.weight_shape, case.pattern, rng)


def int8_weight(case: Case, rng: np.random.Generator) -> np.ndarray:
    """Full-range int8 (-128 included: the values vpmaddubsw would saturate on)."""
    weight = rng.integers(-128, 128, case.weight_shape)
    weight[weight == 0] = 1
    return (weight * pattern_mask(case.weight_shape, case.pattern, rng)).astype(np.int8)


def _model(nodes, inputs, initializers, output_type=TensorProto.FLOAT, opset_imports=None):
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", output_type, None)],
                              [numpy_helper.from_array(value, name) for name, value in initializers.items()])
    return helper.make_model(graph, opset_imports=opset_imports or [helper.make_opsetid("", 17)], ir_version=8)


def _conv_attributes(case: Case) -> dict:
    return dict(kernel_shape=list(case.kernel), strides=list(case.strides), pads=list(case.pads),
                dilations=list(case.dilations), group=case.groups)


def ort_float_conv(case: Case, x, weight, bias, residual=None, clamp=None) -> np.ndarray:
    """onnxruntime's Conv (-> Add residual) (-> Clip)."""
    initializers = {"w": weight, "b": bias}
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["conv"], **_conv_attributes(case))]
    last = "conv"
    feeds = {"x": x}
    if residual is not None:
        inputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, list(residual.shape)))
        nodes.append(helper.make_node("Add", [last, "r"], ["sum"]))
        last, feeds["r"] = "sum", residual
    if clamp is not None:
        initializers.update(low=np.float32(clamp[0]), high=np.float32(clamp[1]))
        nodes.append(helper.make_node("Clip", [last, "low", "high"], ["clipped"]))
        last = "clipped"
    nodes.append(helper.make_node("Identity", [last], ["y"]))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(_model(nodes, inputs, initializers).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def assert_float_close(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.shape == expected.shape and actual.dtype == np.float32
    scale = max(float(np.abs(expected).max()), 1.0)
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4 * scale)


def make_conv_f32(case: Case, weight, bias, **clamp) -> _native.ConvF32:
    return _native.ConvF32(weight, bias, case.strides, case.pads, case.dilations, case.groups, **clamp)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_conv_f32_matches_onnxruntime_with_fused_epilogues(case: Case, simd):
    rng = np.random.default_rng(7)
    weight, bias = float_weight(case, rng), rng.standard_normal(case.out_channels).astype(np.float32)
    x = rng.standard_normal((case.batch, case.channels, case.height, case.width)).astype(np.float32)
    conv = make_conv_f32(case, weight, bias)
    assert conv.encoding == EXPECTED_ENCODING[case.pattern]
    assert conv.nonzeros == np.count_nonzero(weight)
    expected = ort_float_conv(case, x, weight, bias)
    assert conv.output_shape(x.shape) == expected.shape
    assert_float_close(conv.run(x), expected)

    assert_float_close(make_conv_f32(case, weight, bias, clamp_min=0.0).run(x),
                       ort_float_conv(case, x, weight, bias, clamp=(0.0, np.inf)))
    assert_float_close(make_conv_f32(case, weight, None, clamp_min=-0.5, clamp_max=1.5).run(x),
                       ort_float_conv(case, x, weight, np.zeros_like(bias), clamp=(-0.5, 1.5)))
    residual = rng.standard_normal(expected.shape).astype(np.float32)
    relu = make_conv_f32(case, weight, bias, clamp_min=0.0)
    expected_sum = ort_float_conv(case, x, weight, bias, residual, clamp=(0.0, np.inf))
    assert_float_close(relu.run(x, residual), expected_sum)
    assert_writes_into_out(relu, x, residual, relu.run(x, residual))


def assert_writes_into_out(kernel, x, residual, expected) -> None:
    """run(out=...) fills `out` (and returns it) with the very bits of a plain run, also when out is
    the residual itself (a region's in-place residual add)."""
    out = np.empty(expected.shape, expected.dtype)
    assert kernel.run(x, residual, out) is out
    np.testing.assert_array_equal(out, expected)
    if residual is not None:
        in_place = np.ascontiguousarray(residual).copy()
        assert kernel.run(x, in_place, in_place) is in_place
        np.testing.assert_array_equal(in_place, expected)


# ---------------------------------------------------------------------------------------------
# ConvQ8 against the numpy integer reference
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantParams:
    x_scale: np.float32
    x_zero_point: int
    weight_scale: np.ndarray  # float32 [O]
    y_scale: np.float32
    y_zero_point: int
    x_signed: bool
    y_signed: bool


def quant_params(case: Case, rng: np.random.Generator, x_signed: bool, y_signed: bool) -> QuantParams:
    fan_in = case.weight_shape[1] * case.kernel[0] * case.kernel[1]
    x_scale, weight_scale = np.float32(0.02), rng.uniform(0.005, 0.02, case.out_channels).astype(np.float32)
    # outputs spread over the 8-bit range; channel 0 gets a tiny multiplier (a shift above 42)
    real = rng.uniform(0.3, 1.5, case.out_channels) * 40.0 / (np.sqrt(fan_in) * 70.0 * 70.0)
    real[0] = 2.0**-12
    y_scale = np.float32(np.median(x_scale * weight_scale / real))
    weight_scale = (real * y_scale / x_scale).astype(np.float32)
    x_zero_point = 0 if x_signed else int(rng.integers(0, 256))
    y_zero_point = int(rng.integers(-20, 20)) if y_signed else int(rng.integers(0, 60))
    return QuantParams(x_scale, x_zero_point, weight_scale, y_scale, y_zero_point, x_signed, y_signed)


def _qtype(signed: bool):
    return (np.int8, TensorProto.INT8) if signed else (np.uint8, TensorProto.UINT8)


def reference_qlinear_conv(case: Case, params: QuantParams, x, weight, bias, residual=None, add=None) -> np.ndarray:
    """run_reference on QLinearConv (-> com.microsoft QLinearAdd with `add` = (r_scale, r_zp, out_scale, out_zp))."""
    x_dtype, x_proto = _qtype(params.x_signed)
    y_dtype, y_proto = _qtype(params.y_signed)
    initializers = {
        "x_scale": params.x_scale, "x_zp": x_dtype(params.x_zero_point), "w": weight,
        "w_scale": params.weight_scale, "w_zp": np.zeros(case.out_channels, np.int8),
        "y_scale": params.y_scale, "y_zp": y_dtype(params.y_zero_point), "b": bias,
    }
    inputs = [helper.make_tensor_value_info("x", x_proto, list(x.shape))]
    conv_out = "y" if residual is None else "conv"
    nodes = [helper.make_node("QLinearConv", ["x", "x_scale", "x_zp", "w", "w_scale", "w_zp", "y_scale", "y_zp", "b"],
                              [conv_out], **_conv_attributes(case))]
    feeds = {"x": x}
    if residual is not None:
        r_scale, r_zp, out_scale, out_zp = add
        initializers.update(r_scale=np.float32(r_scale), r_zp=y_dtype(r_zp), out_scale=np.float32(out_scale),
                            out_zp=y_dtype(out_zp))
        inputs.append(helper.make_tensor_value_info("r", y_proto, list(residual.shape)))
        nodes.append(helper.make_node("QLinearAdd", ["conv", "y_scale", "y_zp", "r", "r_scale", "r_zp", "out_scale",
                                                     "out_zp"], ["y"], domain="com.microsoft"))
        feeds["r"] = residual
    model = _model(nodes, inputs, initializers, y_proto,
                   [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    return run_reference(model, feeds)[0]


def make_conv_q8(case: Case, params: QuantParams, weight, bias) -> _native.ConvQ8:
    multiplier = requantize_multiplier(params.x_scale, params.weight_scale, params.y_scale)
    return _native.ConvQ8(weight, bias, params.x_zero_point, params.x_signed, multiplier.multiplier.reshape(-1),
                          multiplier.shift.reshape(-1), params.y_zero_point, params.y_signed, case.strides, case.pads,
                          case.dilations, case.groups)


def random_activations(shape, signed: bool, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(-128, 128, shape).astype(np.int8) if signed else rng.integers(0, 256, shape).astype(np.uint8)


def check_q8_case(case: Case, rng: np.random.Generator, x_signed: bool, y_signed: bool, weight=None) -> None:
    params = quant_params(case, rng, x_signed, y_signed)
    weight = int8_weight(case, rng) if weight is None else weight
    bias = rng.integers(-5000, 5000, case.out_channels).astype(np.int32)
    x = random_activations((case.batch, case.channels, case.height, case.width), x_signed, rng)
    conv = make_conv_q8(case, params, weight, bias)
    expected = reference_qlinear_conv(case, params, x, weight, bias)
    actual = conv.run(x)
    assert actual.dtype == expected.dtype and conv.output_shape(x.shape) == expected.shape
    np.testing.assert_array_equal(actual, expected)
    assert_writes_into_out(conv, x, None, expected)

    residual = random_activations(expected.shape, y_signed, rng)
    add = (float(params.y_scale) * 1.3, int(rng.integers(-10, 10)) if y_signed else int(rng.integers(0, 255)),
           float(params.y_scale) * 1.7, int(rng.integers(-10, 10)) if y_signed else int(rng.integers(0, 40)))
    rescale = add_rescale(float(params.y_scale), np.float32(add[0]), np.float32(add[2]))
    conv.set_residual_add(rescale.factor_a, rescale.factor_b, rescale.shift, add[1], add[3])
    expected_sum = reference_qlinear_conv(case, params, x, weight, bias, residual, add)
    np.testing.assert_array_equal(conv.run(x, residual), expected_sum)
    assert_writes_into_out(conv, x, residual, expected_sum)


@pytest.mark.parametrize("x_signed", [False, True], ids=["u8", "s8"])
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_conv_q8_equals_integer_reference_with_fused_add(case: Case, x_signed: bool, simd):
    check_q8_case(case, np.random.default_rng(11), x_signed, y_signed=x_signed)
    assert make_conv_q8(case, quant_params(case, np.random.default_rng(0), x_signed, x_signed),
                        int8_weight(case, np.random.default_rng(1)), None).encoding == EXPECTED_ENCODING[case.pattern]


def seven_bit_weight(case: Case, rng: np.random.Generator) -> np.ndarray:
    """|w| <= 63 (onnxruntime's reduce_range): every pair fits vpmaddubsw without saturation."""
    weight = rng.integers(-63, 64, case.weight_shape)
    weight[weight == 0] = 1
    return (weight * pattern_mask(case.weight_shape, case.pattern, rng)).astype(np.int8)


def mixed_weight(case: Case, rng: np.random.Generator) -> np.ndarray:
    """Mostly small weights with a few extreme ones (+-127, -128) scattered in: the encoder must split
    pairs (|w0| + |w1| > 128) and end int16 groups early, on some rows of a block only."""
    weight = seven_bit_weight(case, rng).astype(np.int64)
    extreme = (rng.random(case.weight_shape) < 0.05) & (weight != 0)
    weight[extreme] = rng.choice([-128, -127, 127], int(extreme.sum()))
    return weight.astype(np.int8)


Q8_WEIGHT_CASES = [
    Case("1x1_direct_tail_1x16", 1, 64, 7, 7, 64, (1, 1), pattern="1x16"),
    Case("1x1_small_plane", 1, 32, 5, 5, 32, (1, 1), pattern="1x16"),
    Case("1x1_wide_1x16", 1, 48, 12, 40, 32, (1, 1), pattern="1x16"),
    Case("1x1_stride2_1x16", 1, 64, 15, 13, 32, (1, 1), strides=(2, 2), pattern="1x16"),
    Case("3x3_stride2_asym_pads_1x16", 2, 32, 13, 11, 32, (3, 3), strides=(2, 2), pads=(1, 0, 2, 1), pattern="1x16"),
    Case("3x3_many_groups_dense", 1, 96, 6, 9, 16, (3, 3), pads=(1, 1, 1, 1)),
    Case("3x3_unstructured", 1, 24, 9, 10, 8, (3, 3), pads=(0, 2, 1, 0), pattern="unstructured"),
    Case("1x1_1x4_odd_rows", 1, 40, 8, 8, 12, (1, 1), pattern="1x4"),
]


@pytest.mark.parametrize("weights", ["7bit", "full", "mixed"])
@pytest.mark.parametrize("x_signed", [False, True], ids=["u8", "s8"])
@pytest.mark.parametrize("case", Q8_WEIGHT_CASES, ids=lambda case: case.name)
def test_conv_q8_weight_ranges_pairing_and_groups(case: Case, x_signed: bool, weights: str, simd):
    """The vpmaddubsw path's pairing and int16 grouping depend on weight magnitudes: exact in every case."""
    rng = np.random.default_rng(23)
    weight = {"7bit": seven_bit_weight, "full": int8_weight, "mixed": mixed_weight}[weights](case, rng)
    check_q8_case(case, rng, x_signed, y_signed=not x_signed, weight=weight)
    check_q8_case(case, rng, x_signed, y_signed=x_signed, weight=weight)


def test_conv_q8_extreme_zero_points_and_saturating_sums(simd):
    """x at 0/255 against -128/127 weights: every uncentered pair sum hits the int16 bound."""
    case = Case("extreme", 1, 32, 9, 9, 16, (3, 3), pads=(1, 1, 1, 1))
    rng = np.random.default_rng(29)
    for x_zero_point, fill in ((0, 255), (255, 0), (128, 255)):
        params = QuantParams(np.float32(0.02), x_zero_point, np.full(16, 0.0001, np.float32), np.float32(0.5), 7,
                             False, False)
        weight = rng.choice(np.array([-128, 127, -1, 1, 64, -64], np.int8), case.weight_shape)
        x = np.full((1, 32, 9, 9), fill, np.uint8)
        x[..., ::3, ::2] = rng.integers(0, 256, x[..., ::3, ::2].shape)
        bias = rng.integers(-5000, 5000, 16).astype(np.int32)
        expected = reference_qlinear_conv(case, params, x, weight, bias)
        np.testing.assert_array_equal(make_conv_q8(case, params, weight, bias).run(x), expected)


def sign_run_weight(out_channels: int, terms: int, rng: np.random.Generator) -> np.ndarray:
    """Rows of two-term runs of one sign, signs alternating, each run summing to +-128 (a pair or
    group exactly at the int16 bound with every x_u = 255) or +-129 (one past it: must be split)."""
    weight = np.zeros((out_channels, terms), np.int64)
    for row in range(out_channels):
        sign = 1 if row % 2 else -1
        for start in range(0, terms - 1, 2):
            total = int(rng.choice([128, 129]))
            first = int(rng.integers(total - 127, 128))
            weight[row, start:start + 2] = sign * np.array([first, total - first])
            sign = -sign
    return weight.astype(np.int8)


@pytest.mark.parametrize("x_signed", [False, True], ids=["u8", "s8"])
def test_conv_q8_int16_lanes_at_the_bound_per_sign(x_signed: bool, simd):
    """Pairs and int16 groups are budgeted per sign: on every row the positive weights of a group
    sum to at most 128 and the negative ones to at least -128. With x_u = 255 (almost) everywhere,
    runs that end exactly at the bound put int16 lanes at +-32640, and each run nearly cancels the
    last so the accumulators stay small: a budget one larger would saturate a lane by 128, which
    this requantization (1/64 per unit, outputs centred) turns into wrong outputs."""
    case = Case("sign_runs", 1, 64, 4, 9, 16, (1, 1))
    rng = np.random.default_rng(37)
    weight = sign_run_weight(16, 64, rng).reshape(case.weight_shape)
    x_zero_point = -128 if x_signed else 0
    params = QuantParams(np.float32(0.02), x_zero_point, np.full(16, 0.390625, np.float32), np.float32(0.5), 128,
                         x_signed, False)
    x = np.full((1, 64, 4, 9), 127 if x_signed else 255, np.int8 if x_signed else np.uint8)
    x[..., 3, 8] = x_zero_point  # one pixel at the zero point: output = bias alone
    bias = rng.integers(-200, 200, 16).astype(np.int32)
    expected = reference_qlinear_conv(case, params, x, weight, bias)
    assert 16 < len(np.unique(expected)) and expected.min() > 0 and expected.max() < 255  # not saturated
    np.testing.assert_array_equal(make_conv_q8(case, params, weight, bias).run(x), expected)


def test_conv_q8_huge_fan_in_takes_the_int16_path(simd):
    """255 * sum |w| >= 2**31 on a row: uncentered uint8 sums could overflow int32, so the
    vpmaddubsw path must not be used (the centered int16 path still is exact)."""
    case = Case("huge", 1, 8192, 3, 4, 2, (3, 3))
    rng = np.random.default_rng(31)
    weight = rng.choice(np.array([-128, 127], np.int8), case.weight_shape)
    params = QuantParams(np.float32(0.02), 128, np.full(2, 2.5e-4, np.float32), np.float32(0.5), 100, False, False)
    x = rng.integers(1, 256, (1, 8192, 3, 4)).astype(np.uint8)
    bias = np.array([12345, -999], np.int32)
    expected = reference_qlinear_conv(case, params, x, weight, bias)
    np.testing.assert_array_equal(make_conv_q8(case, params, weight, bias).run(x), expected)


def test_conv_q8_mixed_signedness_and_no_bias(simd):
    case = Case("mixed", 2, 16, 7, 7, 16, (3, 3), pads=(1, 1, 1, 1), pattern="1x16")
    rng = np.random.default_rng(3)
    params = quant_params(case, rng, x_signed=True, y_signed=False)
    weight = int8_weight(case, rng)
    x = random_activations((2, 16, 7, 7), True, rng)
    expected = reference_qlinear_conv(case, params, x, weight, np.zeros(16, np.int32))
    np.testing.assert_array_equal(make_conv_q8(case, params, weight, None).run(x), expected)


@pytest.mark.parametrize("height, width, pads", [
    (16, 16, (0, 0, 0, 0)),  # one run per output channel
    (9, 13, (0, 0, 1, 2)),  # padded: runs of 15 outputs (8, then the last 8 again)
    (20, 5, (1, 0, 0, 2)),  # runs of 7 (shorter than a vector)
    (6, 28, (0, 1, 0, 1)),  # runs of 30 (16, 8, the last 8)
], ids=["direct", "runs15", "runs7", "runs30"])
def test_conv_q8_requantization_is_exact_at_rounding_ties_and_saturation(height, width, pads, simd):
    """A 1x1 conv with one input channel makes acc = (x - x_zp) * w + bias directly; the multipliers
    put many results exactly on k + 1/2 (ties to even), near the float rounding limits, and past
    the output range (with multipliers above and below 1/2: the epilogue clamps, or lets the
    packing saturate). Padding splits the outputs into runs of every length the epilogue treats
    apart; padded pixels are the zero point, so they add nothing."""
    from onnxsparse.quant.arithmetic import FixedPointMultiplier

    out_channels = 8
    multiplier = np.array([2**30, 2**30, 2**30, 1518500250, 1518500250, 2**31 - 1, 1234567890, 2**30], np.int64)
    shift = np.array([31, 32, 36, 40, 43, 42, 62, 20], np.int64)
    weight = np.array([1, -1, 3, 127, -128, 77, 100, 1], np.int8).reshape(out_channels, 1, 1, 1)
    bias = np.array([0, 1, -7, 2**20, -(2**20), 12345, 0, 2**30], np.int32)  # the last: t far past int32
    x = np.resize(np.arange(256, dtype=np.uint8), (1, 1, height, width))
    conv = _native.ConvQ8(weight, bias, 100, False, multiplier, shift, 3, False, (1, 1), pads, (1, 1), 1)
    padded = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])), constant_values=100)
    accumulator = (padded.astype(np.int64) - 100) * weight.reshape(1, -1, 1, 1).astype(np.int64) + bias.reshape(1, -1, 1, 1)
    rule = FixedPointMultiplier(multiplier.reshape(1, -1, 1, 1), shift.reshape(1, -1, 1, 1))
    expected = np.clip(rule.apply(accumulator) + 3, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(conv.run(x), expected)


@pytest.mark.parametrize("factor_conv, factor_residual, shift", [
    (2**29, 3 * 2**28, 30),  # A = 0.5, B = 0.75: many sums exactly on k + 1/2 (the float32 path's tie test)
    (2**30 - 1, 2**30 + 1, 31),  # just off the ties
    (2**30, 2**30, 28),  # A + B = 8: the float64 path
    (1, 2**31 - 1, 62),  # a tiny and a large factor
])
def test_conv_q8_fused_add_is_exact_at_ties_and_large_factors(factor_conv, factor_residual, shift, simd):
    """conv + QLinearAdd in one epilogue: every output equals the integer rule, on both float paths."""
    from onnxsparse.quant.arithmetic import AddRescale, FixedPointMultiplier

    out_channels = 4
    multiplier = np.array([2**30, 1518500250, 2**31 - 1, 1234567890], np.int64)
    shift_conv = np.array([31, 33, 34, 36], np.int64)
    weight = np.array([1, -3, 77, 127], np.int8).reshape(out_channels, 1, 1, 1)
    bias = np.array([0, 5, -700, 3000], np.int32)
    rng = np.random.default_rng(41)
    x = rng.integers(0, 256, (1, 1, 24, 24)).astype(np.uint8)
    residual = rng.integers(0, 256, (1, out_channels, 24, 24)).astype(np.uint8)
    conv = _native.ConvQ8(weight, bias, 100, False, multiplier, shift_conv, 120, False, (1, 1), (0, 0, 0, 0), (1, 1), 1)
    conv.set_residual_add(factor_conv, factor_residual, shift, 90, 110)
    accumulator = (x.astype(np.int64) - 100) * weight.reshape(1, -1, 1, 1).astype(np.int64) + bias.reshape(1, -1, 1, 1)
    rule = FixedPointMultiplier(multiplier.reshape(1, -1, 1, 1), shift_conv.reshape(1, -1, 1, 1))
    conv_out = np.clip(rule.apply(accumulator) + 120, 0, 255)
    total = AddRescale(factor_conv, factor_residual, shift).apply(conv_out - 120, residual.astype(np.int64) - 90)
    np.testing.assert_array_equal(conv.run(x, residual), np.clip(total + 110, 0, 255).astype(np.uint8))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_small_convs_match_onnxruntime_and_reference(data, simd):
    kernel = (data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4)))
    dilations = (data.draw(st.integers(1, 2)), data.draw(st.integers(1, 2)))
    pads = tuple(data.draw(st.integers(0, 2)) for _ in range(4))
    strides = (data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3)))
    groups = data.draw(st.sampled_from([1, 2]))
    min_h = max((kernel[0] - 1) * dilations[0] + 1 - pads[0] - pads[2], 1)
    min_w = max((kernel[1] - 1) * dilations[1] + 1 - pads[1] - pads[3], 1)
    case = Case("random", data.draw(st.integers(1, 2)), groups * data.draw(st.integers(1, 6)),
                data.draw(st.integers(min_h, min_h + 12)), data.draw(st.integers(min_w, min_w + 12)),
                groups * data.draw(st.sampled_from([1, 4, 5, 16, 32])), kernel, strides, pads, dilations, groups,
                data.draw(st.sampled_from(["dense", "unstructured", "1x4"])))
    if case.pattern == "1x4" and (case.out_channels // groups) % 4:
        case = Case(**{**case.__dict__, "pattern": "unstructured"})
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    weight, bias = float_weight(case, rng), rng.standard_normal(case.out_channels).astype(np.float32)
    x = rng.standard_normal((case.batch, case.channels, case.height, case.width)).astype(np.float32)
    assert_float_close(make_conv_f32(case, weight, bias).run(x), ort_float_conv(case, x, weight, bias))
    check_q8_case(case, rng, x_signed=data.draw(st.booleans()), y_signed=data.draw(st.booleans()))


def ort_max_pool(x: np.ndarray, kernel, strides, pads, dilations) -> np.ndarray:
    element = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.uint8): TensorProto.UINT8,
               np.dtype(np.int8): TensorProto.INT8}[x.dtype]
    node = helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=list(kernel), strides=list(strides),
                            pads=list(pads), dilations=list(dilations))
    graph = helper.make_graph([node], "pool", [helper.make_tensor_value_info("x", element, None)],
                              [helper.make_tensor_value_info("y", element, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@settings(max_examples=120, deadline=None)
@given(data=st.data())
def test_max_pool_equals_onnxruntime(data):
    kernel = (data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4)))
    dilations = (data.draw(st.integers(1, 2)), data.draw(st.integers(1, 2)))
    extent = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    pads = tuple(data.draw(st.integers(0, kernel[i % 2] - 1)) for i in range(4))  # onnxruntime: pad < kernel
    strides = (data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3)))
    height = data.draw(st.integers(max(1, extent[0] - pads[0] - pads[2]), 12))
    # rows past 64 bytes reach the AVX2 path's full vectors for 8-bit types too
    width = data.draw(st.integers(max(1, extent[1] - pads[1] - pads[3]), 90))
    dtype = data.draw(st.sampled_from([np.float32, np.uint8, np.int8]))
    simd = data.draw(st.sampled_from([level for level in SIMD_LEVELS if level == "scalar" or _cpu_has_avx2()]))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    shape = (data.draw(st.integers(1, 2)), data.draw(st.integers(1, 5)), height, width)
    if dtype == np.float32:
        x = rng.standard_normal(shape).astype(np.float32) * 10
    else:
        x = rng.integers(np.iinfo(dtype).min, np.iinfo(dtype).max + 1, shape).astype(dtype)
    pool = _native.MaxPool(kernel, strides, pads, dilations)
    _native.set_simd_level(simd)
    try:
        got = pool.run(x)
    finally:
        _native.set_simd_level("auto")
    np.testing.assert_array_equal(got, ort_max_pool(x, kernel, strides, pads, dilations))
    assert got.dtype == x.dtype and pool.output_shape(list(shape)) == got.shape


@pytest.mark.parametrize("dtype", [np.float32, np.uint8, np.int8])
@pytest.mark.parametrize("geometry", [((3, 3), (2, 2), (1, 1, 1, 1), 112), ((3, 3), (1, 1), (0, 1, 2, 1), 75),
                                      ((2, 3), (2, 2), (0, 0, 1, 2), 67)])
def test_max_pool_on_wide_rows_equals_onnxruntime(simd, dtype, geometry):
    # rows wide enough for whole vectors of every type, stride 2 (the vectorized decimation) or 1
    kernel, strides, pads, width = geometry
    rng = np.random.default_rng(width)
    info = np.finfo(dtype) if dtype == np.float32 else np.iinfo(dtype)
    x = rng.uniform(max(info.min, -1e6), min(info.max, 1e6), (1, 3, 9, width)).astype(dtype)
    pool = _native.MaxPool(kernel, strides, pads, [1, 1])
    got = pool.run(x)
    np.testing.assert_array_equal(got, ort_max_pool(x, kernel, strides, pads, (1, 1)))
    assert_writes_into_out(pool, x, None, got)


@pytest.mark.parametrize("dtype", [np.float32, np.uint8, np.int8])
def test_max_pool_windows_whose_taps_are_all_padding(dtype):
    # kernel 2 with dilation 3 over 2 rows padded by 1: the output row's taps are rows -1 and 2
    x = np.arange(2 * 5, dtype=np.float32).reshape(1, 1, 2, 5).astype(dtype)
    pool = _native.MaxPool([2, 2], [1, 1], [1, 1, 1, 1], [3, 3])
    np.testing.assert_array_equal(pool.run(x), ort_max_pool(x, (2, 2), (1, 1), (1, 1, 1, 1), (3, 3)))


def test_max_pool_refuses_bad_arguments():
    with pytest.raises(ValueError, match="smaller than the pooling window"):
        _native.MaxPool([3, 3], [2, 2], [3, 0, 0, 0], [1, 1])
    with pytest.raises(ValueError, match="kernel_shape must have 2 values"):
        _native.MaxPool([3], [2, 2], [0, 0, 0, 0], [1, 1])
    pool = _native.MaxPool([3, 3], [1, 1], [0, 0, 0, 0], [1, 1])
    with pytest.raises(ValueError, match="float32, uint8 or int8"):
        pool.run(np.zeros((1, 1, 4, 4), np.float64))
    with pytest.raises(ValueError, match="larger than the padded input"):
        pool.run(np.zeros((1, 1, 2, 4), np.float32))
    with pytest.raises(ValueError, match="4-D"):
        pool.run(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="no residual"):
        pool.run(np.zeros((1, 1, 4, 4), np.uint8), np.zeros((1, 1, 2, 2), np.uint8))


@pytest.mark.parametrize("dtype", [np.float32, np.uint8, np.int8])
@pytest.mark.parametrize("shape", [(1, 2048, 7, 7), (3, 5, 1, 1), (2, 4, 3, 11)], ids=lambda s: "x".join(map(str, s)))
def test_plane_sums(dtype, shape):
    """Sums over each [H, W] plane (a global average pool's numerator): exact for 8-bit, float32
    within rounding; planes shorter than and not a multiple of the eight running sums."""
    rng = np.random.default_rng(5)
    if dtype == np.float32:
        x = rng.standard_normal(shape).astype(np.float32)
        got = _native.plane_sums(x)
        assert got.dtype == np.float32 and got.shape == shape[:2]
        np.testing.assert_allclose(got, x.astype(np.float64).sum((2, 3)), rtol=1e-5, atol=1e-4)
    else:
        info = np.iinfo(dtype)
        x = rng.integers(info.min, info.max + 1, shape).astype(dtype)
        x[0, 0] = info.max  # a plane at the type's extreme
        got = _native.plane_sums(x)
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, x.astype(np.int64).sum((2, 3)))


def test_plane_sums_refuses_bad_arrays():
    with pytest.raises(ValueError, match="4-D"):
        _native.plane_sums(np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="float32, uint8 or int8"):
        _native.plane_sums(np.zeros((1, 1, 2, 2), np.float64))
    with pytest.raises(ValueError, match="C-contiguous"):
        _native.plane_sums(np.zeros((1, 2, 4, 4), np.uint8)[..., ::2])
    with pytest.raises(ValueError, match="numpy array"):
        _native.plane_sums([1, 2, 3])


# ---------------------------------------------------------------------------------------------
# Pruned weights keep their structure; bad inputs are refused; SIMD selection
# ---------------------------------------------------------------------------------------------


def test_run_refuses_outputs_it_cannot_write_into(small_conv):
    conv, x = small_conv[1], np.ones((1, 4, 6, 6), np.float32)
    residual = np.ones((1, 8, 6, 6), np.float32)
    shared = np.zeros(8 * 36, np.float32)  # out and, in its second half, x
    read_only = np.zeros((1, 8, 6, 6), np.float32)
    read_only.flags.writeable = False
    for out, message in [(np.zeros((1, 8, 6, 5), np.float32), "out must have shape"),
                         (np.zeros((1, 8, 6, 6), np.float64), "out must be float32"),
                         (np.zeros((1, 8, 6, 12), np.float32)[..., ::2], "out must be C-contiguous"),
                         (read_only, "writeable"),
                         (shared.reshape(1, 8, 6, 6), "overlap x")]:
        with pytest.raises(ValueError, match=message):
            conv.run(shared[4 * 36:].reshape(1, 4, 6, 6) if message == "overlap x" else x, None, out)
    halves = np.zeros(8 * 36 + 36, np.float32)
    with pytest.raises(ValueError, match="partly overlap"):
        conv.run(x, halves[:8 * 36].reshape(1, 8, 6, 6), halves[36:].reshape(1, 8, 6, 6))
    pool = _native.MaxPool([2, 2], [2, 2], [0, 0, 0, 0], [1, 1])
    with pytest.raises(ValueError, match="out must be uint8"):
        pool.run(np.zeros((1, 1, 4, 4), np.uint8), None, np.zeros((1, 1, 2, 2), np.int8))
    np.testing.assert_array_equal(conv.run(x, residual, residual), conv.run(x, np.ones_like(residual)))


def test_all_zero_weight_gives_bias(simd):
    case = Case("zero", 1, 8, 5, 5, 16, (3, 3), pads=(1, 1, 1, 1))
    bias = np.arange(16, dtype=np.float32)
    conv = make_conv_f32(case, np.zeros(case.weight_shape, np.float32), bias)
    assert conv.nonzeros == 0
    np.testing.assert_array_equal(conv.run(np.ones((1, 8, 5, 5), np.float32)),
                                  np.broadcast_to(bias[None, :, None, None], (1, 16, 5, 5)))


def test_threads_setting_changes_nothing_in_results():
    case = Case("threads", 2, 32, 14, 14, 64, (3, 3), pads=(1, 1, 1, 1), pattern="1x16")
    rng = np.random.default_rng(5)
    weight, x = float_weight(case, rng), rng.standard_normal((2, 32, 14, 14)).astype(np.float32)
    conv = make_conv_f32(case, weight, None)
    before = _native.get_num_threads()
    try:
        _native.set_num_threads(1)
        assert _native.get_num_threads() == 1
        single = conv.run(x)
        _native.set_num_threads(2)
        np.testing.assert_array_equal(conv.run(x), single)
        with pytest.raises(ValueError):
            _native.set_num_threads(0)
    finally:
        _native.set_num_threads(before)


@pytest.fixture
def small_conv():
    weight = np.ones((8, 4, 3, 3), np.float32)
    return weight, _native.ConvF32(weight, None, (1, 1), (1, 1, 1, 1), (1, 1), 1)


@pytest.mark.parametrize("bad_x, message", [
    (np.ones((1, 4, 6, 6), np.float64), "float32"),
    (np.ones((4, 6, 6), np.float32), "4-D"),
    (np.ones((1, 5, 6, 6), np.float32), "channels"),
    (np.ones((1, 4, 12, 6), np.float32)[:, :, ::2], "C-contiguous"),
    ([[[[1.0]]]], "numpy array"),
])
def test_conv_f32_refuses_bad_inputs(small_conv, bad_x, message):
    with pytest.raises(ValueError, match=message):
        small_conv[1].run(bad_x)


def test_conv_f32_refuses_bad_residual_and_small_input(small_conv):
    conv = small_conv[1]
    x = np.ones((1, 4, 6, 6), np.float32)
    with pytest.raises(ValueError, match="residual must have shape"):
        conv.run(x, np.ones((1, 8, 6, 5), np.float32))
    with pytest.raises(ValueError, match="float32"):
        conv.run(x, np.ones((1, 8, 6, 6), np.float16))
    unpadded = _native.ConvF32(small_conv[0], None, (1, 1), (0, 0, 0, 0), (2, 2), 1)
    with pytest.raises(ValueError, match="larger than the padded input"):
        unpadded.run(np.ones((1, 4, 4, 9), np.float32))


@pytest.mark.parametrize("kwargs, message", [
    (dict(groups=3), "groups"),
    (dict(groups=0), "groups"),
    (dict(bias=np.ones(7, np.float32)), "bias must have shape"),
    (dict(weight=np.ones((8, 4, 3), np.float32)), "4-D"),
    (dict(weight=np.ones((8, 4, 3, 3), np.int8)), "float32"),
    (dict(weight=np.ones((8, 4, 3, 6), np.float32)[..., ::2]), "C-contiguous"),
    (dict(strides=(0, 1)), "strides"),
    (dict(pads=(1, 1, 1)), "pads"),
    (dict(pads=(-1, 0, 0, 0)), "pads"),
    (dict(dilations=(1, 0)), "dilations"),
    (dict(clamp_min=2.0, clamp_max=1.0), "clamp_min"),
])
def test_conv_f32_refuses_bad_construction(kwargs, message):
    arguments = dict(weight=np.ones((8, 4, 3, 3), np.float32), bias=None, strides=(1, 1), pads=(1, 1, 1, 1),
                     dilations=(1, 1), groups=1)
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        _native.ConvF32(**arguments)


def q8_arguments(**changes) -> dict:
    arguments = dict(weight=np.ones((8, 4, 3, 3), np.int8), bias=None, x_zero_point=128, x_signed=False,
                     multiplier=np.full(8, 2**30, np.int64), shift=np.full(8, 40, np.int64), y_zero_point=0,
                     y_signed=False, strides=(1, 1), pads=(1, 1, 1, 1), dilations=(1, 1), groups=1)
    arguments.update(changes)
    return arguments


@pytest.mark.parametrize("changes, message", [
    (dict(multiplier=np.full(8, 2**31, np.int64)), "multiplier"),
    (dict(multiplier=np.full(8, 5, np.int64)), "multiplier"),
    (dict(multiplier=np.full(8, 2**30, np.int32)), "int64"),
    (dict(shift=np.full(8, 63, np.int64)), "shift"),
    (dict(shift=np.full(7, 3, np.int64)), "shift must have shape"),
    (dict(x_zero_point=256), "x_zero_point"),
    (dict(y_zero_point=-1), "y_zero_point"),
    (dict(bias=np.ones(8, np.int64)), "int32"),
    (dict(weight=np.ones((8, 4, 3, 3), np.uint8)), "int8"),
    (dict(groups=3), "groups"),
])
def test_conv_q8_refuses_bad_construction(changes, message):
    with pytest.raises(ValueError, match=message):
        _native.ConvQ8(**q8_arguments(**changes))


def test_conv_q8_refuses_bad_run_inputs():
    conv = _native.ConvQ8(**q8_arguments())
    x = np.ones((1, 4, 5, 5), np.uint8)
    assert conv.run(x).dtype == np.uint8
    with pytest.raises(ValueError, match="uint8"):
        conv.run(x.astype(np.int8))
    with pytest.raises(ValueError, match="no residual add"):
        conv.run(x, np.ones((1, 8, 5, 5), np.uint8))
    with pytest.raises(ValueError, match="shift"):
        conv.set_residual_add(1, 1, 63, 0, 0)
    conv.set_residual_add(2**30, 2**29, 30, 3, 4)
    with pytest.raises(ValueError, match="pass residual"):
        conv.run(x)
    with pytest.raises(ValueError, match="residual must have shape"):
        conv.run(x, np.ones((1, 8, 5, 4), np.uint8))
    with pytest.raises(ValueError, match="C-contiguous"):
        conv.run(np.ones((1, 4, 5, 10), np.uint8)[..., ::2], np.ones((1, 8, 5, 5), np.uint8))


def test_set_simd_level_refuses_unknown_levels():
    with pytest.raises(ValueError, match="avx2"):
        _native.set_simd_level("sse9")
    _native.set_simd_level("scalar")
    assert _native.simd_level() == "scalar"
    _native.set_simd_level("auto")
    assert _native.simd_level() == ("avx2" if _cpu_has_avx2() else "scalar")


def test_environment_forces_the_scalar_path():
    environment = dict(os.environ, ONNXSPARSE_SIMD="scalar")
    result = subprocess.run([sys.executable, "-c", "from onnxsparse import _native; print(_native.simd_level())"],
                            env=environment, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "scalar"
