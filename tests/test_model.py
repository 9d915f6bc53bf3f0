"""model.py: the weight view W[O, K], finding weights however they are stored, writing them back
in place, and loading/saving model files."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnxsparse import model
from onnxsparse.errors import OnnxSparseError, UsageError
from onnxsparse.model import WeightLayout

# Per-output-channel quantization of the test conv weight; powers of two keep every weight exact
# in float16 and in int8 (zero points include 0 and nonzero values).
QUANT_SCALE = np.array([0.5, 0.25, 0.125, 0.0625], np.float32)
QUANT_ZERO_POINT = np.array([0, 3, -2, 1], np.int8)
PER_CHANNEL = (slice(None), None, None, None)  # broadcast a per-output-channel vector over W[O, I, kh, kw]
CONV_INPUT = np.random.default_rng(1).standard_normal((1, 3, 5, 5)).astype(np.float32)


def make_model(nodes, inputs: dict, outputs: dict, initializers=(), opset: int = 17, **model_fields):
    """A float model; `inputs` and `outputs` map names to shapes."""
    graph = helper.make_graph(nodes, "test", *(
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in values.items()]
        for values in (inputs, outputs)), list(initializers))
    return helper.make_model_gen_version(graph, opset_imports=[helper.make_opsetid("", opset)], **model_fields)


def run(onnx_model, **feeds) -> list[np.ndarray]:
    onnx.checker.check_model(onnx_model)
    return model.onnxruntime_session(onnx_model).run(None, feeds)


def assert_same_outputs_as_plain_weight(onnx_model, weight: np.ndarray, output_index: int = 0) -> None:
    """Outputs match the model with `weight` as a plain initializer (up to summation order: onnxruntime
    picks another conv kernel when the weight is not a folded constant)."""
    reference = run(conv_model(STORAGES["initializer"], weight), X=CONV_INPUT)[0]
    np.testing.assert_allclose(run(onnx_model, X=CONV_INPUT)[output_index], reference, rtol=1e-5, atol=1e-5)


def random_bits(shape, seed: int = 0) -> np.ndarray:
    """float32 of random bit patterns (NaNs and signed zeros included): round trips must be bitwise."""
    size = int(np.prod(shape))
    return np.random.default_rng(seed).integers(0, 2**32, size, dtype=np.uint32).view(np.float32).reshape(shape)


def conv_weight() -> np.ndarray:
    """W[4, 3, 3, 3] with no zeros, every value (q - zero point) * scale of its output channel."""
    rng = np.random.default_rng(0)
    steps = rng.integers(1, 40, (4, 3, 3, 3)) * rng.choice([-1, 1], (4, 3, 3, 3))
    return (steps * QUANT_SCALE[PER_CHANNEL]).astype(np.float32)


@dataclass(frozen=True)
class Storage:
    """One way exporters store a weight: `to_stored` maps the weight the Conv consumes to the stored
    tensor; `chain` makes the nodes (and side initializers) from the stored tensor to the weight."""

    to_stored: Callable[[np.ndarray], np.ndarray]
    chain: Callable[[str, str], tuple[list, list]] | None = None
    as_constant_node: bool = False


def _one_node(op_type, *side_inputs, **attrs):
    def chain(stored, out):
        names = [f"{out}_{i}" for i in range(len(side_inputs))]
        inits = [numpy_helper.from_array(value, name) for value, name in zip(side_inputs, names)]
        return [helper.make_node(op_type, [stored, *names], [out], **attrs)], inits
    return chain


def _quantize(weight):
    return (np.rint(weight / QUANT_SCALE[PER_CHANNEL]) + QUANT_ZERO_POINT[PER_CHANNEL]).astype(np.int8)


STORAGES = {
    "initializer": Storage(lambda w: w),
    "constant": Storage(lambda w: w, as_constant_node=True),
    "identity": Storage(lambda w: w, _one_node("Identity")),
    "cast": Storage(lambda w: w.astype(np.float16), _one_node("Cast", to=TensorProto.FLOAT)),
    "reshape": Storage(lambda w: w.reshape(4, 27), _one_node("Reshape", np.array([4, 3, 3, 3], np.int64))),
    "transpose": Storage(lambda w: w.transpose(2, 3, 1, 0), _one_node("Transpose", perm=[3, 2, 0, 1])),
    "dequantize": Storage(_quantize, _one_node("DequantizeLinear", QUANT_SCALE, QUANT_ZERO_POINT, axis=0)),
}


def stored_weight(storage: Storage, weight: np.ndarray, out: str = "W") -> tuple[list, list]:
    """Nodes and initializers that produce the Conv weight `out` stored the way `storage` says."""
    stored = storage.to_stored(weight)
    stored_name = out if storage.chain is None else f"{out}_stored"
    if storage.as_constant_node:
        nodes, inits = [helper.make_node("Constant", [], [stored_name], value=numpy_helper.from_array(stored))], []
    else:
        nodes, inits = [], [numpy_helper.from_array(stored, stored_name)]
    if storage.chain is not None:
        chain_nodes, side_inits = storage.chain(stored_name, out)
        nodes, inits = nodes + chain_nodes, inits + side_inits
    return nodes, inits


def conv_model(storage: Storage, weight: np.ndarray, consumers: int = 1) -> onnx.ModelProto:
    """X[1, I, 5, 5] -> Conv 3x3 pad 1 -> Y0 (and Y1, ... for more Convs sharing the weight `W`)."""
    nodes, inits = stored_weight(storage, weight)
    outputs = {f"Y{n}": [1, weight.shape[0], 5, 5] for n in range(consumers)}
    nodes += [helper.make_node("Conv", ["X", "W"], [out], name=f"conv{n}", pads=[1, 1, 1, 1])
              for n, out in enumerate(outputs)]
    return make_model(nodes, {"X": [1, weight.shape[1], 5, 5]}, outputs, inits)


def stored_protos(onnx_model) -> dict[str, onnx.TensorProto]:
    """Every initializer and Constant node value, by name."""
    tensors = {init.name: init for init in onnx_model.graph.initializer}
    tensors.update({node.output[0]: attr.t for node in onnx_model.graph.node if node.op_type == "Constant"
                    for attr in node.attribute if attr.name == "value"})
    return tensors


def stored_tensors(onnx_model) -> dict[str, tuple]:
    """Every stored tensor by name as (ONNX dtype, dims, bytes)."""
    return {name: (t.data_type, tuple(t.dims), numpy_helper.to_array(t).tobytes())
            for name, t in stored_protos(onnx_model).items()}


def reference_matrix(kind: str, weight: np.ndarray, groups: int = 1) -> np.ndarray:
    """W[O, K] element by element. conv W[O, I/g, *k]: row o. conv_transpose W[I, O/g, *k]: row
    j*(O/g)+o for group j. Column: kernel position * I/g + input channel within the group."""
    first, second, *kernel = weight.shape
    out_channels, in_per_group = (first, second) if kind == "conv" else (second * groups, first // groups)
    matrix = np.empty((out_channels, int(np.prod(kernel)) * in_per_group), weight.dtype)
    for a, b, *k in np.ndindex(weight.shape):
        group, i = divmod(a, in_per_group)
        row, channel = (a, b) if kind == "conv" else (group * second + b, i)
        matrix[row, np.ravel_multi_index(k, kernel) * in_per_group + channel] = weight[(a, b, *k)]
    return matrix


def assert_round_trip_bitwise(layout: WeightLayout, weight: np.ndarray, expected_matrix: np.ndarray) -> None:
    matrix = layout.to_matrix(weight)
    assert matrix.shape == layout.matrix_shape
    np.testing.assert_array_equal(matrix.view(np.uint32), expected_matrix.view(np.uint32))
    np.testing.assert_array_equal(layout.from_matrix(matrix).view(np.uint32), weight.view(np.uint32))


# --- WeightLayout ------------------------------------------------------------------------------


def test_conv_2d_matrix_runs_kernel_position_then_input_channel_along_k():
    weight = np.arange(4 * 3 * 2 * 5, dtype=np.float32).reshape(4, 3, 2, 5)
    matrix = WeightLayout("conv", weight.shape).to_matrix(weight)
    assert matrix.shape == (4, 2 * 5 * 3)
    kw, in_per_group = 5, 3
    for o, i, y, x in [(0, 0, 0, 0), (1, 2, 0, 3), (3, 1, 1, 4), (2, 0, 1, 0)]:
        assert matrix[o, (y * kw + x) * in_per_group + i] == weight[o, i, y, x]


@settings(max_examples=100, deadline=None)
@given(kind=st.sampled_from(["conv", "conv_transpose"]), groups=st.integers(1, 3), out_per_group=st.integers(1, 3),
       in_per_group=st.integers(1, 4), kernel=st.lists(st.integers(1, 3), min_size=1, max_size=3),
       seed=st.integers(0, 2**16))
def test_conv_layouts_round_trip_bitwise_in_kernel_position_then_channel_order(kind, groups, out_per_group,
                                                                               in_per_group, kernel, seed):
    leading = (groups * out_per_group, in_per_group) if kind == "conv" else (groups * in_per_group, out_per_group)
    weight = random_bits((*leading, *kernel), seed)
    layout = WeightLayout(kind, weight.shape, groups)
    assert (layout.out_channels, layout.strip_length) == (groups * out_per_group, in_per_group)
    assert_round_trip_bitwise(layout, weight, reference_matrix(kind, weight, groups))


@pytest.mark.parametrize("weight_shape,groups", [((4, 3, 3), 1), ((2, 2, 2, 3, 2), 1), ((6, 2, 3, 3), 3),
                                                 ((8, 1, 3, 3), 8)], ids=["1d", "3d", "grouped", "depthwise"])
def test_conv_layout_of_1d_3d_grouped_and_depthwise_weights(weight_shape, groups):
    weight = random_bits(weight_shape)
    layout = WeightLayout("conv", weight_shape, groups)
    assert (layout.out_channels, layout.strip_length, layout.in_channels) == (
        weight_shape[0], weight_shape[1], weight_shape[1] * groups)
    assert_round_trip_bitwise(layout, weight, reference_matrix("conv", weight, groups))


@pytest.mark.parametrize("groups", [1, 2])
def test_conv_transpose_row_is_group_output_channel_and_column_is_position_then_group_input(groups):
    weight = np.arange(4 * 3 * 2 * 2, dtype=np.float32).reshape(4, 3, 2, 2)  # W[I=4, O/g=3, 2, 2]
    layout = WeightLayout("conv_transpose", weight.shape, groups)
    matrix = layout.to_matrix(weight)
    in_per_group = 4 // groups
    assert matrix.shape == (3 * groups, 4 * in_per_group)
    for c, o, y, x in [(0, 0, 0, 0), (1, 2, 1, 0), (3, 1, 0, 1), (2, 2, 1, 1)]:
        group, i = divmod(c, in_per_group)
        assert matrix[group * 3 + o, (y * 2 + x) * in_per_group + i] == weight[c, o, y, x]
    assert_round_trip_bitwise(layout, weight, reference_matrix("conv_transpose", weight, groups))


MATRIX_CASES = {  # op, attributes, constant input index, stored weight [.., ..], weight -> W[O, K]
    "gemm_transB0": ("Gemm", {}, 1, (6, 3), lambda w: w.T),
    "gemm_transB1": ("Gemm", {"transB": 1}, 1, (3, 6), lambda w: w),
    "gemm_const_A": ("Gemm", {}, 0, (3, 6), lambda w: w),
    "gemm_const_A_transA": ("Gemm", {"transA": 1}, 0, (6, 3), lambda w: w.T),
    "matmul_right": ("MatMul", {}, 1, (6, 3), lambda w: w.T),
    "matmul_left": ("MatMul", {}, 0, (3, 6), lambda w: w),
}


@pytest.mark.parametrize("case", MATRIX_CASES)
def test_gemm_and_matmul_weights_read_as_output_features_by_input_features(case):
    op_type, attrs, weight_index, weight_shape, to_matrix = MATRIX_CASES[case]
    weight, expected_matrix = random_bits(weight_shape), to_matrix(random_bits(weight_shape))
    inputs, shapes = (["X", "W"], ([2, 6], [2, 3])) if weight_index == 1 else (["W", "X"], ([6, 2], [3, 2]))
    onnx_model = make_model([helper.make_node(op_type, inputs, ["Y"], **attrs)], {"X": shapes[0]},
                            {"Y": shapes[1]}, [numpy_helper.from_array(weight, "W")])
    (ref,) = model.find_weights(onnx_model)
    assert (ref.input_index, ref.tensor_name, ref.data_input) == (weight_index, "W", "X")
    assert ref.layout.matrix_shape == (3, 6) and ref.layout.kernel_positions == 1
    assert_round_trip_bitwise(ref.layout, weight, expected_matrix)
    np.testing.assert_array_equal(model.read_matrix(onnx_model, ref).view(np.uint32),
                                  expected_matrix.view(np.uint32))


# --- find_weights ------------------------------------------------------------------------------


@pytest.mark.parametrize("storage_name", STORAGES)
def test_find_weights_resolves_every_storage_kind_to_the_consumed_weight(storage_name):
    weight = conv_weight()
    onnx_model = conv_model(STORAGES[storage_name], weight)
    (ref,) = model.find_weights(onnx_model)
    assert (ref.node_name, ref.op_type, ref.input_index, ref.tensor_name) == ("conv0", "Conv", 1, "W")
    assert ref.source.kind == ("constant" if storage_name == "constant" else "initializer")
    assert ref.dtype == np.float32
    assert ref.storage_dtype == STORAGES[storage_name].to_stored(weight).dtype
    assert ref.quantized == (storage_name == "dequantize")
    assert ref.layout == WeightLayout("conv", (4, 3, 3, 3), 1)
    np.testing.assert_array_equal(model.read_matrix(onnx_model, ref), reference_matrix("conv", weight))


def test_find_weights_ignores_matmul_of_two_activations_and_conv_with_weight_as_graph_input():
    matmul = make_model([helper.make_node("MatMul", ["A", "B"], ["Y"])], {"A": [2, 3], "B": [3, 4]}, {"Y": [2, 4]})
    conv = make_model([helper.make_node("Conv", ["X", "W"], ["Y"])], {"X": [1, 3, 5, 5], "W": [4, 3, 3, 3]},
                      {"Y": [1, 4, 3, 3]})
    assert model.find_weights(matmul) == [] and model.find_weights(conv) == []


# --- read_matrix / write_matrix ----------------------------------------------------------------


@pytest.mark.parametrize("storage_name", STORAGES)
def test_writing_back_the_unchanged_matrix_leaves_every_stored_tensor_bitwise_identical(storage_name):
    onnx_model = conv_model(STORAGES[storage_name], conv_weight())
    before, outputs_before = stored_tensors(onnx_model), run(onnx_model, X=CONV_INPUT)
    (ref,) = model.find_weights(onnx_model)
    model.write_matrix(onnx_model, ref, model.read_matrix(onnx_model, ref))
    assert stored_tensors(onnx_model) == before
    np.testing.assert_array_equal(run(onnx_model, X=CONV_INPUT)[0], outputs_before[0])


def masked(weight: np.ndarray) -> np.ndarray:
    """The weight with every third element (in ONNX order) zeroed."""
    flat = weight.copy().reshape(-1)
    flat[::3] = 0
    return flat.reshape(weight.shape)


@pytest.mark.parametrize("storage_name", STORAGES)
def test_writing_a_masked_matrix_stores_exact_zeros_in_the_storage_dtype(storage_name):
    storage, weight = STORAGES[storage_name], conv_weight()
    onnx_model = conv_model(storage, weight)
    (ref,) = model.find_weights(onnx_model)
    model.write_matrix(onnx_model, ref, ref.layout.to_matrix(masked(weight)))
    stored_name = "W" if storage.chain is None else "W_stored"
    stored = numpy_helper.to_array(stored_protos(onnx_model)[stored_name])
    expected = storage.to_stored(masked(weight))
    assert stored.dtype == expected.dtype
    np.testing.assert_array_equal(stored, expected)
    if storage_name == "dequantize":  # masked weights hold exactly their channel's zero point
        is_masked = masked(weight) == 0
        zero_points = np.broadcast_to(QUANT_ZERO_POINT[PER_CHANNEL], stored.shape)
        np.testing.assert_array_equal(stored[is_masked], zero_points[is_masked])
    assert_same_outputs_as_plain_weight(onnx_model, masked(weight))


@pytest.mark.parametrize("storage_name", STORAGES)
def test_writing_a_shared_weight_gives_that_node_its_own_initializer_and_leaves_the_other(storage_name):
    storage, weight = STORAGES[storage_name], conv_weight()
    onnx_model = conv_model(storage, weight, consumers=2)
    before, outputs_before = stored_tensors(onnx_model), run(onnx_model, X=CONV_INPUT)
    first, _ = model.find_weights(onnx_model)
    model.write_matrix(onnx_model, first, first.layout.to_matrix(masked(weight)))
    conv0, conv1 = (node for node in onnx_model.graph.node if node.op_type == "Conv")
    assert conv1.input[1] == "W" and conv0.input[1] not in before and conv0.input[1] != "W"
    assert {name: stored_tensors(onnx_model)[name] for name in before} == before
    np.testing.assert_array_equal(numpy_helper.to_array(stored_protos(onnx_model)[conv0.input[1]]), masked(weight))
    assert_same_outputs_as_plain_weight(onnx_model, masked(weight))
    np.testing.assert_array_equal(run(onnx_model, X=CONV_INPUT)[1], outputs_before[1])


# --- load_model / save_model -------------------------------------------------------------------


VALID_MODEL_BYTES = conv_model(STORAGES["initializer"], conv_weight()).SerializeToString()


@pytest.mark.parametrize("content", [np.random.default_rng(3).bytes(300), b"name,value\nconv,3\n",
                                     VALID_MODEL_BYTES[: len(VALID_MODEL_BYTES) // 2]],
                         ids=["random_bytes", "text", "truncated_model"])
def test_load_model_rejects_a_file_that_is_not_a_whole_onnx_model_naming_the_path(tmp_path, content):
    path = tmp_path / "not_a_model.onnx"
    path.write_bytes(content)
    with pytest.raises(OnnxSparseError, match="not_a_model.onnx") as raised:
        model.load_model(path)
    assert "\n" not in str(raised.value) and not isinstance(raised.value, UsageError)


def test_load_model_of_a_missing_file_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="missing.onnx"):
        model.load_model(tmp_path / "missing.onnx")


def test_load_model_upgrades_opset_9_ir_3_model_with_initializers_as_inputs(tmp_path):
    rng = np.random.default_rng(4)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "B"),
             numpy_helper.from_array(rng.standard_normal((2, 64)).astype(np.float32), "F"),
             numpy_helper.from_array(rng.standard_normal(2).astype(np.float32), "C")]
    nodes = [helper.make_node("Conv", ["X", "W", "B"], ["conv_out"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["conv_out"], ["relu_out"], name="relu"),
             helper.make_node("Flatten", ["relu_out"], ["flat"], name="flatten"),
             helper.make_node("Gemm", ["flat", "F", "C"], ["Y"], name="fc", transB=1)]
    inputs = {"X": [1, 3, 4, 4], **{init.name: list(init.dims) for init in inits}}  # IR 3: weights are inputs
    old = make_model(nodes, inputs, {"Y": [1, 2]}, inits, opset=9, ir_version=3)
    onnx.save_model(old, str(tmp_path / "old.onnx"))
    features = rng.standard_normal((1, 3, 4, 4)).astype(np.float32)
    upgraded = model.load_model(tmp_path / "old.onnx")
    assert model.default_opset(upgraded) >= model.MIN_OPSET and upgraded.ir_version >= 4
    assert [inp.name for inp in upgraded.graph.input] == ["X"]
    assert [node.name for node in upgraded.graph.node] == ["conv", "relu", "flatten", "fc"]
    np.testing.assert_allclose(run(upgraded, X=features)[0], run(old, X=features)[0], rtol=1e-6)


@pytest.mark.parametrize("previous", [None, b"the previous model"], ids=["new_file", "existing_file"])
def test_save_model_failing_midway_leaves_the_target_untouched_and_no_temp_files(tmp_path, monkeypatch, previous):
    onnx_model, target = conv_model(STORAGES["initializer"], conv_weight()), tmp_path / "model.onnx"
    if previous is not None:
        target.write_bytes(previous)

    def write_half_then_fail(proto, path, *args, **kwargs):
        with open(path, "wb") as file:
            file.write(proto.SerializeToString()[:100])
        raise OSError("disk full")

    monkeypatch.setattr(onnx, "save_model", write_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        model.save_model(onnx_model, target)
    assert os.listdir(tmp_path) == ([] if previous is None else ["model.onnx"])
    if previous is not None:
        assert target.read_bytes() == previous


def test_save_model_writes_beside_the_target_then_renames_it_into_place(tmp_path, monkeypatch):
    onnx_model, target = conv_model(STORAGES["initializer"], conv_weight()), tmp_path / "model.onnx"
    calls, real_save, real_replace = [], onnx.save_model, os.replace

    def recording_save(proto, path, **kwargs):
        calls.append(("save", str(path)))
        real_save(proto, path, **kwargs)

    def recording_replace(source, destination):
        calls.append(("rename", str(source), str(destination)))
        real_replace(source, destination)

    monkeypatch.setattr(onnx, "save_model", recording_save)
    monkeypatch.setattr(os, "replace", recording_replace)
    model.save_model(onnx_model, target)
    (_, staged), rename = calls
    assert rename == ("rename", staged, str(target)) and staged != str(target)
    assert Path(staged).is_relative_to(tmp_path)  # same file system, so the rename is atomic
    assert os.listdir(tmp_path) == ["model.onnx"]
    assert stored_tensors(model.load_model(tmp_path / "model.onnx")) == stored_tensors(onnx_model)


def test_save_model_past_the_threshold_writes_external_data_that_loads_back_equal(tmp_path, monkeypatch):
    monkeypatch.setattr(model, "EXTERNAL_DATA_THRESHOLD_BYTES", 100)
    weight = np.random.default_rng(2).standard_normal((16, 8, 3, 3)).astype(np.float32)  # 4608 bytes
    onnx_model = conv_model(STORAGES["initializer"], weight)
    expected = stored_tensors(onnx_model)
    model.save_model(onnx_model, tmp_path / "big.onnx")
    assert sorted(os.listdir(tmp_path)) == ["big.onnx", "big.onnx.data"]
    assert (tmp_path / "big.onnx.data").stat().st_size >= 16 * 8 * 9 * 4
    assert (tmp_path / "big.onnx").stat().st_size < 16 * 8 * 9 * 4
    assert stored_tensors(model.load_model(tmp_path / "big.onnx")) == expected
    assert stored_tensors(onnx_model) == expected  # the in-memory model keeps its weights


def test_check_model_past_the_protobuf_limit_checks_structure_without_the_bytes(monkeypatch):
    big = make_model([helper.make_node("Conv", ["X", "W"], ["Y"])], {"X": [1, 3, 5, 5]}, {"Y": [1, 4, 3, 3]},
                     [numpy_helper.from_array(conv_weight(), "W")])
    monkeypatch.setattr(model, "EXTERNAL_DATA_THRESHOLD_BYTES", 16)
    model.check_model(big)  # passes on structure
    assert numpy_helper.to_array(big.graph.initializer[0]).shape == (4, 3, 3, 3)  # caller's model untouched
    big.graph.node[0].input[1] = "missing"
    with pytest.raises(onnx.checker.ValidationError):
        model.check_model(big)
