"""Which nodes and tensors a quantized model quantizes, and which tensors must share parameters."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import onnx
from onnx import helper

from onnxsparse import model as model_io

# Ops whose quantized output needs new parameters (an integer op requantizes into them).
REQUANTIZING = {"Conv", "Gemm", "MatMul", "Add", "Sum", "Concat", "AveragePool", "GlobalAveragePool"}
# Ops that move or select values: output on the same grid as the input. (A Relu not merged into
# its producer's saturation is max(q, zero point) on the input's grid.)
PASS_THROUGH = {"MaxPool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Relu"}
# Inputs that are not activations (shapes, axes) per op.
DATA_INPUTS = {"Reshape": 1, "Squeeze": 1, "Unsqueeze": 1}


@dataclass
class QuantPlan:
    """The decisions of one quantization, in terms of the float (batch-norm folded) graph."""

    weights: dict[int, model_io.WeightRef] = field(default_factory=dict)  # node index -> weight to quantize
    nodes: set[int] = field(default_factory=set)  # every quantized node (weight-bearing or not)
    merged: dict[int, int] = field(default_factory=dict)  # node -> the Relu/Clip folded into its output range
    tensors: list[str] = field(default_factory=list)  # float tensors with quantization parameters, graph order
    group_of: dict[str, str] = field(default_factory=dict)  # tensor -> representative of its shared-grid group
    notes: list[str] = field(default_factory=list)

    def output_tensor(self, model: onnx.ModelProto, index: int) -> str:
        """The tensor holding a quantized node's result (after a merged Relu, the Relu's output)."""
        node = model.graph.node[self.merged.get(index, index)]
        return node.output[0]


def plan_quantization(model: onnx.ModelProto, *, exclude: str | None = None, keep_first_float: bool = False,
                      keep_last_float: bool = False, merge_relu: bool = True) -> QuantPlan:
    """Decide what to quantize in a float model whose batch norms are already folded."""
    graph = model.graph
    lookups = model_io.GraphIndex(model)
    plan = QuantPlan()
    refs = [ref for ref in model_io.find_weights(model) if _quantizable_weight(model, ref, plan)]
    if refs and keep_first_float:
        plan.notes.append(f"{refs[0].node_name}: kept in float (first layer)")
        refs = refs[1:]
    if refs and keep_last_float:
        plan.notes.append(f"{refs[-1].node_name}: kept in float (last layer)")
        refs = refs[:-1]
    excluded = re.compile(exclude) if exclude else None
    for ref in refs:
        if excluded and (excluded.search(ref.node_name) or excluded.search(ref.tensor_name)):
            plan.notes.append(f"{ref.node_name}: kept in float (--exclude)")
            continue
        plan.weights[ref.node_index] = ref
    plan.nodes.update(plan.weights)

    quantized_values: set[str] = set(inp.name for inp in graph.input) - set(lookups.initializers)
    for index, node in enumerate(graph.node):
        name = model_io.display_name(node)
        data = _data_inputs(node, lookups)
        if index in plan.merged.values():
            continue
        if index not in plan.weights:
            if node.op_type == "Sum" and len(node.input) != 2:  # a two-input Sum is an Add
                continue
            if not (node.op_type in REQUANTIZING | PASS_THROUGH and data and any(t in quantized_values for t in data)
                    and not (excluded and excluded.search(name)) and _single_output(node, lookups)):
                continue
            plan.nodes.add(index)
        follower = _mergeable_activation(model, lookups, index) \
            if merge_relu and node.op_type in REQUANTIZING else None
        if follower is not None:
            plan.merged[index] = follower
        quantized_values.add(plan.output_tensor(model, index))

    tensors: dict[str, None] = {}
    for index in sorted(plan.nodes):
        node = graph.node[index]
        for tensor in _data_inputs(node, lookups):
            tensors[tensor] = None
        tensors[plan.output_tensor(model, index)] = None
    plan.tensors = list(tensors)
    plan.group_of = _shared_grid_groups(model, plan, lookups)
    return plan


def _quantizable_weight(model: onnx.ModelProto, ref: model_io.WeightRef, plan: QuantPlan) -> bool:
    node = model.graph.node[ref.node_index]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    reason = None
    if ref.op_type == "ConvTranspose":
        reason = "ConvTranspose is kept in float"
    elif ref.op_type in ("Gemm", "MatMul") and ref.input_index != 1:
        reason = "a constant left operand is kept in float"
    elif ref.op_type == "Gemm" and (attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0 or attrs.get("transA", 0)):
        reason = "Gemm with alpha/beta != 1 or transA is kept in float"
    if reason:
        plan.notes.append(f"{ref.node_name}: {reason}")
    return reason is None


def _data_inputs(node: onnx.NodeProto, lookups: model_io.GraphIndex) -> list[str]:
    """The activation inputs of a node (not weights, biases, shapes or axes)."""
    if node.op_type in ("Conv", "Gemm", "MatMul"):
        candidates = [node.input[0]] if node.op_type != "MatMul" else list(node.input[:2])
    elif node.op_type in DATA_INPUTS:
        candidates = list(node.input[: DATA_INPUTS[node.op_type]])
    else:
        candidates = list(node.input)
    return [name for name in candidates if name and lookups.constant(name) is None]


def _single_output(node: onnx.NodeProto, lookups: model_io.GraphIndex) -> bool:
    return all(lookups.uses(out) == 0 for out in node.output[1:])


def _mergeable_activation(model: onnx.ModelProto, lookups: model_io.GraphIndex, index: int) -> int | None:
    """The Relu (or Clip from 0) that alone consumes this node's output, if any."""
    output = model.graph.node[index].output[0]
    consumers = lookups.consumers.get(output, [])
    if len(consumers) != 1 or output in lookups.graph_outputs:
        return None
    follower = model.graph.node[consumers[0]]
    if follower.op_type == "Relu":
        return consumers[0]
    if follower.op_type == "Clip" and len(follower.input) > 1 and follower.input[1]:
        low = lookups.constant(follower.input[1])
        if low is not None and float(low) == 0.0:
            return consumers[0]
    return None


def _shared_grid_groups(model: onnx.ModelProto, plan: QuantPlan, lookups) -> dict[str, str]:
    """Union-find: a pass-through op's input and output share one grid. A group is thus one source
    tensor and its pass-through descendants, whose values are a subset of the source's, so a
    ReLU merged into the source's saturation stays valid for all of them. A Concat's inputs keep
    their own grids (QLinearConcat requantizes those that differ from its output's): sharing one
    grid there would let a signed input pull a merged ReLU's range below zero."""
    parent = {tensor: tensor for tensor in plan.tensors}

    def find(tensor: str) -> str:
        while parent[tensor] != tensor:
            parent[tensor] = parent[parent[tensor]]
            tensor = parent[tensor]
        return tensor

    for index in plan.nodes:
        node = model.graph.node[index]
        if node.op_type in PASS_THROUGH:
            out = find(plan.output_tensor(model, index))
            for tensor in _data_inputs(node, lookups):
                parent[find(tensor)] = out
    return {tensor: find(tensor) for tensor in plan.tensors}
