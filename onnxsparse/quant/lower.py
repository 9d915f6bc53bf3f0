"""Lower a QDQ model to its integer-only form (docs/ARITHMETIC.md): DQ -> op -> Q becomes one
integer operator (QLinearConv, QGemm, QLinearMatMul, QLinearAdd, QLinearConcat, QLinear*Pool) or
the same shape op on the integer tensor. What cannot be lowered stays a float island between DQ
and Q. Works on any QDQ model in the standard layout (onnxsparse's or onnxruntime's quantizer's).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from onnxsparse import model as model_io
from onnxsparse.quant.plan import PASS_THROUGH

MS_DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class _Dequantized:
    """A float tensor that is DequantizeLinear(quantized, scale, zero_point)."""

    quantized: str
    scale: str
    zero_point: str
    axis: int | None


@dataclass(frozen=True)
class _Output:
    """Where a node's result goes: the Quantize that takes it, and a Relu/Clip folded on the way."""

    quantize: onnx.NodeProto
    activation: onnx.NodeProto | None


def lower_to_integer(model: onnx.ModelProto) -> onnx.ModelProto:
    """The integer-only form of a QDQ model (a new ModelProto)."""
    lowered = onnx.ModelProto()
    lowered.CopyFrom(model)
    graph = lowered.graph
    lookups = model_io.GraphIndex(lowered)
    dequantized = _dequantized_tensors(lowered, lookups)
    replaced: dict[int, list[onnx.NodeProto]] = {}
    dropped: set[int] = set()
    uses_ms_domain = False
    for index, node in enumerate(graph.node):
        result = _output_of(lowered, lookups, index)
        if result is None:
            continue
        new_nodes = _integer_nodes(node, result, dequantized, lookups)
        if new_nodes is None:
            continue
        replaced[index] = new_nodes
        dropped.add(lookups.producer[result.quantize.output[0]])
        if result.activation is not None:
            dropped.add(lookups.producer[result.activation.output[0]])
        uses_ms_domain |= any(n.domain == MS_DOMAIN for n in new_nodes)
    nodes = []
    for index, node in enumerate(graph.node):
        if index in dropped:
            continue
        nodes.extend(replaced.get(index, [node]))
    del graph.node[:]
    graph.node.extend(nodes)
    if uses_ms_domain and not any(op.domain == MS_DOMAIN for op in lowered.opset_import):
        lowered.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    model_io.remove_unused(lowered)
    return lowered


def _dequantized_tensors(model: onnx.ModelProto, lookups) -> dict[str, _Dequantized]:
    found = {}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear":  # a missing zero point is 0 (int32 biases)
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            zero_point = node.input[2] if len(node.input) > 2 else ""
            found[node.output[0]] = _Dequantized(node.input[0], node.input[1], zero_point, attrs.get("axis"))
    return found


def _output_of(model: onnx.ModelProto, lookups, index: int) -> _Output | None:
    """The single QuantizeLinear this node's output reaches, directly or through one Relu/Clip."""
    node = model.graph.node[index]
    if not node.output or any(lookups.uses(out) for out in node.output[1:]):
        return None
    consumers = lookups.consumers.get(node.output[0], [])
    if len(consumers) != 1 or node.output[0] in lookups.graph_outputs:
        return None
    follower = model.graph.node[consumers[0]]
    activation = None
    if follower.op_type in ("Relu", "Clip"):
        activation = follower
        consumers = lookups.consumers.get(follower.output[0], [])
        if len(consumers) != 1 or follower.output[0] in lookups.graph_outputs:
            return None
        follower = model.graph.node[consumers[0]]
    if follower.op_type != "QuantizeLinear" or len(follower.input) < 3 or not follower.input[2]:
        return None
    return _Output(follower, activation)


def _integer_nodes(node: onnx.NodeProto, result: _Output, dequantized: dict[str, _Dequantized],
                   lookups) -> list[onnx.NodeProto] | None:
    """The integer replacement of `node` (None to keep it in float)."""
    quantize = result.quantize
    y_scale, y_zero = quantize.input[1], quantize.input[2]
    output = quantize.output[0]
    attrs = [a for a in node.attribute if not (node.op_type == "Gemm" and a.name == "beta")]  # QGemm has no beta
    name = node.name or output

    def operand(position: int) -> _Dequantized | None:
        return dequantized.get(node.input[position]) if len(node.input) > position else None

    if not _saturation_does_activation(result.activation, lookups, y_scale, y_zero):
        return None

    if node.op_type == "Conv":
        x, w, b = operand(0), operand(1), operand(2)
        if x is None or w is None or (len(node.input) > 2 and node.input[2] and b is None):
            return None
        inputs = [x.quantized, x.scale, x.zero_point, w.quantized, w.scale, w.zero_point, y_scale, y_zero]
        new = helper.make_node("QLinearConv", inputs + ([b.quantized] if b else []), [output], name=name)
    elif node.op_type == "Gemm":
        a, b, c = operand(0), operand(1), operand(2)
        if a is None or b is None or (len(node.input) > 2 and node.input[2] and c is None):
            return None
        inputs = [a.quantized, a.scale, a.zero_point, b.quantized, b.scale, b.zero_point,
                  c.quantized if c else "", y_scale, y_zero]
        new = helper.make_node("QGemm", inputs, [output], name=name, domain=MS_DOMAIN)
    elif node.op_type == "MatMul":
        a, b = operand(0), operand(1)
        if a is None or b is None:
            return None
        inputs = [a.quantized, a.scale, a.zero_point, b.quantized, b.scale, b.zero_point, y_scale, y_zero]
        new = helper.make_node("QLinearMatMul", inputs, [output], name=name)
    elif node.op_type in ("Add", "Sum") and len(node.input) == 2:
        a, b = operand(0), operand(1)
        if a is None or b is None:
            return None
        inputs = [a.quantized, a.scale, a.zero_point, b.quantized, b.scale, b.zero_point, y_scale, y_zero]
        new = helper.make_node("QLinearAdd", inputs, [output], name=name, domain=MS_DOMAIN)
    elif node.op_type == "Concat":
        parts = [operand(i) for i in range(len(node.input))]
        if any(part is None for part in parts):
            return None
        inputs = [y_scale, y_zero] + [tensor for part in parts for tensor in (part.quantized, part.scale, part.zero_point)]
        new = helper.make_node("QLinearConcat", inputs, [output], name=name, domain=MS_DOMAIN)
    elif node.op_type in ("GlobalAveragePool", "AveragePool"):
        x = operand(0)
        if x is None:
            return None
        inputs = [x.quantized, x.scale, x.zero_point, y_scale, y_zero]
        new = helper.make_node(f"QLinear{node.op_type}", inputs, [output], name=name, domain=MS_DOMAIN,
                               channels_last=0)
    elif node.op_type in PASS_THROUGH:
        x = operand(0)
        if x is None or result.activation is not None or not _same_grid(lookups, x, y_scale, y_zero):
            return None
        if node.op_type == "Relu":  # on the grid, ReLU is max(q, zero point)
            return [helper.make_node("Max", [x.quantized, x.zero_point], [output], name=name)]
        new = helper.make_node(node.op_type, [x.quantized, *node.input[1:]], [output], name=name)
    else:
        return None
    new.attribute.extend(attrs)
    return [new]


def _saturation_does_activation(activation: onnx.NodeProto | None, lookups, y_scale: str, y_zero: str) -> bool:
    """True when there is no Relu/Clip before the Quantize, or saturating to the output type's
    range already clamps where it would (a Relu with the zero point at the type's minimum)."""
    if activation is None:
        return True
    zero_point = lookups.constant(y_zero)
    scale = lookups.constant(y_scale)
    if zero_point is None or scale is None or zero_point.size != 1:
        return False
    info = np.iinfo(zero_point.dtype)
    low, high = 0.0, None
    if activation.op_type == "Clip":
        bounds = []
        for position in (1, 2):
            name = activation.input[position] if len(activation.input) > position else ""
            value = lookups.constant(name) if name else None
            if name and value is None:
                return False
            bounds.append(None if value is None else float(value))
        low, high = bounds

    def on_grid(value: float | None, default: int) -> int:
        if value is None:
            return default
        return int(np.clip(np.rint(value / float(scale)) + int(zero_point), info.min, info.max))

    q_low, q_high = on_grid(low, info.min), on_grid(high, info.max)
    return q_low <= info.min and q_high >= info.max


def _same_grid(lookups, x: _Dequantized, y_scale: str, y_zero: str) -> bool:
    values = [lookups.constant(name) for name in (x.scale, y_scale, x.zero_point, y_zero)]
    if any(v is None for v in values):
        return False
    return np.array_equal(values[0], values[1]) and np.array_equal(values[2], values[3]) \
        and values[2].dtype == values[3].dtype
