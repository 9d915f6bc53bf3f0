"""export-reference: the FPL 2021 flow's hardware bundle (trace, parameters, reference in/out),
validated by its JSON schemas and consistent with the integer reference executor."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest
import yaml
from onnx import numpy_helper

import onnxsparse
from onnxsparse.cli import main
from onnxsparse.quant.quantize import QuantizeOptions, quantize_model
from onnxsparse.quant.reference import ReferenceExecutor
from onnxsparse.systolic.export import export_reference, fraction_bits
from onnxsparse.systolic.layers import integer_form
from conftest import DIGITS_TRAIN, REPO


def schema(name: str) -> dict:
    return json.loads((REPO / "schemas" / f"{name}.schema.json").read_text())


@pytest.fixture(scope="module")
def mcbbs_fixed_point(digits_model):
    pruned = onnxsparse.prune(digits_model, "mcbbs:c2r4", 0.5)
    return quantize_model(pruned, DIGITS_TRAIN, QuantizeOptions(fixed_point=True)).model


@pytest.fixture(scope="module")
def bundle(mcbbs_fixed_point, digits_test, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("reference")
    feeds = {"input": digits_test.inputs[:2]}
    export_reference(mcbbs_fixed_point, out_dir, "digits", feeds)
    return (yaml.safe_load((out_dir / "digits_trace.yaml").read_text()),
            np.load(out_dir / "digits_parameters.npz"),
            yaml.safe_load((out_dir / "digits_inout.yaml").read_text()), feeds)


def test_trace_and_inout_follow_their_schemas(bundle):
    trace, _, inout, _ = bundle
    jsonschema.validate(trace, schema("reference-trace"))
    jsonschema.validate(inout, schema("reference-inout"))


def test_trace_records_fraction_bits_sparsity_cluster_and_range(bundle):
    trace, _, _, _ = bundle
    convs = [layer for layer in trace["layers"] if layer["type"] == "conv"]
    assert convs[0]["pattern"] == "dense" and convs[0]["producers"] == ["input"]
    pruned = convs[1]
    assert (pruned["cluster_size"], pruned["pruning_range"], pruned["kept_per_range"]) == (2, 4, 2)
    assert pruned["sparsity"] == pytest.approx(0.5)
    bits = pruned["quantization"]["fraction_bits"]
    assert bits["bias"] == bits["input"] + bits["weight"]
    assert pruned["quantization"]["input_scale"] == 2.0 ** -bits["input"]
    assert pruned["kernel"] == [3, 3] and pruned["stride"] == [1, 1] and pruned["padding"] == [1, 1, 1, 1]
    ids = [layer["id"] for layer in trace["layers"]]
    assert all(producer in ids or producer == "input" for layer in trace["layers"] for producer in layer["producers"])


def test_parameters_are_the_models_integer_weights_and_biases(bundle, mcbbs_fixed_point):
    trace, parameters, _, _ = bundle
    integer = integer_form(mcbbs_fixed_point)
    initializers = {init.name: numpy_helper.to_array(init) for init in integer.graph.initializer}
    nodes = {node.name: node for node in integer.graph.node}
    for layer in trace["layers"]:
        if layer["type"] in ("conv", "gemm"):
            node = nodes[layer["name"]]
            weight = parameters[f"{layer['id']}_weight"]
            assert weight.dtype == np.int8 and np.array_equal(weight, initializers[node.input[3]])
            assert parameters[f"{layer['id']}_bias"].dtype == np.int32
            assert list(weight.shape) == layer["weight_shape"]


def test_inout_holds_the_reference_executors_values(bundle, mcbbs_fixed_point):
    _, _, inout, feeds = bundle
    expected = ReferenceExecutor(integer_form(mcbbs_fixed_point)).run(feeds)[0]
    assert np.array_equal(np.array(inout["outputs"][0]["values"], np.float32), expected)
    assert np.array_equal(np.array(inout["inputs"][0]["values"], np.float32), feeds["input"])
    quantized = inout["quantized_outputs"][0]
    assert quantized["dtype"] == "int8" and quantized["layer"] is not None


def test_fraction_bits_only_for_powers_of_two():
    assert fraction_bits(2.0 ** -7) == 7 and fraction_bits(4.0) == -2 and fraction_bits(0.3) is None


def test_cli_exports_three_files_and_refuses_a_float_model(tmp_path, mcbbs_fixed_point, capsys):
    model_path = tmp_path / "int8.onnx"
    onnxsparse.save_model(mcbbs_fixed_point, model_path)
    assert main(["export-reference", str(model_path), str(tmp_path / "out"), "--random"]) == 0
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == [
        "int8_inout.yaml", "int8_parameters.npz", "int8_trace.yaml"]
    assert main(["export-reference", str(REPO / "samples" / "digits" / "digits_cnn.onnx"), str(tmp_path / "f"),
                 "--random"]) == 2
    assert "quantize it first" in capsys.readouterr().err
