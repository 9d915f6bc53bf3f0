"""Fold per-channel affine ops into the convolution that feeds them (before quantizing).

A Conv followed by BatchNormalization, or by Mul / Add with a per-output-channel constant (how
Caffe2-converted models write batch norm), is one Conv with W'[o] = W[o] * g[o] and
b'[o] = b[o] * g[o] + t[o]. Folding first matters for quantization: otherwise the conv's output is
quantized per tensor before a per-channel rescale. Scaling keeps zeros zero, so pruned patterns
survive the fold.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxsparse import model as model_io


def fold_batch_norms(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy of `model` with every foldable affine op merged into its Conv; and how many."""
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    total = 0
    while count := _fold_once(folded):  # Conv -> Mul -> Add folds in two rounds
        total += count
    return folded, total


def _fold_once(model: onnx.ModelProto) -> int:
    graph = model.graph
    lookups = model_io.GraphIndex(model)
    convs = {ref.node_index: ref for ref in model_io.find_weights(model) if ref.op_type == "Conv"}
    removed, folded_convs = [], set()
    for index, node in enumerate(graph.node):
        affine = _affine(node, lookups)
        if affine is None:
            continue
        activation, factor, shift, given_per_channel = affine
        conv_index = lookups.producer.get(activation)
        if conv_index not in convs or conv_index in folded_convs or lookups.uses(activation) != 1:
            continue
        ref, conv = convs[conv_index], graph.node[conv_index]
        weight = model_io.read_weight(model, ref)
        channels = weight.shape[0]
        if given_per_channel:
            factor, shift = (v if v.size == channels else None for v in (factor, shift))
        else:
            factor, shift = _per_channel(factor, channels, weight.ndim), _per_channel(shift, channels, weight.ndim)
        if factor is None or shift is None:
            continue
        scaled = (weight.astype(np.float64) * factor.reshape(-1, *([1] * (weight.ndim - 1)))).astype(weight.dtype)
        model_io.write_matrix(model, ref, ref.layout.to_matrix(scaled))
        bias = lookups.constant(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else None
        bias = np.zeros(channels) if bias is None else bias.astype(np.float64).reshape(-1)
        bias_name = model_io.unique_name(lookups, f"{node.output[0]}_folded_bias")
        lookups.initializers[bias_name] = None
        graph.initializer.append(numpy_helper.from_array((bias * factor + shift).astype(weight.dtype), bias_name))
        if len(conv.input) > 2:
            conv.input[2] = bias_name
        else:
            conv.input.append(bias_name)
        conv.output[0] = node.output[0]
        removed.append(index)
        folded_convs.add(conv_index)
    for index in reversed(removed):
        del graph.node[index]
    model_io.remove_unused(model)
    return len(removed)


def _affine(node: onnx.NodeProto, lookups) -> tuple[str, np.ndarray, np.ndarray, bool] | None:
    """(activation input, factor, shift, given per channel) when `node` computes activation * factor
    + shift; factor and shift are either one value per channel (batch norm) or numpy-broadcast
    constants (Mul, Add)."""
    if node.op_type == "BatchNormalization":
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        params = [lookups.constant(name) for name in node.input[1:5]]
        if attrs.get("training_mode", 0) or len(node.output) > 1 or any(p is None for p in params):
            return None
        gamma, beta, mean, var = (p.astype(np.float64) for p in params)
        factor = gamma / np.sqrt(var + attrs.get("epsilon", 1e-5))
        return node.input[0], factor, beta - mean * factor, True
    if node.op_type in ("Mul", "Add") and len(node.input) == 2:
        constants = [lookups.constant(name) for name in node.input]
        if (constants[0] is None) == (constants[1] is None):
            return None
        position = 0 if constants[1] is not None else 1
        value = constants[1 - position].astype(np.float64)
        if node.op_type == "Mul":
            return node.input[position], value, np.zeros(1), False
        return node.input[position], np.ones(1), value, False
    return None


def _per_channel(value: np.ndarray, channels: int, rank: int) -> np.ndarray | None:
    """`value` as one number per output channel of an [N, O, ...] tensor of this rank, or None when
    it broadcasts any other way."""
    if value.ndim > rank:
        return None
    shape = (1,) * (rank - value.ndim) + value.shape
    if shape[0] != 1 or any(d != 1 for d in shape[2:]) or shape[1] not in (1, channels):
        return None
    return np.broadcast_to(value.reshape(-1), (channels,)).astype(np.float64)
