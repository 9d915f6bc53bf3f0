"""A quantized model as the steps a systolic array runs: MAC layers, vector layers, host steps.

The model is brought to its integer form (QDQ is lowered, a packed model unpacked) and every node
is built by the integer reference executor's own node builders (onnxsparse.quant.reference), so
parameters are validated and non-MAC rules applied in exactly one place. MAC layers (QLinearConv,
QGemm, QLinearMatMul with a constant weight) get a kernel of their own that accumulates the way
the array does: one partial sum per reduction fold, added in the int32 accumulator.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from onnxsparse import model as model_io
from onnxsparse.errors import OnnxSparseError, UsageError
from onnxsparse.formats.pack import DOMAIN as PACKED_DOMAIN, unpack_model
from onnxsparse.quant.arithmetic import FixedPointMultiplier, requantize_multiplier
from onnxsparse.quant.lower import lower_to_integer
# The reference executor's node builders and helpers are the one home of each op's parsing and
# integer rule; this package is their second user.
from onnxsparse.quant.reference import (
    BUILDERS,
    NodeContext,
    WindowAttrs,
    checked_accumulator,
    declared_type,
    node_domain,
    requantized,
)
from onnxsparse.sparsity.patterns import MatrixShape

MAC_OPS = ("QLinearConv", "QGemm", "QLinearMatMul")
VECTOR_OPS = ("QLinearAdd", "QLinearConcat", "MaxPool", "QLinearAveragePool", "QLinearGlobalAveragePool", "Max")
FLOAT_WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "ConvInteger", "MatMulInteger")
# float64 products and sums of 8-bit operands are exact integers while below 2**53.
_EXACT_FLOAT_LIMIT = 2.0**53
# Output pixels per im2col band, to bound memory on large feature maps.
_PIXELS_PER_CHUNK = 1 << 14


def integer_form(model: onnx.ModelProto) -> onnx.ModelProto:
    """The integer form of a quantized model: QDQ is lowered, a packed model unpacked first."""
    if any(node.domain == PACKED_DOMAIN for node in model.graph.node):
        model = unpack_model(model)
    ops = {node.op_type for node in model.graph.node}
    if "DequantizeLinear" in ops and ops & set(FLOAT_WEIGHT_OPS):
        model = lower_to_integer(model)
        ops = {node.op_type for node in model.graph.node}
    if not ops & set(MAC_OPS):
        raise UsageError("the model is not quantized (no QLinearConv, QGemm or QLinearMatMul); quantize it first: "
                         "onnxsparse quantize MODEL OUT --calib DATA")
    for node in model.graph.node:
        if node.op_type in FLOAT_WEIGHT_OPS:
            raise OnnxSparseError(f"node {model_io.display_name(node)} ({node.op_type}) is still a float layer; the "
                                  "systolic array runs integer layers only: quantize every layer (no --exclude, "
                                  "--keep-first-float or --keep-last-float)")
    return model


@dataclass(frozen=True)
class Geometry:
    """A MAC layer at one input shape: groups independent products of P × Wn by Wn × K."""

    output_pixels: int
    reduction_length: int
    filters: int  # per group
    groups: int
    output_shape: tuple[int, ...]

    @property
    def macs(self) -> int:
        return self.groups * self.output_pixels * self.reduction_length * self.filters


class MacLayer:
    """A conv or matrix product with a constant weight, computed fold by fold as the array does."""

    def __init__(self, context: NodeContext):
        node = context.node
        self.name, self.op_type = model_io.display_name(node), node.op_type
        self.context = context
        self.data_input, self.output = node.input[0], node.output[0]
        self.window: WindowAttrs | None = None
        if node.op_type == "QLinearConv":
            self._init_conv(context)
        else:
            self._init_matrix(context)
        if np.abs(self.matrix).max(initial=0) * 256.0 * self.matrix.shape[1] >= _EXACT_FLOAT_LIMIT:
            raise context.error("the reduction is too long for exact float64 accumulation")
        per_group = self.matrix.reshape(self.groups, -1, self.matrix.shape[1])  # [G, K/G, Wn]
        self.weight_columns = np.ascontiguousarray(per_group.transpose(0, 2, 1)).astype(np.float64)  # [G, Wn, K/G]

    def _init_conv(self, context: NodeContext) -> None:
        x_type, y_type = context.quantized_type(0, "x"), context.quantized_type(7, "y_zero_point")
        weight = context.constant(3, "w")
        self.groups = int(context.attr("group", 1))
        self.layout = model_io.WeightLayout("conv", tuple(weight.shape), self.groups)
        self.window = WindowAttrs.from_node(context, context.attr("kernel_shape", weight.shape[2:]))
        w_scale = context.scale(4, "w_scale", per_tensor=False).reshape(-1)
        w_zero_point = context.zero_point(5, "w_zero_point", context.input_type(3), per_tensor=False).reshape(-1)
        out_channels = weight.shape[0]
        centered = weight.astype(np.int64) - w_zero_point.reshape(-1, *(1,) * (weight.ndim - 1))
        self.weight = weight
        self.matrix = self.layout.to_matrix(centered)  # W[O, K], K channels-last per group
        self.x_zero_point = context.zero_point(2, "x_zero_point", x_type)
        self.y_type, self.y_zero_point = y_type, context.zero_point(7, "y_zero_point", y_type)
        self.multiplier = context.multiplier(lambda: requantize_multiplier(
            context.scale(1, "x_scale"), np.broadcast_to(w_scale, out_channels), context.scale(6, "y_scale")))
        self.bias = context.constant(8, "B").astype(np.int64) if context.has_input(8) else None
        self.scales = (float(context.scale(1, "x_scale")), np.broadcast_to(w_scale, out_channels).astype(np.float32),
                       float(context.scale(6, "y_scale")))

    def _init_matrix(self, context: NodeContext) -> None:
        node = context.node
        y_at = 7 if node.op_type == "QGemm" else 6
        a_type, y_type = context.quantized_type(0, "A"), context.quantized_type(y_at + 1, "y_zero_point")
        weight = context.constant(3, "B")
        if weight.ndim != 2:
            raise context.error(f"B must be a 2-D constant weight, got shape {list(weight.shape)}")
        trans_b = bool(context.attr("transB", 0)) if node.op_type == "QGemm" else False
        self.trans_a = bool(context.attr("transA", 0)) if node.op_type == "QGemm" else False
        self.groups = 1
        self.layout = model_io.WeightLayout("rows" if trans_b else "cols", tuple(weight.shape))
        b_scale = context.scale(4, "b_scale", per_tensor=False).reshape(-1)
        b_zero_point = context.zero_point(5, "b_zero_point", context.input_type(3), per_tensor=False).reshape(-1)
        out_channels = self.layout.out_channels
        self.weight = weight
        self.matrix = self.layout.to_matrix(weight.astype(np.int64)) - b_zero_point.reshape(-1, 1)
        self.x_zero_point = context.zero_point(2, "a_zero_point", a_type)
        self.y_type, self.y_zero_point = y_type, context.zero_point(y_at + 1, "y_zero_point", y_type)
        self.multiplier = context.multiplier(lambda: requantize_multiplier(
            context.scale(1, "a_scale"), np.broadcast_to(b_scale, out_channels), context.scale(y_at, "y_scale")))
        bias = context.constant(6, "C") if node.op_type == "QGemm" and context.has_input(6) else None
        self.bias = None if bias is None else np.broadcast_to(bias.astype(np.int64).reshape(-1), out_channels)
        self.scales = (float(context.scale(1, "a_scale")), np.broadcast_to(b_scale, out_channels).astype(np.float32),
                       float(context.scale(y_at, "y_scale")))

    @property
    def matrix_shape(self) -> MatrixShape:
        return MatrixShape(self.layout.out_channels, self.layout.kernel_positions or 1, self.layout.strip_length)

    def _column_chunks(self, x: np.ndarray) -> tuple[list[np.ndarray], tuple[int, ...]]:
        """The input as the rows the array streams, [G, P, Wn] in chunks of output pixels (float64,
        zero point removed; reduction channels-last as W[O, K]), and the output shape."""
        if self.window is None:
            a = x.T if self.trans_a else x
            if a.ndim < 2 or a.shape[-1] != self.matrix.shape[1]:
                raise self.context.error(f"input shape {list(x.shape)} does not fit the weight "
                                         f"{list(self.weight.shape)}")
            rows = a.reshape(-1, a.shape[-1]).astype(np.float64) - float(self.x_zero_point)
            return [rows[None]], a.shape[:-1] + (self.layout.out_channels,)
        spatial_rank = len(self.window.kernel)
        if x.ndim != spatial_rank + 2 or x.shape[1] != self.weight.shape[1] * self.groups:
            raise self.context.error(f"input shape {list(x.shape)} does not fit the weight {list(self.weight.shape)} "
                                     f"with group={self.groups}")
        layout = self.window.layout(self.context, x.shape[2:])
        centered = x.astype(np.float64) - float(self.x_zero_point)
        windows = layout.windows(centered, 0.0)  # [N, C, *out, *kernel]
        batch = x.shape[0]
        grouped = windows.reshape((batch, self.groups, -1) + windows.shape[2:])  # [N, G, C/G, *out, *kernel]
        order = (1, 0) + tuple(range(3, grouped.ndim)) + (2,)  # [G, N, *out, *kernel, C/G]
        rows_per_chunk = max(1, _PIXELS_PER_CHUNK // max(1, int(np.prod(layout.out_shape[1:]))))
        chunks = []
        for start in range(0, layout.out_shape[0], rows_per_chunk):  # bounded memory: a band of output rows
            band = grouped[:, :, :, start:start + rows_per_chunk].transpose(order)
            chunks.append(band.reshape(self.groups, -1, self.matrix.shape[1]))
        return chunks, (batch, self.layout.out_channels) + layout.out_shape

    def geometry(self, input_shape: tuple[int, ...]) -> Geometry:
        if self.window is None:
            pixels = int(np.prod(input_shape)) // self.matrix.shape[1]
            return Geometry(pixels, self.matrix.shape[1], self.layout.out_channels, 1,
                            tuple(input_shape[:-1]) + (self.layout.out_channels,))
        layout = self.window.layout(self.context, input_shape[2:])
        pixels = input_shape[0] * int(np.prod(layout.out_shape))
        return Geometry(pixels, self.matrix.shape[1], self.layout.out_channels // self.groups, self.groups,
                        (input_shape[0], self.layout.out_channels) + layout.out_shape)

    def run(self, x: np.ndarray, reduction_folds: int) -> np.ndarray:
        """The layer's output, accumulating `reduction_folds` partial sums per output as the array does."""
        chunks, out_shape = self._column_chunks(x)
        reduction = self.weight_columns.shape[1]
        bounds = np.linspace(0, reduction, min(max(reduction_folds, 1), reduction) + 1).round().astype(int)
        parts = []
        for columns in chunks:
            columns = columns.reshape(self.groups, -1, reduction)
            accumulator = np.zeros((self.groups, columns.shape[1], self.weight_columns.shape[2]))
            for start, stop in zip(bounds[:-1], bounds[1:]):  # one partial sum per reduction fold
                accumulator += np.matmul(columns[:, :, start:stop], self.weight_columns[:, start:stop])
            parts.append(accumulator)
        if self.window is None:
            accumulator = parts[0][0].reshape(out_shape)
            channel_shape = (-1,)
        else:  # bands of [G, N * band pixels, K/G] -> [N, O, *out]
            batch = out_shape[0]
            bands = [part.reshape(self.groups, batch, -1, part.shape[-1]) for part in parts]
            accumulator = np.concatenate(bands, axis=2).transpose(1, 0, 3, 2).reshape(out_shape)
            channel_shape = (-1,) + (1,) * (len(out_shape) - 2)
        accumulator = accumulator.astype(np.int64)
        if self.bias is not None:
            accumulator = accumulator + self.bias.reshape(channel_shape)
        multiplier = FixedPointMultiplier(self.multiplier.multiplier.reshape(channel_shape),
                                          self.multiplier.shift.reshape(channel_shape))
        return requantized(checked_accumulator(self.context, accumulator), multiplier, self.y_zero_point,
                            self.y_type)


@dataclass(frozen=True)
class Step:
    """One node: a MAC layer, a vector layer (non-MAC integer op on the array), or a host step
    (quantize/dequantize at the edges, shape ops, float ops) that costs no array cycles."""

    kind: str  # "mac" | "vector" | "host"
    name: str
    op_type: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    kernel: object  # MacLayer for "mac", the reference kernel otherwise
    kernel_shape: tuple[int, ...] = ()  # pooling window

    @property
    def window_size(self) -> int:
        """Elements each output of a pooling layer reads."""
        return int(np.prod(self.kernel_shape, dtype=np.int64))


@dataclass
class CompiledModel:
    model: onnx.ModelProto
    steps: list[Step]
    inputs: dict[str, np.dtype]
    constants: dict[str, np.ndarray]
    outputs: list[str]


def compile_model(model: onnx.ModelProto) -> CompiledModel:
    """The steps of an integer-form model; an unsupported node is a one-line error naming it."""
    from onnx import numpy_helper

    lookups = model_io.GraphIndex(model)
    constants = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    types = {name: value.dtype for name, value in constants.items()}
    inputs = {}
    for value in model.graph.input:
        if value.name not in constants:
            inputs[value.name] = types[value.name] = declared_type(value)
    steps = []
    for node in model.graph.node:
        context = NodeContext(node, lookups, types)
        label = model_io.display_name(node)
        if _inference_identity(node, lookups):
            types[node.output[0]] = types[node.input[0]]
            steps.append(Step("host", label, node.op_type, (node.input[0],), (node.output[0],), _identity))
            continue
        builder = BUILDERS.get((node_domain(node), node.op_type))
        if builder is None:
            raise OnnxSparseError(f"node {model_io.display_name(node)} ({node.op_type}): not supported by the systolic "
                                  "executor (it runs the integer form: QLinearConv, QGemm, QLinearMatMul, QLinearAdd, "
                                  "QLinearConcat, QLinear(Global)AveragePool, MaxPool, shape ops)")
        built = builder(context)
        for name, dtype in zip(node.output, built.output_types):
            if name:
                types[name] = np.dtype(dtype)
        if node.op_type in MAC_OPS:
            steps.append(Step("mac", label, node.op_type, (node.input[0],), (node.output[0],), MacLayer(context)))
        elif node.op_type in VECTOR_OPS:
            pooling = node.op_type in ("MaxPool", "QLinearAveragePool")
            steps.append(Step("vector", label, node.op_type, tuple(node.input), tuple(node.output), built.kernel,
                              tuple(int(k) for k in context.attr("kernel_shape")) if pooling else ()))
        else:
            steps.append(Step("host", label, node.op_type, tuple(node.input), tuple(node.output), built.kernel))
    return CompiledModel(model, steps, inputs, constants, [out.name for out in model.graph.output])


def _inference_identity(node: onnx.NodeProto, lookups: model_io.GraphIndex) -> bool:
    """Dropout at inference (no mask output read) passes its input through."""
    return node.op_type == "Dropout" and node_domain(node) == "" and not any(lookups.uses(out) for out in node.output[1:])


def _identity(inputs: list[np.ndarray | None]) -> list[np.ndarray]:
    return [inputs[0]]
