"""report/stats.py: per-layer parameters, zeros, detected pattern, MACs at batch 1 and stored size."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxsparse.model import WeightLayout
from onnxsparse.report.stats import model_stats
from onnxsparse.sparsity.criteria import L1
from onnxsparse.sparsity.patterns import MatrixShape, parse_pattern

STATS_SCHEMA = Path(__file__).resolve().parent.parent / "schemas" / "stats.schema.json"


def weight(shape, zeroed: int = 0, seed: int = 0) -> np.ndarray:
    """A float32 weight with no natural zeros and its first `zeroed` elements (ONNX order) set to 0."""
    values = np.random.default_rng(seed).uniform(0.5, 1.5, shape).astype(np.float32)
    values.reshape(-1)[:zeroed] = 0
    return values


def make_model(nodes, inputs: dict, initializers: dict, outputs: dict | None = None) -> onnx.ModelProto:
    """A float model; `inputs` (and `outputs`) map names to shapes, `initializers` names to arrays.
    Outputs default to every node's first output with its shape left to inference."""
    outputs = outputs or {node.output[0]: None for node in nodes}
    inputs_info, outputs_info = (
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in values.items()]
        for values in (inputs, outputs))
    graph = helper.make_graph(nodes, "stats", inputs_info, outputs_info,
                              [numpy_helper.from_array(value, name) for name, value in initializers.items()])
    return helper.make_model_gen_version(graph, opset_imports=[helper.make_opsetid("", 17)])


def five_layer_model(batch: int | str = 1) -> onnx.ModelProto:
    """Five independent layers, each on its own input; `conv` has 5 zeroed weights and a bias,
    `deconv` 4 zeroed weights."""
    nodes = [
        helper.make_node("Conv", ["x_conv", "w_conv", "b_conv"], ["y_conv"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["x_grouped", "w_grouped"], ["y_grouped"], name="grouped", group=2,
                         strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Gemm", ["x_fc", "w_fc"], ["y_fc"], name="fc", transB=1),
        helper.make_node("MatMul", ["x_matmul", "w_matmul"], ["y_matmul"], name="matmul"),
        helper.make_node("ConvTranspose", ["x_deconv", "w_deconv"], ["y_deconv"], name="deconv", strides=[2, 2]),
    ]
    inputs = {"x_conv": [batch, 1, 5, 5], "x_grouped": [batch, 4, 6, 6], "x_fc": [batch, 10],
              "x_matmul": [batch, 8], "x_deconv": [batch, 2, 3, 3]}
    initializers = {"w_conv": weight((4, 1, 3, 3), zeroed=5), "b_conv": weight(4),
                    "w_grouped": weight((6, 2, 3, 3)), "w_fc": weight((3, 10)), "w_matmul": weight((8, 5)),
                    "w_deconv": weight((2, 3, 2, 2), zeroed=4)}
    return make_model(nodes, inputs, initializers)


# Hand-computed: MACs = (output pixels per output channel) x weight elements; for ConvTranspose
# (input pixels per input channel) x weight elements. Effective MACs count nonzero weights only.
EXPECTED = {  # name: (weight shape, params, nonzeros, dense MACs, effective MACs)
    "conv": ((4, 1, 3, 3), 36, 31, 4 * 25 * 9, 31 * 25),  # 5x5 output, pad 1
    "grouped": ((6, 2, 3, 3), 108, 108, 9 * 108, 9 * 108),  # 6x6 input, stride 2, pad 1: 3x3 output
    "fc": ((3, 10), 30, 30, 30, 30),  # one row in, 10 -> 3
    "matmul": ((8, 5), 40, 40, 40, 40),  # [1, 8] x [8, 5]
    "deconv": ((2, 3, 2, 2), 24, 20, 9 * 24, 9 * 20),  # 3x3 input pixels
}


def layer_by_name(stats):
    return {layer.name: layer for layer in stats.layers}


@pytest.mark.parametrize("name", EXPECTED)
def test_layer_params_zeros_macs_and_size_match_hand_computed_values(name):
    layer = layer_by_name(model_stats(five_layer_model()))[name]
    weight_shape, params, nonzeros, dense_macs, effective_macs = EXPECTED[name]
    assert layer.weight_name == f"w_{name}" and layer.weight_shape == weight_shape
    assert (layer.params, layer.nonzeros, layer.dense_macs, layer.effective_macs) == (
        params, nonzeros, dense_macs, effective_macs)
    assert layer.sparsity == pytest.approx(1 - nonzeros / params, abs=1e-12)
    assert layer.size_bytes == 4 * params


def test_model_totals_are_the_sums_of_the_layers_and_model_params_count_every_constant():
    stats = model_stats(five_layer_model())
    assert [layer.name for layer in stats.layers] == list(EXPECTED)
    columns = list(zip(*(row[1:] for row in EXPECTED.values())))
    params, nonzeros, dense_macs, effective_macs = (sum(column) for column in columns)
    assert (params, nonzeros) == (238, 229)
    assert (dense_macs, effective_macs) == (900 + 972 + 30 + 40 + 216, 775 + 972 + 30 + 40 + 180)
    assert (stats.params, stats.nonzeros, stats.dense_macs, stats.effective_macs) == (
        params, nonzeros, dense_macs, effective_macs)
    assert stats.sparsity == pytest.approx(9 / 238, abs=1e-12)
    assert stats.size_bytes == 4 * 238
    assert stats.model_params == 238 + 4  # the conv bias is a constant too


def test_symbolic_batch_dimension_counts_as_batch_one():
    symbolic, fixed = model_stats(five_layer_model(batch="N")), model_stats(five_layer_model(batch=1))
    assert symbolic.layers == fixed.layers
    assert symbolic.dense_macs == fixed.dense_macs == 2158


def test_unknown_shapes_give_null_macs_and_the_json_still_validates():
    conv = helper.make_node("Conv", ["x", "w"], ["y"], name="conv")
    stats = model_stats(make_model([conv], {"x": None}, {"w": weight((4, 3, 3, 3))}, {"y": None}))
    (layer,) = stats.layers
    assert (layer.params, layer.dense_macs, layer.effective_macs) == (108, None, None)
    totals = stats.to_json()["totals"]
    assert (totals["dense_macs"], totals["effective_macs"]) == (None, None)


def test_size_bytes_counts_the_dtype_the_weight_is_stored_in():
    stored = weight((3, 10)).astype(np.float16)
    nodes = [helper.make_node("Cast", ["w_half"], ["w_fc"], to=TensorProto.FLOAT),
             helper.make_node("Gemm", ["x", "w_fc"], ["y"], name="fc", transB=1)]
    (layer,) = model_stats(make_model(nodes, {"x": [1, 10]}, {"w_half": stored}, {"y": [1, 3]})).layers
    assert (layer.params, layer.size_bytes, layer.dense_macs) == (30, 60, 30)


# --- detected patterns -------------------------------------------------------------------------

# A Conv with 32 output channels, 16 input channels, 3x3: W[32, 144], two 1x16 blocks of rows.
PATTERN_LAYOUT = WeightLayout("conv", (32, 16, 3, 3))
PATTERN_SHAPE = MatrixShape(32, 9, 16)


def conv_with_matrix(matrix: np.ndarray) -> onnx.ModelProto:
    conv = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])
    return make_model([conv], {"x": [1, 16, 4, 4]}, {"w": PATTERN_LAYOUT.from_matrix(matrix)})


def pruned(spec: str, sparsity: float) -> np.ndarray:
    matrix = np.random.default_rng(5).standard_normal(PATTERN_LAYOUT.matrix_shape).astype(np.float32)
    if spec == "dense":
        return matrix
    if spec == "scattered":
        return np.where(np.random.default_rng(6).random(matrix.shape) < sparsity, 0, matrix).astype(np.float32)
    return np.where(parse_pattern(spec).mask(matrix, PATTERN_SHAPE, sparsity, L1()), matrix, 0).astype(np.float32)


@pytest.mark.parametrize("how,sparsity,detected", [
    ("2:4", 0.5, "2:4"), ("1x16", 0.75, "1x16"), ("kernel", 0.5, "kernel"), ("dense", 0.0, "dense"),
    ("scattered", 0.5, "unstructured"),
])
def test_detected_pattern_names_how_the_weight_was_pruned(how, sparsity, detected):
    matrix = pruned(how, sparsity)
    (layer,) = model_stats(conv_with_matrix(matrix)).layers
    zeros = matrix.size - np.count_nonzero(matrix)
    assert layer.pattern == detected
    assert layer.sparsity == pytest.approx(zeros / matrix.size, abs=1e-12)
    if how not in ("dense", "scattered"):  # pruned by onnxsparse: exactly the asked sparsity, all structural
        assert layer.sparsity == sparsity and layer.pattern_sparsity == pytest.approx(sparsity, abs=1e-12)
    assert layer.effective_macs == 16 * (matrix.size - zeros)  # 4x4 output pixels


# --- JSON --------------------------------------------------------------------------------------


def test_to_json_validates_against_the_stats_schema_and_round_trips_through_json():
    document = model_stats(five_layer_model()).to_json()
    jsonschema.Draft202012Validator(json.loads(STATS_SCHEMA.read_text())).validate(document)
    assert json.loads(json.dumps(document)) == document
    assert document["totals"] == {
        "layers": 5, "params": 238, "nonzeros": 229, "sparsity": 1 - 229 / 238, "dense_macs": 2158,
        "effective_macs": 1997, "size_bytes": 952, "model_params": 242}
    conv = document["layers"][0]
    assert (conv["name"], conv["op_type"], conv["weight_shape"]) == ("conv", "Conv", [4, 1, 3, 3])
    assert (conv["pattern"], conv["dense_macs"], conv["size_bytes"]) == ("unstructured", 900, 144)
