"""Fused chains of a sparse layer and what follows it, each one native kernel call.

A chain starts at a weight-bearing node chosen to run sparse and takes in what the kernel can do
in its epilogue: fp32 Conv / Gemm / MatMul [-> Add (or two-input Sum) of another tensor]
[-> Relu | Clip], and
integer QLinearConv / QGemm / QLinearMatMul [-> QLinearAdd] (in integer models a following ReLU
is already merged into the output's saturation). The kernel reproduces the chain exactly:
fp32 in onnxruntime's arithmetic (within rounding), integer bit for bit with
onnxsparse.quant.reference (docs/ARITHMETIC.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from onnxsparse import model as model_io
from onnxsparse.quant.arithmetic import add_rescale, average_multiplier, requantize_multiplier
from onnxsparse.quant.reference import requantized

FLOAT_OPS = ("Conv", "Gemm", "MatMul")
POOL_OPS = ("MaxPool",)  # when a native chain feeds them, or onnxruntime an 8-bit one (regions.partition)
INTEGER_OPS = ("QLinearConv", "QGemm", "QLinearMatMul")
MICROSOFT = "com.microsoft"


class Unsupported(Exception):
    """This node cannot run in a native kernel (the reason is the message); onnxruntime runs it."""


@dataclass
class Chain:
    """Graph nodes one kernel call replaces, with the tensors it reads and writes."""

    node_indices: tuple[int, ...]
    input: str
    residual: str | None
    output: str
    input_type: np.dtype
    output_type: np.dtype
    kernel: object
    matrix: bool  # Gemm / MatMul: a [N, K] input runs as a 1x1 convolution on [N, K, 1, 1]
    node_names: tuple[str, ...]
    pooled: GlobalAverage | None = None  # matrix chains: a global average pool and reshape in front

    @property
    def label(self) -> str:
        return self.node_names[0]

    @property
    def anchor(self) -> int:
        return self.node_indices[-1]

    def run(self, x: np.ndarray, residual: np.ndarray | None, out: np.ndarray | None = None) -> np.ndarray:
        """`out`: an array of the output's shape and type to write into (not for matrix chains); it
        may be `residual` itself."""
        if self.pooled is not None:
            x = self.pooled.run(x)
        if self.matrix:
            if x.ndim != 2:
                raise ValueError(f"{self.label}: expected a 2-D input, got shape {list(x.shape)}")
            x = x.reshape(x.shape[0], x.shape[1], 1, 1)
            if residual is not None:
                residual = np.ascontiguousarray(np.broadcast_to(residual, (x.shape[0], residual.shape[-1])))
                residual = residual.reshape(residual.shape[0], residual.shape[1], 1, 1)
        y = self.kernel.run(np.ascontiguousarray(x), None if residual is None else np.ascontiguousarray(residual), out)
        return y.reshape(y.shape[0], y.shape[1]) if self.matrix else y


def _names(lookups: model_io.GraphIndex, indices: list[int]) -> tuple[str, ...]:
    return tuple(model_io.display_name(lookups.graph.node[i]) for i in indices)


def _attrs(node: onnx.NodeProto) -> dict:
    values = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return {k: v.decode() if isinstance(v, bytes) else v for k, v in values.items()}


def _constant(lookups: model_io.GraphIndex, node: onnx.NodeProto, index: int, what: str) -> np.ndarray:
    if index >= len(node.input) or not node.input[index]:
        raise Unsupported(f"{what} is absent")
    value = lookups.constant(node.input[index])
    if value is None:
        raise Unsupported(f"{what} is not a constant")
    return value


def _optional_constant(lookups, node, index: int, what: str) -> np.ndarray | None:
    if index >= len(node.input) or not node.input[index]:
        return None
    return _constant(lookups, node, index, what)


def _single_consumer(lookups: model_io.GraphIndex, tensor: str, taken: set[int]) -> int | None:
    """The one node reading `tensor`, unless another chain already took it."""
    consumers = lookups.consumers.get(tensor, [])
    if len(consumers) != 1 or tensor in lookups.graph_outputs or consumers[0] in taken:
        return None
    return consumers[0]


def _window(attrs: dict) -> dict:
    """strides, pads and dilations of a 2-D Conv or pooling node (auto_pad NOTSET or VALID)."""
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if auto_pad not in ("NOTSET", "VALID"):
        raise Unsupported(f"auto_pad={auto_pad} is left to onnxruntime")
    pads = tuple(attrs.get("pads", (0, 0, 0, 0))) if auto_pad == "NOTSET" else (0, 0, 0, 0)
    return dict(strides=tuple(attrs.get("strides", (1, 1))), pads=(pads[0], pads[1], pads[2], pads[3]),
                dilations=tuple(attrs.get("dilations", (1, 1))))


def _conv_geometry(node: onnx.NodeProto, weight_shape: tuple[int, ...]) -> dict:
    attrs = _attrs(node)
    if len(weight_shape) != 4:
        raise Unsupported(f"only 2-D convolutions run natively (weight rank {len(weight_shape)})")
    window = _window(attrs)
    kernel = tuple(attrs.get("kernel_shape", weight_shape[2:]))
    if kernel != tuple(weight_shape[2:]):
        raise Unsupported(f"kernel_shape {list(kernel)} differs from the weight's {list(weight_shape[2:])}")
    return dict(**window, groups=int(attrs.get("group", 1)))


def _matrix_geometry() -> dict:
    return dict(strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), groups=1)


def _float_weight(lookups, node, rank_of) -> tuple[np.ndarray, np.ndarray | None, dict, bool]:
    """(weight [O, C/g, kh, kw], bias [O] or None, geometry, is a matrix op) of Conv / Gemm / MatMul."""
    if node.op_type == "Conv":
        weight = _constant(lookups, node, 1, "the weight")
        bias = _optional_constant(lookups, node, 2, "the bias")
        return weight, bias, _conv_geometry(node, weight.shape), False
    if rank_of(node.input[0]) != 2:
        raise Unsupported("the input is not known to be 2-D")
    if node.op_type == "Gemm":
        attrs = _attrs(node)
        if attrs.get("transA", 0) or float(attrs.get("alpha", 1.0)) != 1.0:
            raise Unsupported("transA or alpha != 1 is left to onnxruntime")
        matrix = _constant(lookups, node, 1, "B")
        matrix = matrix if attrs.get("transB", 0) else matrix.T
        bias = _optional_constant(lookups, node, 2, "C")
        if bias is not None:
            if float(attrs.get("beta", 1.0)) != 1.0 or bias.size not in (1, matrix.shape[0]):
                raise Unsupported("a C that is not one value per output (with beta 1) is left to onnxruntime")
            bias = np.broadcast_to(bias.reshape(-1), (matrix.shape[0],))
    else:
        matrix = _constant(lookups, node, 1, "B").T
        bias = None
    if matrix.ndim != 2:
        raise Unsupported("B is not 2-D")
    return matrix.reshape(*matrix.shape, 1, 1), bias, _matrix_geometry(), True


def _clamp(lookups, node: onnx.NodeProto) -> tuple[float, float] | None:
    """The (min, max) a Relu or Clip node applies, or None when it is neither or not constant."""
    if node.op_type == "Relu" and not node.domain:
        return 0.0, float("inf")
    if node.op_type != "Clip" or node.domain:
        return None
    attrs = _attrs(node)
    low, high = attrs.get("min", float("-inf")), attrs.get("max", float("inf"))
    for index in (1, 2):
        if index < len(node.input) and node.input[index]:
            value = lookups.constant(node.input[index])
            if value is None:
                return None
            if index == 1:
                low = float(value)
            else:
                high = float(value)
    return float(low), float(high)


@dataclass(frozen=True)
class GlobalAverage:
    """An average pool over the whole [N, C, H, W] input, then the Reshape or Flatten to 2-D that a
    Gemm / MatMul chain reads (ResNet's head): one less crossing into onnxruntime and back, and no
    onnxruntime pooling with its layout reorders (0.2-0.3 ms of a ResNet-50 run here).
    Float: the mean in float32. Integer: QLinear(Global)AveragePool's exact rule
    (onnxsparse.quant.reference): sat(z_y + R(sum(x - z_x), s_x / (s_y * H * W)))."""

    sums: object  # _native.plane_sums
    window: tuple[int, ...] | None  # the input's spatial shape the pool's kernel covers (None: any)
    target: tuple[int, ...] | None  # Reshape's shape (ONNX rules: 0 copies, -1 infers); None: Flatten(1)
    quantized: tuple[float, float, int, int, np.dtype] | None = None  # (s_x, s_y, z_x, z_y, type)
    rules: dict = field(default_factory=dict, compare=False)  # element count -> FixedPointMultiplier

    def run(self, x: np.ndarray) -> np.ndarray:
        if x.ndim != 4 or (self.window is not None and tuple(x.shape[2:]) != self.window):
            raise ValueError(f"the average pool expects a 4-D input with spatial shape "
                             f"{list(self.window) if self.window else '(any)'}, got shape {list(x.shape)}")
        count = x.shape[2] * x.shape[3]
        sums = self.sums(np.ascontiguousarray(x)).reshape(x.shape[0], x.shape[1], 1, 1)
        if self.quantized is None:
            pooled = sums / np.float32(count)
        else:
            x_scale, y_scale, x_zero, y_zero, dtype = self.quantized
            rule = self.rules.get(count)
            if rule is None:
                rule = self.rules[count] = average_multiplier(x_scale, y_scale, count)
            pooled = requantized(sums - x_zero * count, rule, y_zero, dtype)
        if self.target is None:
            return pooled.reshape(pooled.shape[0], -1)
        shape = [pooled.shape[i] if size == 0 and i < pooled.ndim else size for i, size in enumerate(self.target)]
        return pooled.reshape(shape)


def _global_average_before(native, lookups: model_io.GraphIndex, node: onnx.NodeProto, shape_of, taken: set[int],
                           integer: bool) -> tuple[list[int], str, GlobalAverage] | None:
    """(node indices, pool input, step) when `node`'s input is a Reshape or Flatten (to 2-D) of an
    average pool over its whole input, each read only there; else None (onnxruntime keeps them)."""
    reshape_index = lookups.producer.get(node.input[0])
    if reshape_index is None or reshape_index in taken or shape_of is None:
        return None
    reshape = lookups.graph.node[reshape_index]
    if reshape.domain or _single_consumer(lookups, reshape.output[0], taken) is None:
        return None
    if reshape.op_type == "Flatten" and _attrs(reshape).get("axis", 1) == 1:
        target = None
    elif reshape.op_type == "Reshape" and not _attrs(reshape).get("allowzero", 0) and len(reshape.input) == 2:
        shape = lookups.constant(reshape.input[1])
        if shape is None or shape.ndim != 1 or shape.size != 2:
            return None
        target = tuple(int(v) for v in shape)
    else:
        return None
    pool_index = lookups.producer.get(reshape.input[0])
    if pool_index is None or pool_index in taken:
        return None
    pool = lookups.graph.node[pool_index]
    if _single_consumer(lookups, pool.output[0], taken) is None:
        return None
    attrs = _attrs(pool)
    source = shape_of(pool.input[0])
    expected = ((MICROSOFT, "QLinearGlobalAveragePool"), (MICROSOFT, "QLinearAveragePool")) if integer else (
        ("", "GlobalAveragePool"), ("", "AveragePool"))
    if (pool.domain, pool.op_type) not in expected or source is None or len(source) != 4:
        return None
    if attrs.get("channels_last", 0):
        return None
    window = None
    if "Global" not in pool.op_type:
        # a window over the whole (unpadded) input: one output pixel whatever the strides or ceil_mode
        if (tuple(attrs.get("kernel_shape", ())) != tuple(source[2:]) or any(attrs.get("pads", [0])) or
                attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID")):
            return None
        window = tuple(source[2:])
    quantized = None
    if integer:
        try:
            named = ((1, "x_scale"), (2, "x_zero_point"), (3, "y_scale"), (4, "y_zero_point"))
            x_scale, x_zero, y_scale, y_zero = (_scalar(_constant(lookups, pool, i, what), what) for i, what in named)
        except Unsupported:
            return None
        if x_zero.dtype != y_zero.dtype or x_zero.dtype not in (np.uint8, np.int8):
            return None
        quantized = (float(x_scale), float(y_scale), int(x_zero), int(y_zero), np.dtype(y_zero.dtype))
    return [pool_index, reshape_index], pool.input[0], GlobalAverage(native.plane_sums, window, target, quantized)


def float_chain(native, lookups: model_io.GraphIndex, index: int, rank_of, taken: set[int], shape_of=None) -> Chain:
    """`shape_of` (tensor -> inferred shape or None): lets a Gemm / MatMul take in the global average
    pool and reshape in front of it."""
    node = lookups.graph.node[index]
    weight, bias, geometry, matrix = _float_weight(lookups, node, rank_of)
    if weight.dtype != np.float32:
        raise Unsupported(f"weight type {weight.dtype} (only float32 runs natively)")
    nodes, output, residual = [index], node.output[0], None
    follower = _single_consumer(lookups, output, taken)
    if follower is not None:
        add = lookups.graph.node[follower]
        if (add.op_type in ("Add", "Sum") and not add.domain and len(add.input) == 2  # old zoo models use Sum
                and add.input[0] != add.input[1]):
            other = add.input[1] if add.input[0] == output else add.input[0]
            if lookups.constant(other) is None:
                nodes.append(follower)
                output, residual = add.output[0], other
    low, high = float("-inf"), float("inf")
    follower = _single_consumer(lookups, output, taken)
    if follower is not None and (clamp := _clamp(lookups, lookups.graph.node[follower])) is not None:
        nodes.append(follower)
        output, (low, high) = lookups.graph.node[follower].output[0], clamp
    kernel = native.ConvF32(np.ascontiguousarray(weight, dtype=np.float32),
                            None if bias is None else np.ascontiguousarray(bias, dtype=np.float32),
                            clamp_min=low, clamp_max=high, **geometry)
    return _with_pooling(Chain(tuple(nodes), node.input[0], residual, output, np.dtype(np.float32),
                               np.dtype(np.float32), kernel, matrix, _names(lookups, nodes)),
                         native, lookups, node, shape_of, taken, integer=False)


def _with_pooling(chain: Chain, native, lookups, node, shape_of, taken: set[int], integer: bool) -> Chain:
    """The chain, starting at the global average pool in front of it when there is one."""
    if not chain.matrix:
        return chain
    found = _global_average_before(native, lookups, node, shape_of, taken, integer)
    if found is None:
        return chain
    indices, source, step = found
    nodes = [*indices, *chain.node_indices]
    return Chain(tuple(nodes), source, chain.residual, chain.output, chain.input_type, chain.output_type,
                 chain.kernel, True, _names(lookups, nodes), step)


def pool_chain(native, lookups: model_io.GraphIndex, index: int, input_type: np.dtype) -> Chain:
    """A MaxPool (regions.partition says which): exact (a maximum), in any of the element types.
    On ResNet-50's 64x112x112 here: uint8 3.7 ms in onnxruntime, 0.1 ms native; float32 0.27 and 0.19."""
    node = lookups.graph.node[index]
    attrs = _attrs(node)
    if len(node.output) > 1 and node.output[1]:
        raise Unsupported("MaxPool's Indices output is left to onnxruntime")
    if attrs.get("ceil_mode", 0):
        raise Unsupported("ceil_mode=1 is left to onnxruntime")
    kernel = list(attrs.get("kernel_shape", []))
    if len(kernel) != 2:
        raise Unsupported("only 2-D pooling runs natively")
    try:
        pool = native.MaxPool(kernel, **_window(attrs))
    except ValueError as exc:
        raise Unsupported(str(exc)) from exc
    return Chain((index,), node.input[0], None, node.output[0], input_type, input_type, pool, False,
                 _names(lookups, [index]))


def _scalar(value: np.ndarray, what: str) -> np.ndarray:
    if value.size != 1:
        raise Unsupported(f"{what} is not per tensor")
    return value.reshape(())


def integer_chain(native, lookups: model_io.GraphIndex, index: int, rank_of, taken: set[int],
                  shape_of=None) -> Chain:
    node = lookups.graph.node[index]
    matrix = node.op_type != "QLinearConv"
    if node.op_type == "QGemm":
        attrs = _attrs(node)
        if node.domain != MICROSOFT or attrs.get("transA", 0) or float(attrs.get("alpha", 1.0)) != 1.0:
            raise Unsupported("transA or alpha != 1 is left to onnxruntime")
        if len(node.input) < 9 or not node.input[7]:
            raise Unsupported("a QGemm with float output is left to onnxruntime")
        y_scale_at = 7
    else:
        y_scale_at = 6
    x_scale = _scalar(_constant(lookups, node, 1, "x_scale"), "x_scale")
    x_zero = _scalar(_constant(lookups, node, 2, "x_zero_point"), "x_zero_point")
    weight = _constant(lookups, node, 3, "the weight")
    w_scale = _constant(lookups, node, 4, "w_scale").astype(np.float32).reshape(-1)
    w_zero = _optional_constant(lookups, node, 5, "w_zero_point")
    y_scale = _scalar(_constant(lookups, node, y_scale_at, "y_scale"), "y_scale")
    y_zero = _scalar(_constant(lookups, node, y_scale_at + 1, "y_zero_point"), "y_zero_point")
    if weight.dtype != np.int8 or (w_zero is not None and np.any(w_zero != 0)):
        raise Unsupported("only int8 weights with zero point 0 run natively")
    if x_zero.dtype not in (np.uint8, np.int8) or y_zero.dtype not in (np.uint8, np.int8):
        raise Unsupported("activations must be uint8 or int8")
    if node.op_type == "QLinearConv":
        bias = _optional_constant(lookups, node, 8, "the bias")
        geometry = _conv_geometry(node, weight.shape)
    else:
        if rank_of(node.input[0]) != 2:
            raise Unsupported("the input is not known to be 2-D")
        if node.op_type == "QGemm":
            weight = weight if _attrs(node).get("transB", 0) else weight.T
            bias = _optional_constant(lookups, node, 6, "C")
        else:
            weight, bias = weight.T, None
        if weight.ndim != 2:
            raise Unsupported("B is not 2-D")
        weight = weight.reshape(*weight.shape, 1, 1)
        geometry = _matrix_geometry()
    out_channels = weight.shape[0]
    if w_scale.size not in (1, out_channels):
        raise Unsupported(f"w_scale has {w_scale.size} values for {out_channels} outputs")
    if bias is not None and (bias.dtype != np.int32 or bias.size != out_channels):
        raise Unsupported("the bias must be int32, one per output")
    try:
        multiplier = requantize_multiplier(x_scale, np.broadcast_to(w_scale, out_channels), y_scale)
    except ValueError as exc:
        raise Unsupported(f"scales give an unusable multiplier ({exc})") from exc
    kernel = native.ConvQ8(np.ascontiguousarray(weight), None if bias is None else np.ascontiguousarray(
        bias.reshape(-1)), int(x_zero), x_zero.dtype == np.int8, multiplier.multiplier.astype(np.int64),
        multiplier.shift.astype(np.int64), int(y_zero), y_zero.dtype == np.int8, **geometry)
    nodes, output, residual = [index], node.output[0], None
    follower = _single_consumer(lookups, output, taken)
    if follower is not None:
        add = lookups.graph.node[follower]
        if add.op_type == "QLinearAdd" and add.domain == MICROSOFT and add.input[0] != add.input[3]:
            try:
                residual, factors = _residual_add(lookups, add, output, y_scale, y_zero)
            except Unsupported:
                residual = None
            if residual is not None:
                kernel.set_residual_add(*factors)
                nodes.append(follower)
                output = add.output[0]
    return _with_pooling(Chain(tuple(nodes), node.input[0], residual, output, np.dtype(x_zero.dtype),
                               np.dtype(y_zero.dtype), kernel, matrix, _names(lookups, nodes)),
                         native, lookups, node, shape_of, taken, integer=True)


def _residual_add(lookups, add: onnx.NodeProto, conv_output: str, y_scale, y_zero):
    """(the other operand, set_residual_add arguments) of a QLinearAdd fed by the chain's output."""
    position = 0 if add.input[0] == conv_output else 3
    other = 3 - position
    scales = [_scalar(_constant(lookups, add, i, "scale"), "scale") for i in (1, 4, 6)]
    zeros = [_scalar(_constant(lookups, add, i, "zero point"), "zero point") for i in (2, 5, 7)]
    if any(z.dtype != y_zero.dtype for z in zeros):
        raise Unsupported("QLinearAdd types differ from the convolution's output")
    conv_scale, conv_zero = (scales[0], zeros[0]) if position == 0 else (scales[1], zeros[1])
    if np.float32(conv_scale) != np.float32(y_scale) or int(conv_zero) != int(y_zero):
        raise Unsupported("QLinearAdd reads the convolution output on another grid")
    rescale = add_rescale(float(scales[0]), float(scales[1]), float(scales[2]))
    factor_conv, factor_other = ((rescale.factor_a, rescale.factor_b) if position == 0
                                 else (rescale.factor_b, rescale.factor_a))
    other_zero = zeros[1] if position == 0 else zeros[0]
    return add.input[other], (factor_conv, factor_other, rescale.shift, int(other_zero), int(zeros[2]))
