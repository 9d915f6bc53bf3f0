"""The numpy integer reference executor: runs the integer form of a quantized model exactly.

The integer form is a standard ONNX graph (QuantizeLinear, QLinearConv, QLinearMatMul, the
com.microsoft QGemm / QLinearAdd / QLinearConcat / QLinear(Global)AveragePool, MaxPool, shape ops,
DequantizeLinear and float ops after it). Every scale change goes through
onnxsparse.quant.arithmetic, so this executor is the bit-exact ground truth of docs/ARITHMETIC.md
that the native kernels and the systolic executor must match; onnxruntime, which requantizes in
float, agrees with it within one unit in the last place.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from numpy.lib.stride_tricks import sliding_window_view
from onnx import helper, numpy_helper

from onnxsparse import model as model_io
from onnxsparse.errors import OnnxSparseError, UsageError
from onnxsparse.quant.arithmetic import (
    INT32_MAX,
    INT32_MIN,
    FixedPointMultiplier,
    add_rescale,
    average_multiplier,
    rescale_multiplier,
    dequantize,
    fixed_point_multiplier,
    quantize,
    requantize_multiplier,
    saturate,
)

MICROSOFT = "com.microsoft"
QUANTIZED_TYPES = (np.dtype(np.uint8), np.dtype(np.int8))

# A kernel maps a node's input values (None for an absent optional input) to its output values.
Kernel = Callable[[list[np.ndarray | None]], list[np.ndarray]]


@dataclass(frozen=True)
class _Built:
    """A node ready to run: its kernel and the element types of its outputs."""

    kernel: Kernel
    output_types: tuple[np.dtype, ...]


@dataclass(frozen=True)
class _Step:
    label: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    kernel: Kernel


class NodeContext:
    """What a kernel builder knows about one node at construction: attributes, constants, input types."""

    def __init__(self, node: onnx.NodeProto, lookups: model_io.GraphIndex, types: dict[str, np.dtype]):
        self.node = node
        self.label = f"node {model_io.display_name(node)} ({node.op_type})"
        self.attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        self._lookups = lookups
        self._types = types

    def error(self, message: str) -> OnnxSparseError:
        return OnnxSparseError(f"{self.label}: {message}")

    def attr(self, name: str, default=None):
        value = self.attrs.get(name, default)
        return value.decode() if isinstance(value, bytes) else value

    def has_input(self, index: int) -> bool:
        return index < len(self.node.input) and bool(self.node.input[index])

    def input_type(self, index: int) -> np.dtype:
        return self._types[self.node.input[index]]

    def quantized_type(self, index: int, what: str) -> np.dtype:
        dtype = self.input_type(index)
        if dtype not in QUANTIZED_TYPES:
            raise self.error(f"{what} is {dtype}, expected uint8 or int8")
        return dtype

    def constant(self, index: int, what: str) -> np.ndarray:
        value = self._lookups.constant(self.node.input[index]) if self.has_input(index) else None
        if value is None:
            raise self.error(f"{what} ({self.node.input[index] if self.has_input(index) else 'absent'}) must be "
                             "a constant (an initializer or a Constant node)")
        return value

    def scale(self, index: int, what: str, per_tensor: bool = True) -> np.ndarray:
        """A float32 scale, positive and finite; a 0-d array when per_tensor."""
        value = np.asarray(self.constant(index, what), dtype=np.float32)
        if not np.all(np.isfinite(value)) or np.any(value <= 0):
            raise self.error(f"{what} must be positive and finite, got {value.reshape(-1)[:4]}")
        return _per_tensor(self, value, what) if per_tensor else value

    def zero_point(self, index: int, what: str, dtype: np.dtype, per_tensor: bool = True) -> np.ndarray:
        """An int64 zero point of the given type (0 when the input is absent)."""
        if not self.has_input(index):
            return np.zeros((), np.int64)
        value = self.constant(index, what)
        if value.dtype != dtype:
            raise self.error(f"{what} is {value.dtype}, expected {dtype}")
        value = value.astype(np.int64)
        return _per_tensor(self, value, what) if per_tensor else value

    def constant_output(self) -> np.ndarray:
        value = self._lookups.constant(self.node.output[0])
        if value is None:
            raise self.error("this Constant's value attribute is not supported")
        return value

    def multiplier(self, real_multiplier: Callable[[], FixedPointMultiplier]) -> FixedPointMultiplier:
        try:
            return real_multiplier()
        except ValueError as exc:
            raise self.error(f"scales give an unusable requantization multiplier ({exc})") from exc


def _per_tensor(context: NodeContext, value: np.ndarray, what: str) -> np.ndarray:
    if value.size != 1:
        raise context.error(f"{what} must be a scalar (per tensor), got shape {list(value.shape)}")
    return value.reshape(())


def _type_range(dtype: np.dtype) -> tuple[int, int]:
    info = np.iinfo(dtype)
    return int(info.min), int(info.max)


def requantized(accumulator: np.ndarray, multiplier: FixedPointMultiplier, zero_point: np.ndarray,
                 dtype: np.dtype) -> np.ndarray:
    """q_y = sat(z_y + R(A, M)) over the output type's full range."""
    low, high = _type_range(dtype)
    return saturate(multiplier.apply(accumulator) + zero_point, low, high, dtype)


def checked_accumulator(context: NodeContext, accumulator: np.ndarray) -> np.ndarray:
    if accumulator.size and (accumulator.max() > INT32_MAX or accumulator.min() < INT32_MIN):
        raise context.error("the int32 accumulator overflows; the model's weights or bias are out of range")
    return accumulator


def _axis_shape(rank: int, axis: int, length: int) -> tuple[int, ...]:
    """A shape of `rank` ones but `length` at `axis`, to broadcast per-axis parameters."""
    shape = [1] * rank
    shape[axis] = length
    return tuple(shape)


# ---------------------------------------------------------------------------------------------
# Sliding windows shared by QLinearConv and the pools
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WindowAttrs:
    """Kernel, strides, dilations and padding attributes of a conv or pool node."""

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...]  # begins then ends
    auto_pad: str
    ceil_mode: bool

    @classmethod
    def from_node(cls, context: NodeContext, kernel: Sequence[int], allow_dilations: bool = True) -> WindowAttrs:
        rank = len(kernel)
        strides = tuple(context.attr("strides", [1] * rank))
        dilations = tuple(context.attr("dilations", [1] * rank))
        pads = tuple(context.attr("pads", [0] * 2 * rank))
        auto_pad = context.attr("auto_pad", "NOTSET")
        if len(strides) != rank or len(dilations) != rank or len(pads) != 2 * rank:
            raise context.error(f"strides, dilations and pads must match the {rank}-D kernel")
        if auto_pad not in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"):
            raise context.error(f"unknown auto_pad {auto_pad!r}")
        if min(strides) < 1 or min(dilations) < 1 or min(pads) < 0 or min(kernel) < 1:
            raise context.error("kernel, strides and dilations must be positive and pads non-negative")
        if not allow_dilations and max(dilations) != 1:
            raise context.error("dilations are not supported")
        return cls(tuple(int(k) for k in kernel), strides, dilations, pads, auto_pad,
                   bool(context.attr("ceil_mode", 0)))

    @property
    def extents(self) -> tuple[int, ...]:
        """Input positions one window spans along each axis (dilations included)."""
        return tuple((k - 1) * d + 1 for k, d in zip(self.kernel, self.dilations))

    def layout(self, context: NodeContext, spatial: Sequence[int]) -> _WindowLayout:
        rank = len(self.kernel)
        if len(spatial) != rank:
            raise context.error(f"input has {len(spatial)} spatial axes, the kernel {rank}")
        begins, ends, outs = [], [], []
        for axis, size in enumerate(spatial):
            stride, extent = self.strides[axis], self.extents[axis]
            if self.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
                out = -(-size // stride)
                total = max((out - 1) * stride + extent - size, 0)
                begin = total // 2 if self.auto_pad == "SAME_UPPER" else total - total // 2
                end = total - begin
            else:
                begin, end = (0, 0) if self.auto_pad == "VALID" else (self.pads[axis], self.pads[rank + axis])
                span = size + begin + end - extent
                out = (-(-span // stride) if self.ceil_mode else span // stride) + 1
                if self.ceil_mode and (out - 1) * stride >= size + begin:  # last window starts in the end pad
                    out -= 1
            if out < 1:
                raise context.error(f"the window does not fit spatial axis {axis} of size {size}")
            begins.append(begin)
            ends.append(end)
            outs.append(out)
        return _WindowLayout(self, tuple(spatial), tuple(begins), tuple(ends), tuple(outs))


@dataclass(frozen=True)
class _WindowLayout:
    """The windows of one input shape: resolved pads and the output's spatial shape."""

    attrs: WindowAttrs
    in_shape: tuple[int, ...]
    pads_begin: tuple[int, ...]
    pads_end: tuple[int, ...]
    out_shape: tuple[int, ...]

    def windows(self, values: np.ndarray, pad_value) -> np.ndarray:
        """A [N, C, *out, *kernel] view of values [N, C, *in] padded with pad_value."""
        attrs = self.attrs
        pad_width, crop = [(0, 0), (0, 0)], [slice(None), slice(None)]
        for axis, size in enumerate(self.in_shape):
            needed = (self.out_shape[axis] - 1) * attrs.strides[axis] + attrs.extents[axis]
            pad_width.append((self.pads_begin[axis], max(needed - size - self.pads_begin[axis], 0)))
            crop.append(slice(0, needed))
        padded = np.pad(values, pad_width, constant_values=pad_value)[tuple(crop)]
        view = sliding_window_view(padded, attrs.extents, axis=tuple(range(2, values.ndim)))
        return view[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in attrs.strides)
                    + tuple(slice(None, None, d) for d in attrs.dilations)]

    def counts(self, include_pad: bool) -> np.ndarray:
        """Elements per window [*out]: clipped to the padded input, or to the input alone."""
        counts = np.ones((), np.int64)
        for axis, size in enumerate(self.in_shape):
            starts = np.arange(self.out_shape[axis], dtype=np.int64) * self.attrs.strides[axis] - self.pads_begin[axis]
            stops = starts + self.attrs.kernel[axis]
            if include_pad:
                per_axis = np.minimum(stops, size + self.pads_end[axis]) - starts
            else:
                per_axis = np.minimum(stops, size) - np.maximum(starts, 0)
            counts = np.multiply.outer(counts, per_axis)
        return counts


# ---------------------------------------------------------------------------------------------
# Kernel builders: one per op, registered in BUILDERS
# ---------------------------------------------------------------------------------------------

BUILDERS: dict[tuple[str, str], Callable[[NodeContext], _Built]] = {}


def _builds(domain: str, *op_types: str):
    def register(builder):
        for op_type in op_types:
            BUILDERS[(domain, op_type)] = builder
        return builder
    return register


@_builds("", "QuantizeLinear")
def _quantize_linear(context: NodeContext) -> _Built:
    if context.attr("block_size", 0):
        raise context.error("blocked quantization is not supported")
    if context.input_type(0) != np.float32:
        raise context.error(f"input is {context.input_type(0)}, expected float32")
    scale = context.scale(1, "y_scale", per_tensor=False)
    if context.has_input(2):
        out_type = context.input_type(2)
        zero_point = context.zero_point(2, "y_zero_point", out_type, per_tensor=False)
    else:
        out_type = np.dtype(helper.tensor_dtype_to_np_dtype(context.attr("output_dtype", onnx.TensorProto.UINT8)))
        zero_point = np.zeros_like(scale, dtype=np.int64)
    if out_type not in QUANTIZED_TYPES:
        raise context.error(f"output type {out_type} is not supported (uint8 or int8)")
    low, high = _type_range(out_type)
    per_axis = _PerAxis(context, scale, zero_point)

    def run(inputs):
        scale_b, zero_point_b = per_axis.broadcast(inputs[0].ndim)
        return [quantize(inputs[0], scale_b, zero_point_b, low, high, out_type)]
    return _Built(run, (out_type,))


@_builds("", "DequantizeLinear")
def _dequantize_linear(context: NodeContext) -> _Built:
    if context.attr("block_size", 0):
        raise context.error("blocked quantization is not supported")
    in_type = context.input_type(0)
    if in_type not in QUANTIZED_TYPES + (np.dtype(np.int32),):
        raise context.error(f"input is {in_type}, expected uint8, int8 or int32")
    scale = context.scale(1, "x_scale", per_tensor=False)
    per_axis = _PerAxis(context, scale, context.zero_point(2, "x_zero_point", in_type, per_tensor=False))

    def run(inputs):
        scale_b, zero_point_b = per_axis.broadcast(inputs[0].ndim)
        return [dequantize(inputs[0], scale_b, zero_point_b)]
    return _Built(run, (np.dtype(np.float32),))


class _PerAxis:
    """Quantize/Dequantize parameters: one value, or one per index of `axis`."""

    def __init__(self, context: NodeContext, scale: np.ndarray, zero_point: np.ndarray):
        if zero_point.shape not in ((), scale.shape):
            raise context.error("the zero point's shape must match the scale's")
        if scale.ndim > 1:
            raise context.error("scale must be a scalar or 1-D (per axis)")
        self.context, self.axis = context, int(context.attr("axis", 1))
        self.scale, self.zero_point = scale, np.broadcast_to(zero_point, scale.shape)

    def broadcast(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        if self.scale.size == 1:
            return self.scale.reshape(()), self.zero_point.reshape(())
        if not -rank <= self.axis < rank:
            raise self.context.error(f"axis {self.axis} is out of range for a rank-{rank} input")
        shape = _axis_shape(rank, self.axis % rank, self.scale.size)
        return self.scale.reshape(shape), self.zero_point.reshape(shape)


@_builds("", "QLinearConv")
def _qlinear_conv(context: NodeContext) -> _Built:
    x_type = context.quantized_type(0, "x")
    weight_type = context.quantized_type(3, "w")
    y_type = context.quantized_type(7, "y_zero_point")
    x_scale, y_scale = context.scale(1, "x_scale"), context.scale(6, "y_scale")
    x_zero_point = context.zero_point(2, "x_zero_point", x_type)
    y_zero_point = context.zero_point(7, "y_zero_point", y_type)
    weight = context.constant(3, "w")
    out_channels, spatial_rank, groups = weight.shape[0], weight.ndim - 2, int(context.attr("group", 1))
    if spatial_rank < 1 or groups < 1 or out_channels % groups:
        raise context.error(f"weight shape {list(weight.shape)} does not fit group={groups}")
    attrs = WindowAttrs.from_node(context, context.attr("kernel_shape", weight.shape[2:]))
    if attrs.kernel != weight.shape[2:]:
        raise context.error(f"kernel_shape {list(attrs.kernel)} does not match the weight {list(weight.shape)}")
    channel_shape = (out_channels,) + (1,) * spatial_rank
    w_scale = context.scale(4, "w_scale", per_tensor=False)
    w_zero_point = context.zero_point(5, "w_zero_point", weight_type, per_tensor=False)
    for what, value in (("w_scale", w_scale), ("w_zero_point", w_zero_point)):
        if value.size not in (1, out_channels):
            raise context.error(f"{what} has {value.size} values for {out_channels} output channels")
    multiplier = context.multiplier(lambda: requantize_multiplier(
        x_scale, np.broadcast_to(w_scale.reshape(-1), out_channels).reshape(channel_shape), y_scale))
    centered_weight = weight.astype(np.int64) - w_zero_point.reshape(-1, *(1,) * (weight.ndim - 1))
    # [groups, K, O/groups] with K in (input channel, kernel position) order, as the windows come
    weight_matrix = np.ascontiguousarray(
        centered_weight.reshape(groups, out_channels // groups, -1).transpose(0, 2, 1))
    bias = None
    if context.has_input(8):
        bias = context.constant(8, "B")
        if bias.dtype != np.int32 or bias.shape != (out_channels,):
            raise context.error(f"bias must be int32 of shape [{out_channels}], got {bias.dtype} "
                                f"{list(bias.shape)}")
        bias = bias.astype(np.int64).reshape(channel_shape)

    def run(inputs):
        x = inputs[0]
        if x.ndim != spatial_rank + 2 or x.shape[1] != weight.shape[1] * groups:
            raise context.error(f"input shape {list(x.shape)} does not fit the weight {list(weight.shape)} "
                                f"with group={groups}")
        layout = attrs.layout(context, x.shape[2:])
        windows = layout.windows(x.astype(np.int64) - x_zero_point, 0)  # [N, C, *out, *kernel]
        batch, positions = x.shape[0], int(np.prod(layout.out_shape))
        grouped = windows.reshape((batch, groups, -1) + windows.shape[2:])  # [N, G, C/G, *out, *kernel]
        order = (1, 0) + tuple(range(3, 3 + spatial_rank)) + (2,) + tuple(range(3 + spatial_rank, grouped.ndim))
        columns = grouped.transpose(order).reshape(groups, batch * positions, -1)
        accumulator = np.matmul(columns, weight_matrix)  # [G, N * positions, O/G]
        accumulator = accumulator.reshape(groups, batch, positions, -1).transpose(1, 0, 3, 2)
        accumulator = accumulator.reshape((batch, out_channels) + layout.out_shape)
        if bias is not None:
            accumulator = accumulator + bias
        return [requantized(checked_accumulator(context, accumulator), multiplier, y_zero_point, y_type)]
    return _Built(run, (y_type,))


@_builds("", "QLinearMatMul")
def _qlinear_matmul(context: NodeContext) -> _Built:
    (a_zero_point, b_scale, b_zero_point, y_type, y_zero_point), a_scale, y_scale = \
        _matmul_parameters(context, y_scale_at=6), context.scale(1, "a_scale"), context.scale(6, "y_scale")
    _check_per_column(context, b_scale, b_zero_point)
    multiplier = context.multiplier(lambda: requantize_multiplier(a_scale, b_scale, y_scale))

    def run(inputs):
        a, b = inputs[0], inputs[3]
        if min(a.ndim, b.ndim) < 2:
            raise context.error("inputs of rank below 2 are not supported")
        accumulator = np.matmul(a.astype(np.int64) - a_zero_point, b.astype(np.int64) - b_zero_point)
        return [requantized(checked_accumulator(context, accumulator), multiplier, y_zero_point, y_type)]
    return _Built(run, (y_type,))


def _matmul_parameters(context: NodeContext, y_scale_at: int):
    """(a zero point, b scale, b zero point, y type, y zero point) of QLinearMatMul and QGemm: both
    take a, a_scale, a_zero_point, b, b_scale, b_zero_point first; y_scale and y_zero_point follow
    at y_scale_at (after QGemm's bias)."""
    a_type, b_type = context.quantized_type(0, "A"), context.quantized_type(3, "B")
    y_type = context.quantized_type(y_scale_at + 1, "y_zero_point")
    return (context.zero_point(2, "a_zero_point", a_type), context.scale(4, "b_scale", per_tensor=False),
            context.zero_point(5, "b_zero_point", b_type, per_tensor=False), y_type,
            context.zero_point(y_scale_at + 1, "y_zero_point", y_type))


def _check_per_column(context: NodeContext, b_scale: np.ndarray, b_zero_point: np.ndarray) -> None:
    """b's parameters: per tensor, or per column (shape [N] or [..., 1, N])."""
    if b_zero_point.ndim and b_zero_point.shape != b_scale.shape:
        raise context.error("b_zero_point's shape must match b_scale's")
    if b_scale.ndim >= 2 and b_scale.shape[-2] != 1:
        raise context.error(f"b_scale of shape {list(b_scale.shape)} is neither per tensor nor per column")


@_builds(MICROSOFT, "QGemm")
def _qgemm(context: NodeContext) -> _Built:
    if float(context.attr("alpha", 1.0)) != 1.0:
        raise context.error("alpha other than 1.0 is not supported")
    if not (context.has_input(7) and context.has_input(8)):  # onnxruntime then outputs float32
        raise context.error("float output QGemm not supported (an integer output needs y_scale and y_zero_point)")
    (a_zero_point, b_scale, b_zero_point, y_type, y_zero_point), a_scale, y_scale = \
        _matmul_parameters(context, y_scale_at=7), context.scale(1, "a_scale"), context.scale(7, "y_scale")
    for what, value in (("b_scale", b_scale), ("b_zero_point", b_zero_point)):
        if value.ndim > 1:
            raise context.error(f"{what} must be a scalar or 1-D (per column)")
    multiplier = context.multiplier(lambda: requantize_multiplier(a_scale, b_scale, y_scale))
    trans_a, trans_b = bool(context.attr("transA", 0)), bool(context.attr("transB", 0))
    if context.has_input(6) and context.input_type(6) != np.int32:
        raise context.error(f"C is {context.input_type(6)}, expected int32")

    def run(inputs):
        a, b, bias = inputs[0], inputs[3], inputs[6]
        if a.ndim != 2 or b.ndim != 2:
            raise context.error("A and B must be 2-D")
        a = a.T if trans_a else a
        b = b.T if trans_b else b
        accumulator = np.matmul(a.astype(np.int64) - a_zero_point, b.astype(np.int64) - b_zero_point)
        if bias is not None:
            accumulator = accumulator + bias.astype(np.int64)
        return [requantized(checked_accumulator(context, accumulator), multiplier, y_zero_point, y_type)]
    return _Built(run, (y_type,))


@_builds(MICROSOFT, "QLinearAdd")
def _qlinear_add(context: NodeContext) -> _Built:
    value_type = context.quantized_type(0, "A")
    if context.input_type(3) != value_type:
        raise context.error(f"B is {context.input_type(3)}, A is {value_type}")
    a_scale, b_scale, y_scale = (context.scale(1, "A_scale"), context.scale(4, "B_scale"),
                                 context.scale(6, "C_scale"))
    a_zero_point = context.zero_point(2, "A_zero_point", value_type)
    b_zero_point = context.zero_point(5, "B_zero_point", value_type)
    y_zero_point = context.zero_point(7, "C_zero_point", value_type)
    rescale = add_rescale(float(a_scale), float(b_scale), float(y_scale))
    low, high = _type_range(value_type)

    def run(inputs):
        total = rescale.apply(inputs[0].astype(np.int64) - a_zero_point, inputs[3].astype(np.int64) - b_zero_point)
        return [saturate(total + y_zero_point, low, high, value_type)]
    return _Built(run, (value_type,))


@_builds(MICROSOFT, "QLinearConcat")
def _qlinear_concat(context: NodeContext) -> _Built:
    y_type = context.quantized_type(1, "Y_zero_point")
    y_scale, y_zero_point = context.scale(0, "Y_scale"), context.zero_point(1, "Y_zero_point", y_type)
    if len(context.node.input) < 5 or (len(context.node.input) - 2) % 3:
        raise context.error("inputs must be Y_scale, Y_zero_point, then (tensor, scale, zero point) triples")
    if "axis" not in context.attrs:
        raise context.error("the axis attribute is required")
    axis = int(context.attr("axis"))
    # per input: None to copy (same parameters as the output), else (multiplier, its zero point)
    rescales: list[tuple[FixedPointMultiplier, np.ndarray] | None] = []
    for start in range(2, len(context.node.input), 3):
        part = f"input {(start - 2) // 3}"
        if context.quantized_type(start, part) != y_type:
            raise context.error(f"{part} is {context.input_type(start)}, the output {y_type}")
        scale = context.scale(start + 1, f"{part}'s scale")
        zero_point = context.zero_point(start + 2, f"{part}'s zero point", y_type)
        if scale == y_scale and zero_point == y_zero_point:
            rescales.append(None)
        else:
            multiplier = context.multiplier(lambda s=scale: rescale_multiplier(s, y_scale))
            rescales.append((multiplier, zero_point))

    def run(inputs):
        parts = []
        for values, rescale in zip(inputs[2::3], rescales):
            if rescale is None:
                parts.append(values)
            else:
                multiplier, zero_point = rescale
                parts.append(requantized(values.astype(np.int64) - zero_point, multiplier, y_zero_point, y_type))
        return [np.concatenate(parts, axis=axis)]
    return _Built(run, (y_type,))


def _pool_parameters(context: NodeContext):
    """(type, x_scale, x_zero_point, y_scale, y_zero_point) of QLinear(Global)AveragePool."""
    value_type = context.quantized_type(0, "X")
    return (value_type, context.scale(1, "x_scale"), context.zero_point(2, "x_zero_point", value_type),
            context.scale(3, "y_scale"), context.zero_point(4, "y_zero_point", value_type))


def _channels_first(values: np.ndarray, channels_last: bool) -> np.ndarray:
    return np.moveaxis(values, -1, 1) if channels_last else values


def _channels_restored(values: np.ndarray, channels_last: bool) -> np.ndarray:
    return np.moveaxis(values, 1, -1) if channels_last else values


def _average_multiplier(context: NodeContext, x_scale: np.ndarray, y_scale: np.ndarray,
                        counts: np.ndarray) -> FixedPointMultiplier:
    """M = s_x / (s_y · n) per window, n its element count."""
    return context.multiplier(lambda: average_multiplier(x_scale, y_scale, counts))


@_builds(MICROSOFT, "QLinearGlobalAveragePool")
def _qlinear_global_average_pool(context: NodeContext) -> _Built:
    value_type, x_scale, x_zero_point, y_scale, y_zero_point = _pool_parameters(context)
    channels_last = bool(context.attr("channels_last", 0))

    def run(inputs):
        x = _channels_first(inputs[0], channels_last)
        if x.ndim < 3:
            raise context.error(f"input of rank {x.ndim} has no spatial axes")
        spatial_axes = tuple(range(2, x.ndim))
        accumulator = (x.astype(np.int64) - x_zero_point).sum(axis=spatial_axes, keepdims=True)
        multiplier = _average_multiplier(context, x_scale, y_scale, np.array(np.prod(x.shape[2:])))
        return [_channels_restored(requantized(accumulator, multiplier, y_zero_point, value_type), channels_last)]
    return _Built(run, (value_type,))


@_builds(MICROSOFT, "QLinearAveragePool")
def _qlinear_average_pool(context: NodeContext) -> _Built:
    value_type, x_scale, x_zero_point, y_scale, y_zero_point = _pool_parameters(context)
    if "kernel_shape" not in context.attrs:
        raise context.error("the kernel_shape attribute is required")
    attrs = WindowAttrs.from_node(context, context.attr("kernel_shape"), allow_dilations=False)
    channels_last = bool(context.attr("channels_last", 0))
    include_pad = bool(context.attr("count_include_pad", 0))

    def run(inputs):
        x = _channels_first(inputs[0], channels_last)
        layout = attrs.layout(context, x.shape[2:])
        windows = layout.windows(x.astype(np.int64) - x_zero_point, 0)
        accumulator = windows.sum(axis=tuple(range(-len(attrs.kernel), 0)))
        multiplier = _average_multiplier(context, x_scale, y_scale, layout.counts(include_pad))
        return [_channels_restored(requantized(accumulator, multiplier, y_zero_point, value_type), channels_last)]
    return _Built(run, (value_type,))


@_builds("", "MaxPool")
def _max_pool(context: NodeContext) -> _Built:
    value_type = context.quantized_type(0, "X")
    if len(context.node.output) > 1 and context.node.output[1]:
        raise context.error("the Indices output is not supported")
    if "kernel_shape" not in context.attrs:
        raise context.error("the kernel_shape attribute is required")
    attrs = WindowAttrs.from_node(context, context.attr("kernel_shape"))
    lowest = _type_range(value_type)[0]

    def run(inputs):
        layout = attrs.layout(context, inputs[0].shape[2:])
        return [layout.windows(inputs[0], lowest).max(axis=tuple(range(-len(attrs.kernel), 0)))]
    return _Built(run, (value_type,))


@_builds("", "Max")
def _max(context: NodeContext) -> _Built:
    """max(q, c) with c a constant of q's type: a ReLU on the grid when c is the zero point."""
    value_type = context.quantized_type(0, "X")
    if len(context.node.input) != 2:
        raise context.error("only Max of a tensor and one constant is supported")
    bound = context.constant(1, "the second operand")
    if bound.dtype != value_type:
        raise context.error(f"the second operand is {bound.dtype}, X is {value_type}")
    return _Built(lambda inputs: [np.maximum(inputs[0], bound)], (value_type,))


@_builds("", "Constant")
def _constant(context: NodeContext) -> _Built:
    value = context.constant_output()
    return _Built(lambda inputs: [value], (value.dtype,))


def _same_type(make_kernel: Callable[[NodeContext], Kernel]) -> Callable[[NodeContext], _Built]:
    """A builder for a shape op: any element type, output of the input's type."""
    def build(context: NodeContext) -> _Built:
        return _Built(make_kernel(context), (context.input_type(0),))
    return build


def _identity(context: NodeContext) -> Kernel:
    return lambda inputs: [inputs[0]]


@_builds("", "Dropout")
def _dropout(context: NodeContext) -> _Built:
    """Inference Dropout: the identity, and an all-true mask when one is asked for."""
    if context.has_input(2) and bool(context.constant(2, "training_mode")):
        raise context.error("training-mode Dropout is not supported")
    return _Built(lambda inputs: [inputs[0], np.ones(inputs[0].shape, bool)],
                  (context.input_type(0), np.dtype(bool)))


def _flatten(context: NodeContext) -> Kernel:
    axis = int(context.attr("axis", 1))

    def run(inputs):
        x = inputs[0]
        split = axis % x.ndim if axis != x.ndim else axis
        return [x.reshape(int(np.prod(x.shape[:split])), -1)]
    return run


def _reshape(context: NodeContext) -> Kernel:
    allow_zero = bool(context.attr("allowzero", 0))

    def run(inputs):
        x, target = inputs[0], [int(d) for d in inputs[1]]
        # ONNX Reshape: a 0 copies the input's dimension unless allowzero
        return [x.reshape([x.shape[i] if d == 0 and not allow_zero else d for i, d in enumerate(target)])]
    return run


def _transpose(context: NodeContext) -> Kernel:
    perm = context.attr("perm")
    return lambda inputs: [np.transpose(inputs[0], perm)]


def _axes(context: NodeContext, inputs: list[np.ndarray | None]) -> tuple[int, ...] | None:
    """Squeeze/Unsqueeze axes: the input (opset 13 on) or the attribute (older)."""
    if len(inputs) > 1 and inputs[1] is not None:
        return tuple(int(axis) for axis in inputs[1])
    axes = context.attr("axes")
    return None if axes is None else tuple(axes)


def _squeeze(context: NodeContext) -> Kernel:
    return lambda inputs: [np.squeeze(inputs[0], axis=_axes(context, inputs))]


def _unsqueeze(context: NodeContext) -> Kernel:
    def run(inputs):
        axes = _axes(context, inputs)
        if axes is None:
            raise context.error("axes are required")
        return [np.expand_dims(inputs[0], tuple(axis % (inputs[0].ndim + len(axes)) for axis in axes))]
    return run


for _op_type, _kernel in (("Identity", _identity), ("Flatten", _flatten), ("Reshape", _reshape),
                          ("Transpose", _transpose), ("Squeeze", _squeeze), ("Unsqueeze", _unsqueeze)):
    BUILDERS[("", _op_type)] = _same_type(_kernel)


def _float_only(context: NodeContext) -> np.dtype:
    """Relu, Clip, Softmax belong to float islands: the integer form has them only on float tensors."""
    dtype = context.input_type(0)
    if np.issubdtype(dtype, np.integer):
        raise context.error(f"{context.node.op_type} on the integer tensor {context.node.input[0]} is not part of "
                            "the integer form (the quantizer merges it into the producer's saturation, or keeps it "
                            "as a float step between DequantizeLinear and QuantizeLinear)")
    if dtype != np.float32:
        raise context.error(f"input is {dtype}, expected float32")
    return dtype


@_builds("", "Relu")
def _relu(context: NodeContext) -> _Built:
    dtype = _float_only(context)
    return _Built(lambda inputs: [np.maximum(inputs[0], dtype.type(0))], (dtype,))


@_builds("", "Clip")
def _clip(context: NodeContext) -> _Built:
    dtype = _float_only(context)

    def run(inputs):
        low = inputs[1] if len(inputs) > 1 and inputs[1] is not None else context.attr("min", -np.inf)
        high = inputs[2] if len(inputs) > 2 and inputs[2] is not None else context.attr("max", np.inf)
        return [np.clip(inputs[0], dtype.type(low), dtype.type(high)).astype(dtype)]
    return _Built(run, (dtype,))


@_builds("", "Softmax")
def _softmax(context: NodeContext) -> _Built:
    dtype = _float_only(context)
    axis = int(context.attr("axis", -1))

    def run(inputs):
        shifted = np.exp(inputs[0] - inputs[0].max(axis=axis, keepdims=True))
        return [(shifted / shifted.sum(axis=axis, keepdims=True)).astype(dtype)]
    return _Built(run, (dtype,))


SUPPORTED_OPS: frozenset[tuple[str, str]] = frozenset(BUILDERS)


def _supported_list() -> str:
    return ", ".join(sorted(f"{domain}.{op}" if domain else op for domain, op in SUPPORTED_OPS))


# ---------------------------------------------------------------------------------------------
# The executor
# ---------------------------------------------------------------------------------------------


class ReferenceExecutor:
    """Runs an integer-form model with the exact integer rules of docs/ARITHMETIC.md."""

    def __init__(self, model: onnx.ModelProto):
        opset = model_io.default_opset(model)
        if opset < model_io.MIN_OPSET:
            raise OnnxSparseError(f"model opset {opset}: the reference executor needs opset >= "
                                  f"{model_io.MIN_OPSET}; load it with onnxsparse.load_model to upgrade it")
        graph = model.graph
        lookups = model_io.GraphIndex(model)
        self._constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
        self._inputs = {inp.name: inp for inp in graph.input}
        self._required = [name for name in self._inputs if name not in self._constants]
        types = {name: value.dtype for name, value in self._constants.items()}
        for name, inp in self._inputs.items():
            types[name] = declared_type(inp)
        self._steps: list[_Step] = []
        for node in graph.node:
            context = NodeContext(node, lookups, types)
            builder = BUILDERS.get((node_domain(node), node.op_type))
            if builder is None:
                raise context.error(f"not supported by the integer reference executor; supported: {_supported_list()}")
            for name in node.input:
                if name and name not in types:
                    raise context.error(f"input {name} is neither a graph input, an initializer nor an earlier "
                                        "node's output (the graph must be topologically sorted)")
            built = builder(context)
            for name, dtype in zip(node.output, built.output_types):
                if name:
                    types[name] = np.dtype(dtype)
            self._steps.append(_Step(context.label, tuple(node.input), tuple(node.output), built.kernel))
        self._types = types
        self._outputs = [out.name for out in graph.output]
        for name in self._outputs:
            if name not in types:
                raise OnnxSparseError(f"graph output {name}: no node produces it")
        self._last_use = {name: index for index, step in enumerate(self._steps) for name in step.inputs}

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> list[np.ndarray]:
        """Values of `outputs` (the graph outputs by default; any tensor name may be asked for)."""
        wanted = list(self._outputs if outputs is None else outputs)
        kept = set(wanted)
        for name in wanted:
            if name not in self._types:
                raise UsageError(f"{name}: no tensor of that name in the model")
        values = dict(self._constants)
        values.update(self._checked_feeds(feeds))
        for index, step in enumerate(self._steps):
            inputs = [values[name] if name else None for name in step.inputs]
            try:
                results = step.kernel(inputs)
            except ValueError as exc:  # numpy's shape errors (broadcasting, reshape) on this node's inputs
                raise OnnxSparseError(f"{step.label}: {exc}") from exc
            for name, value in zip(step.outputs, results):
                if name:
                    values[name] = value
            for name in step.inputs:  # free what no later step reads, unless asked for
                if name and self._last_use.get(name) == index and name not in kept:
                    values.pop(name, None)
        return [values[name] for name in wanted]

    def _checked_feeds(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for name in feeds:
            if name not in self._inputs:
                raise UsageError(f"feed {name}: the model has no such input; inputs: {', '.join(self._inputs)}")
        checked = {}
        for name in self._required:
            if name not in feeds:
                raise UsageError(f"input {name}: missing from the feeds")
        for name, value in feeds.items():
            value = np.asarray(value)
            if value.dtype != self._types[name]:
                raise UsageError(f"input {name}: expected {self._types[name]}, got {value.dtype}")
            tensor_type = self._inputs[name].type.tensor_type
            expected = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
            if tensor_type.HasField("shape") and (
                    len(expected) != value.ndim or any(e not in (None, s) for e, s in zip(expected, value.shape))):
                raise UsageError(f"input {name}: expected shape {['?' if e is None else e for e in expected]}, "
                                 f"got {list(value.shape)}")
            checked[name] = value
        return checked


def node_domain(node: onnx.NodeProto) -> str:
    return "" if node.domain in ("", "ai.onnx") else node.domain


def declared_type(value_info: onnx.ValueInfoProto) -> np.dtype:
    if not value_info.type.HasField("tensor_type"):
        raise OnnxSparseError(f"graph input {value_info.name}: only tensor inputs are supported")
    return np.dtype(helper.tensor_dtype_to_np_dtype(value_info.type.tensor_type.elem_type))


def run_reference(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run an integer-form model once with the reference executor; the graph outputs."""
    return ReferenceExecutor(model).run(feeds)
