"""Per-layer statistics of a model's weights: sizes, sparsity, detected pattern, MACs at batch 1."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from onnxsparse import model as model_io
from onnxsparse.formats.pack import DOMAIN as PACKED_DOMAIN
from onnxsparse.formats.pack import unpack_model
from onnxsparse.sparsity.patterns import MatrixShape, detect_pattern
from onnxsparse.validation import validate


@dataclass(frozen=True)
class LayerStats:
    name: str
    op_type: str
    weight_name: str
    weight_shape: tuple[int, ...]
    params: int
    nonzeros: int
    sparsity: float
    pattern: str  # the strongest pattern the zeros satisfy: "dense", "2:4", "1x16", ..., "unstructured"
    pattern_sparsity: float  # the share of zeros that pattern's structure accounts for
    dense_macs: int | None  # None when shapes cannot be inferred
    effective_macs: int | None  # MACs with a nonzero weight
    size_bytes: int  # bytes of the stored weight (its storage dtype)


@dataclass(frozen=True)
class ModelStats:
    layers: tuple[LayerStats, ...]
    model_params: int  # every element of every constant tensor (biases, norms, ...)

    @property
    def params(self) -> int:
        return sum(layer.params for layer in self.layers)

    @property
    def nonzeros(self) -> int:
        return sum(layer.nonzeros for layer in self.layers)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzeros / self.params if self.params else 0.0

    @property
    def dense_macs(self) -> int | None:
        return _sum_or_none(layer.dense_macs for layer in self.layers)

    @property
    def effective_macs(self) -> int | None:
        return _sum_or_none(layer.effective_macs for layer in self.layers)

    @property
    def size_bytes(self) -> int:
        return sum(layer.size_bytes for layer in self.layers)

    def to_json(self) -> dict:
        document = {
            "layers": [dict(asdict(layer), weight_shape=list(layer.weight_shape)) for layer in self.layers],
            "totals": {
                "layers": len(self.layers), "params": self.params, "nonzeros": self.nonzeros,
                "sparsity": self.sparsity, "dense_macs": self.dense_macs,
                "effective_macs": self.effective_macs, "size_bytes": self.size_bytes,
                "model_params": self.model_params,
            },
        }
        validate(document, "stats", "stats JSON")
        return document


def _sum_or_none(values) -> int | None:
    values = list(values)
    return None if any(v is None for v in values) else sum(values)


def model_stats(model: onnx.ModelProto) -> ModelStats:
    """Statistics of every weight-bearing node, in graph order (a packed model is unpacked in
    memory first: exact, so its figures are those of the weights it holds)."""
    if any(node.domain == PACKED_DOMAIN for node in model.graph.node):
        model = unpack_model(model)
    shapes = model_io.infer_shapes(model)
    layers = []
    for ref in model_io.find_weights(model):
        weight = model_io.read_weight(model, ref)
        layout = ref.layout
        matrix = layout.to_matrix(weight)
        nonzeros = int(np.count_nonzero(matrix))
        detected = detect_pattern(matrix, MatrixShape(layout.out_channels, layout.kernel_positions,
                                                      layout.strip_length))
        positions = _positions(model.graph.node[ref.node_index], ref, shapes)
        layers.append(LayerStats(
            name=ref.node_name, op_type=ref.op_type, weight_name=ref.tensor_name,
            weight_shape=tuple(int(d) for d in weight.shape), params=int(weight.size), nonzeros=nonzeros,
            sparsity=1.0 - nonzeros / weight.size if weight.size else 0.0,
            pattern=detected.spec, pattern_sparsity=detected.pattern_sparsity,
            dense_macs=None if positions is None else positions * int(weight.size),
            effective_macs=None if positions is None else positions * nonzeros,
            size_bytes=int(weight.size) * np.dtype(ref.storage_dtype).itemsize,
        ))
    return ModelStats(tuple(layers), _model_params(model))


def _positions(node: onnx.NodeProto, ref: model_io.WeightRef, shapes) -> int | None:
    """How many times each weight is used per inference at batch 1: output pixels (or rows) per
    output channel; for ConvTranspose, input pixels per input channel."""
    if ref.op_type == "ConvTranspose":
        data_shape = shapes.get(ref.data_input)
        channels = ref.layout.in_channels
    else:
        data_shape = shapes.get(node.output[0])
        channels = ref.layout.out_channels
    if not data_shape:
        return None
    return int(np.prod(data_shape, dtype=np.int64)) // channels


def _model_params(model: onnx.ModelProto) -> int:
    total = sum(int(np.prod(init.dims, dtype=np.int64)) for init in model.graph.initializer)
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    total += int(numpy_helper.to_array(attr.t).size)
    return total
