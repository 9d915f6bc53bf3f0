"""Fold BatchNormalization into the convolution that feeds it (before quantizing).

W'[o] = W[o] * g[o],  b'[o] = (b[o] - mean[o]) * g[o] + beta[o],  g = gamma / sqrt(var + eps).
Scaling keeps zeros zero, so pruned patterns survive the fold.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxsparse import model as model_io


def fold_batch_norms(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy of `model` with every foldable Conv -> BatchNormalization pair merged; and how many.

    Foldable: the Conv has a constant weight, its output feeds only the BatchNormalization (and is
    not a graph output), the BatchNormalization runs in inference mode with constant parameters.
    """
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    graph = folded.graph
    lookups = model_io.GraphIndex(folded)
    convs = {ref.node_index: ref for ref in model_io.find_weights(folded) if ref.op_type == "Conv"}
    removed = []
    for index, node in enumerate(graph.node):
        if node.op_type != "BatchNormalization":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        conv_index = lookups.producer.get(node.input[0])
        if conv_index not in convs or attrs.get("training_mode", 0) or len(node.output) > 1 \
                or lookups.uses(node.input[0]) != 1:
            continue
        params = [lookups.constant(name) for name in node.input[1:5]]
        if any(p is None for p in params):
            continue
        gamma, beta, mean, var = (p.astype(np.float64) for p in params)
        factor = gamma / np.sqrt(var + attrs.get("epsilon", 1e-5))
        ref, conv = convs[conv_index], graph.node[conv_index]
        weight = model_io.read_weight(folded, ref)
        scaled = (weight.astype(np.float64) * factor.reshape(-1, *([1] * (weight.ndim - 1)))).astype(weight.dtype)
        model_io.write_matrix(folded, ref, ref.layout.to_matrix(scaled))
        bias = lookups.constant(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else None
        bias = np.zeros(weight.shape[0]) if bias is None else bias.astype(np.float64)
        bias_name = model_io.unique_name(lookups, f"{node.output[0]}_folded_bias")
        graph.initializer.append(numpy_helper.from_array(((bias - mean) * factor + beta).astype(weight.dtype),
                                                         bias_name))
        lookups.initializers[bias_name] = graph.initializer[-1]
        if len(conv.input) > 2:
            conv.input[2] = bias_name
        else:
            conv.input.append(bias_name)
        conv.output[0] = node.output[0]
        removed.append(index)
    for index in reversed(removed):
        del graph.node[index]
    model_io.remove_unused(folded)
    return folded, len(removed)
