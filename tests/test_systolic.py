"""The systolic-array reference executor: SCALE-Sim's dense cycle formulas, outputs bit-exact with
the integer reference for every dataflow and PE option, the MCBBS PE's NZ/R cycles, the report
formats, and one-line errors for bad input."""

from __future__ import annotations

import json
import math

import jsonschema
import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnxsparse
from onnxsparse.cli import main
from onnxsparse.errors import OnnxSparseError, UsageError
from onnxsparse.formats.pack import pack_model
from onnxsparse.quant.quantize import QuantizeOptions, quantize_model
from onnxsparse.quant.reference import ReferenceExecutor
from onnxsparse.systolic.array import ArrayConfig, array_config, parse_pe
from onnxsparse.systolic.cycles import dense_compute_cycles, fold_grid, mapping_efficiency
from onnxsparse.systolic.executor import SystolicExecutor, simulate
from onnxsparse.systolic.layers import integer_form
from conftest import DIGITS_TRAIN, REPO

DATAFLOWS = ("ws", "os", "is")
# (pruning pattern, sparsity) -> the PE options its zeros satisfy (dense always does)
PRUNED_PES = [
    (None, None, ("dense", "mcbbs:c2r4p8")),
    ("mcbbs:c2r4", 0.75, ("dense", "mcbbs:c2r4p8", "mcbbs:c2r4")),
    ("2:4", None, ("dense", "nm:2:4")),
    ("1x16", 0.5, ("dense", "block:16")),
]


def digits_inputs(digits_test, count: int = 8) -> dict:
    return {"input": digits_test.inputs[:count]}


def quantized_digits(model, pattern=None, sparsity=None, fixed_point=False, integer=False) -> onnx.ModelProto:
    source = model if pattern is None else onnxsparse.prune(model, pattern, sparsity)
    return quantize_model(source, DIGITS_TRAIN, QuantizeOptions(fixed_point=fixed_point, integer=integer)).model


def reference_outputs(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    return ReferenceExecutor(integer_form(model)).run(feeds)


# ---------------------------------------------------------------------------------------------
# cycle formulas
# ---------------------------------------------------------------------------------------------


def test_dense_cycles_follow_the_scalesim_formulas_per_dataflow():
    # P=10 output pixels, Wn=8 reduction, K=6 filters on a 4x4 array
    assert dense_compute_cycles("ws", 4, 4, 10, 8, 6) == 2 * 2 * (2 * 4 + 4 + 10 - 2) - 1
    assert dense_compute_cycles("os", 4, 4, 10, 8, 6) == 3 * 2 * (4 + 4 + 8 - 2) - 1
    assert dense_compute_cycles("is", 4, 4, 10, 8, 6) == 2 * 3 * (2 * 4 + 4 + 6 - 2) - 1
    assert mapping_efficiency("ws", 4, 4, 10, 8, 6) == pytest.approx(8 * 6 / (8 * 8))
    assert mapping_efficiency("os", 4, 4, 10, 8, 6) == pytest.approx(10 * 6 / (12 * 8))
    assert mapping_efficiency("is", 4, 4, 10, 8, 6) == pytest.approx(8 * 10 / (8 * 12))


def test_a_resnet_layer_on_32x32_matches_the_formula():
    # ResNet-50 conv2_x 3x3: 56x56 outputs, 3*3*64 reduction, 64 filters
    assert dense_compute_cycles("ws", 32, 32, 3136, 576, 64) == math.ceil(576 / 32) * 2 * (64 + 32 + 3136 - 2) - 1
    assert dense_compute_cycles("os", 32, 32, 3136, 576, 64) == 98 * 2 * (32 + 32 + 576 - 2) - 1
    assert fold_grid("os", 32, 32, 3136, 576, 64).folds == 196


# ---------------------------------------------------------------------------------------------
# values: bit-exact with the integer reference
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_variants(digits_model):
    """Quantized digits models by (pattern, fixed point): QDQ."""
    return {(pattern, fixed): quantized_digits(digits_model, pattern, sparsity, fixed_point=fixed)
            for pattern, sparsity, _ in PRUNED_PES for fixed in (False, True)}


@pytest.mark.parametrize("fixed_point", [False, True], ids=["general-scales", "fixed-point"])
@pytest.mark.parametrize("pattern,sparsity,pe_options", PRUNED_PES, ids=[str(p[0]) for p in PRUNED_PES])
def test_outputs_equal_the_integer_reference_for_every_dataflow_and_pe(digits_variants, digits_test, pattern,
                                                                      sparsity, pe_options, fixed_point):
    model = digits_variants[(pattern, fixed_point)]
    feeds = digits_inputs(digits_test)
    expected = reference_outputs(model, feeds)
    for pe in pe_options:
        for dataflow in DATAFLOWS:
            report = simulate(model, array_config("8x8", dataflow, pe), feeds)
            assert all(np.array_equal(ours, theirs) for ours, theirs in zip(report.outputs.values(), expected)), \
                (pe, dataflow)


def test_integer_form_and_packed_models_give_the_same_outputs(digits_model, digits_variants, digits_test):
    feeds = digits_inputs(digits_test)
    qdq = digits_variants[("mcbbs:c2r4", True)]
    expected = simulate(qdq, array_config("16x16", "ws", "mcbbs:c2r4p8"), feeds).outputs["logits"]
    integer = quantized_digits(digits_model, "mcbbs:c2r4", 0.75, fixed_point=True, integer=True)
    packed = pack_model(qdq).model
    for variant in (integer, packed):
        report = simulate(variant, array_config("16x16", "ws", "mcbbs:c2r4p8"), feeds)
        assert np.array_equal(report.outputs["logits"], expected)


def test_outputs_are_within_one_unit_of_onnxruntime(digits_variants, digits_test):
    """Against onnxruntime running the QDQ model unfused (float arithmetic on the quantization grid)."""
    qdq = digits_variants[(None, False)]
    feeds = digits_inputs(digits_test, 64)
    ours = simulate(qdq, array_config("32x32", "os"), feeds).outputs["logits"]
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    theirs = ort.InferenceSession(qdq.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(
        None, feeds)[0]
    last_scale = float(onnx.numpy_helper.to_array(next(
        init for init in qdq.graph.initializer
        if init.name == [n for n in qdq.graph.node if n.op_type == "DequantizeLinear"][-1].input[1])))
    assert np.abs(ours - theirs).max() <= last_scale * 1.001


# ---------------------------------------------------------------------------------------------
# sparse PEs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.75])
@pytest.mark.parametrize("dataflow", ["ws", "os"])
def test_mcbbs_pruned_layers_take_nz_of_r_reduction_cycles(digits_model, digits_test, sparsity, dataflow):
    model = quantized_digits(digits_model, "mcbbs:c2r4", sparsity, fixed_point=True)
    config = array_config("8x8", dataflow, "mcbbs:c2r4")
    report = simulate(model, config, digits_inputs(digits_test, 2))
    kept = math.ceil((1 - sparsity) * 4)
    sparse_layers = [layer for layer in report.layers if layer.sparse]
    assert sparse_layers and all(layer.kept_per_domain == kept for layer in sparse_layers)
    assert not report.layers[0].sparse  # the first conv stays dense
    for layer in sparse_layers:
        ranges = layer.reduction_length // 8  # strips are multiples of R*C = 8 here
        dense_steps, sparse_steps = ranges * 4, ranges * kept
        assert layer.dense_cycles == dense_compute_cycles(dataflow, 8, 8, layer.output_pixels, dense_steps,
                                                          layer.filters)
        assert layer.compute_cycles == dense_compute_cycles(dataflow, 8, 8, layer.output_pixels, sparse_steps,
                                                            layer.filters)
    assert report.totals.speedup > 1


def test_sparse_weights_cost_fewer_dram_bytes_with_their_index_bits(digits_model, digits_test):
    model = quantized_digits(digits_model, "mcbbs:c2r4", 0.75, fixed_point=True)
    dense = simulate(model, array_config("8x8", "os"), digits_inputs(digits_test, 2))
    sparse = simulate(model, array_config("8x8", "os", "mcbbs:c2r4"), digits_inputs(digits_test, 2))
    for a, b in zip(dense.layers, sparse.layers):
        if b.sparse:  # values: a quarter of the clusters; index: 4 bits per kept cluster; biases 4 bytes
            out_channels = b.filters * b.groups
            ranges = b.reduction_length // 8
            assert b.dram_filter_bytes == out_channels * ranges * 2 + out_channels * ranges * 4 // 8 + 4 * out_channels
            assert b.dram_filter_bytes < a.dram_filter_bytes


def test_a_pe_option_the_zeros_do_not_fit_is_a_usage_error_naming_the_layer(digits_variants):
    with pytest.raises(UsageError, match=r"layer /conv2/Conv: its zeros .* do not fit the nm:2:4 PE"):
        SystolicExecutor(digits_variants[("mcbbs:c2r4", False)], array_config("8x8", "ws", "nm:2:4"))


def test_a_dense_model_runs_dense_on_a_sparse_pe(digits_variants, digits_test):
    report = simulate(digits_variants[(None, False)], array_config("8x8", "os", "block:16"), digits_inputs(digits_test))
    assert not any(layer.sparse for layer in report.layers)
    assert report.totals.speedup == 1


# ---------------------------------------------------------------------------------------------
# report, CLI and errors
# ---------------------------------------------------------------------------------------------


def test_memory_model_counts_reads_writes_and_stalls(digits_variants, digits_test):
    feeds = digits_inputs(digits_test)
    roomy = simulate(digits_variants[(None, False)], array_config("8x8", "ws"), feeds)
    starved = simulate(digits_variants[(None, False)],
                       array_config("8x8", "ws", sram="0.25,0.25,0.25", dram_bytes_per_cycle=0.5), feeds)
    for layer in roomy.layers:
        if layer.kind == "mac":
            grid = fold_grid("ws", 8, 8, layer.output_pixels, layer.reduction_length, layer.filters)
            assert layer.sram_filter_reads == layer.reduction_length * layer.filters
            assert layer.sram_ifmap_reads == layer.output_pixels * layer.reduction_length * grid.col_folds
            assert layer.sram_ofmap_writes == layer.output_pixels * layer.filters * grid.row_folds
    assert roomy.totals.stall_cycles < starved.totals.stall_cycles
    assert roomy.totals.dram_bytes < starved.totals.dram_bytes


def test_cli_simulate_writes_json_csv_and_plot(tmp_path, digits_variants, digits_test):
    model_path, input_path = tmp_path / "int8.onnx", tmp_path / "x.npy"
    onnxsparse.save_model(digits_variants[("mcbbs:c2r4", True)], model_path)
    np.save(input_path, digits_test.inputs[:2])
    csv_path, plot_path = tmp_path / "layers.csv", tmp_path / "cycles.png"
    result = main(["simulate", str(model_path), "--input", str(input_path), "--array", "16x16", "--dataflow", "os",
                   "--pe", "mcbbs:c2r4p8", "--csv", str(csv_path), "--plot", str(plot_path)])
    assert result == 0
    assert csv_path.read_text().splitlines()[0].startswith("index,name,op_type")
    assert plot_path.read_bytes()[:4] == b"\x89PNG"


def test_cli_json_follows_its_schema(tmp_path, digits_variants, capsys):
    model_path = tmp_path / "int8.onnx"
    onnxsparse.save_model(digits_variants[(None, False)], model_path)
    assert main(["simulate", str(model_path), "--random", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    schema = json.loads((REPO / "schemas" / "simulate-report.schema.json").read_text())
    jsonschema.validate(document, schema)
    assert document["totals"]["compute_cycles"] == sum(layer["compute_cycles"] for layer in document["layers"])


@pytest.mark.parametrize("arguments,status,message", [
    (["--array", "0x8"], 2, "rows and columns must be in"),
    (["--array", "100000x8"], 2, "rows and columns must be in"),
    (["--array", "8by8"], 2, "give ROWSxCOLUMNS"),
    (["--pe", "mcbbs:c2"], 2, "unknown PE option"),
    (["--sram", "1,2"], 2, "three sizes in KB"),
    (["--dram-bw", "-1"], 2, "DRAM bandwidth"),
    (["--pe", "nm:2:4"], 2, "do not fit the nm:2:4 PE"),
])
def test_bad_options_are_one_line_usage_errors(tmp_path, digits_variants, capsys, arguments, status, message):
    model_path = tmp_path / "int8.onnx"
    onnxsparse.save_model(digits_variants[("mcbbs:c2r4", False)], model_path)
    assert main(["simulate", str(model_path), "--random", *arguments]) == status
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1 and "Traceback" not in error


def test_a_float_model_is_refused_with_the_quantize_command(capsys):
    assert main(["simulate", str(REPO / "samples" / "digits" / "digits_cnn.onnx"), "--random"]) == 2
    assert "quantize it first: onnxsparse quantize" in capsys.readouterr().err


def test_an_unsupported_op_is_named(digits_variants):
    integer = integer_form(digits_variants[(None, False)])
    pool = next(node for node in integer.graph.node if node.op_type == "MaxPool")
    pool.op_type = "LpPool"
    with pytest.raises(OnnxSparseError, match=r"node /pool/MaxPool \(LpPool\): not supported by the systolic"):
        SystolicExecutor(integer, ArrayConfig())


def test_parse_pe_round_trips_its_spec():
    for spec in ("dense", "mcbbs:c2r4p8", "nm:2:4", "block:16"):
        assert parse_pe(spec).spec == spec
    assert parse_pe("mcbbs:c2r4").macs_per_cycle == 2 and parse_pe("mcbbs:c2r4p8").macs_per_cycle == 16


# ---------------------------------------------------------------------------------------------
# zoo models: a prefix of each (ten convs, with its pools, adds and concats) at a small input
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def zoo_prefixes(zoo_path, tmp_path_factory):
    cache = {}

    def prefix(name: str) -> onnx.ModelProto:
        if name not in cache:
            model = onnxsparse.load_model(zoo_path(name))
            convs = [node for node in model.graph.node if node.op_type == "Conv"]
            consumers = {tensor: node for node in model.graph.node for tensor in node.input}
            end = convs[min(9, len(convs) - 1)].output[0]
            if end in consumers and consumers[end].op_type in ("BatchNormalization", "Relu"):
                end = consumers[end].output[0]
            folder = tmp_path_factory.mktemp(name)
            onnxsparse.save_model(model, folder / "model.onnx")
            onnx.utils.extract_model(str(folder / "model.onnx"), str(folder / "prefix.onnx"),
                                     [model.graph.input[0].name], [end])
            cut = onnxsparse.load_model(folder / "prefix.onnx")
            for dim in list(cut.graph.input[0].type.tensor_type.shape.dim)[2:]:
                dim.dim_param = "size"
            for output in cut.graph.output:
                for position, dim in enumerate(output.type.tensor_type.shape.dim):
                    dim.dim_param = f"out{position}"
            del cut.graph.value_info[:]
            cache[name] = cut
        return cache[name]
    return prefix


@pytest.mark.zoo
@pytest.mark.parametrize("pattern,pe", [(None, "dense"), ("mcbbs:c2r4", "mcbbs:c2r4p8"), ("2:4", "nm:2:4"),
                                        ("1x16", "block:16")])
def test_zoo_models_are_bit_exact_for_every_dataflow(zoo_prefixes, zoo_name, pattern, pe):
    model = zoo_prefixes(zoo_name)
    name = model.graph.input[0].name
    rng = np.random.default_rng(0)
    calibration = [{name: rng.standard_normal((3, 40, 40)).astype(np.float32)} for _ in range(2)]
    source = model if pattern is None else onnxsparse.prune(model, pattern, None if pattern == "2:4" else 0.5)
    quantized = quantize_model(source, calibration, QuantizeOptions(fixed_point=pattern == "mcbbs:c2r4")).model
    feeds = {name: rng.standard_normal((1, 3, 40, 40)).astype(np.float32)}
    expected = reference_outputs(quantized, feeds)
    for dataflow in DATAFLOWS:
        report = simulate(quantized, array_config("16x16", dataflow, pe), feeds)
        assert all(np.array_equal(ours, theirs) for ours, theirs in zip(report.outputs.values(), expected)), dataflow
        if pattern is not None and dataflow != "is":
            assert report.totals.sparse_layers > 0
