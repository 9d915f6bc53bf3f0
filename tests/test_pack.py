"""Packed models: pack -> unpack is exact on float, pruned, QDQ and integer models; inspect reports
and verifies; corrupt or non-packed files are one-line errors."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnxsparse
from onnxsparse import model as model_io
from onnxsparse.cli import main
from onnxsparse.formats.inspect import inspect_model
from onnxsparse.formats.pack import DOMAIN, pack_model, unpack_model
from onnxsparse.quant.quantize import QuantizeOptions, quantize_model
from onnxsparse.validation import load_schema
from conftest import DIGITS_TRAIN
from test_prune import ALL_PATTERNS


def initializers(model: onnx.ModelProto) -> dict[str, tuple[str, tuple, bytes]]:
    return {init.name: (numpy_helper.to_array(init).dtype.str, tuple(init.dims), numpy_helper.to_array(init).tobytes())
            for init in model.graph.initializer}


def outputs(model: onnx.ModelProto, inputs: np.ndarray) -> np.ndarray:
    return model_io.onnxruntime_session(model).run(None, {"input": inputs})[0]


def assert_round_trip_exact(model: onnx.ModelProto, inputs: np.ndarray) -> onnxsparse.formats.pack.PackResult:
    result = pack_model(model)
    assert result.tensors and all(node.domain == DOMAIN for node in result.model.graph.node
                                  if node.op_type.startswith("Packed"))
    restored = unpack_model(result.model)
    onnx.checker.check_model(restored)
    assert initializers(restored) == initializers(model)
    assert sorted(n.op_type for n in restored.graph.node) == sorted(n.op_type for n in model.graph.node)
    assert np.array_equal(outputs(restored, inputs), outputs(model, inputs))
    return result


@pytest.fixture(scope="module")
def digits_quantized(digits_model):
    pruned = onnxsparse.prune(digits_model, "1x16", 0.75)
    return {bits: quantize_model(pruned, DIGITS_TRAIN, QuantizeOptions(weight_bits=bits)).model for bits in (8, 5)}


def test_float_model_round_trips_exactly(digits_model, digits_test):
    assert_round_trip_exact(digits_model, digits_test.inputs[:32])


@pytest.mark.parametrize("spec,sparsity", ALL_PATTERNS)
def test_pruned_float_models_round_trip_and_pick_a_sparse_encoding(digits_model, digits_test, spec, sparsity):
    pruned = onnxsparse.prune(digits_model, spec, sparsity)
    result = assert_round_trip_exact(pruned, digits_test.inputs[:32])
    encodings = {tensor.node_name: tensor.info.encoding.name for tensor in result.tensors}
    assert encodings["/conv3/Conv"] != "dense"


@pytest.mark.parametrize("bits", [8, 5])
def test_quantized_qdq_models_round_trip_and_bit_pack_declared_widths(digits_quantized, digits_test, bits):
    result = assert_round_trip_exact(digits_quantized[bits], digits_test.inputs[:32])
    assert "DequantizeLinear" not in {n.op_type for n in result.model.graph.node if n.output[0].endswith("dequantized")
                                      and "weight" in n.output[0] and "bias" not in n.output[0]}
    conv3 = next(t for t in result.tensors if t.node_name == "/conv3/Conv")
    assert conv3.info.encoding.name == "block" and conv3.info.value_bits == bits
    assert conv3.info.quantization is not None and conv3.info.quantization.axis == 0


def test_integer_form_round_trips_exactly(digits_quantized, digits_test):
    from onnxsparse.quant.lower import lower_to_integer

    integer = lower_to_integer(digits_quantized[5])
    result = assert_round_trip_exact(integer, digits_test.inputs[:32])
    assert {t.op_type for t in result.tensors} == {"QLinearConv", "QGemm"}


def test_packed_model_is_smaller_and_inspect_verifies_it(digits_quantized, tmp_path):
    result = pack_model(digits_quantized[5])
    report = inspect_model(result.model)
    assert report.float32_bytes == 4 * sum(int(np.prod(t.info.shape)) for t in result.tensors)
    assert report.float32_bytes / report.packed_bytes > 8
    document = report.to_json()
    schema = load_schema("packed-tensor")
    for tensor in document["tensors"]:
        jsonschema.validate(tensor["header"], schema)
    conv3 = report.find("/conv3/Conv")
    assert conv3.sparsity == pytest.approx(0.75)
    path = report.dump("/conv3/Conv", tmp_path / "conv3.npy")
    assert np.array_equal(np.load(path), conv3.values) and np.load(path).dtype == np.int8


def test_cli_pack_inspect_unpack(capsys, digits_quantized, tmp_path):
    source, packed, restored = tmp_path / "q.onnx", tmp_path / "p.onnx", tmp_path / "r.onnx"
    onnxsparse.save_model(digits_quantized[5], source)
    assert main(["pack", str(source), str(packed)]) == 0
    assert "block" in capsys.readouterr().out
    assert main(["inspect", str(packed), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["totals"]["tensors"] == 7 and document["totals"]["compression"] > 8
    assert main(["unpack", str(packed), str(restored)]) == 0
    capsys.readouterr()
    assert initializers(onnx.load(str(restored))) == initializers(onnx.load(str(source)))


def corrupt_packed(model: onnx.ModelProto, position: int) -> onnx.ModelProto:
    """A copy whose first packed tensor has one byte flipped."""
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    init = next(i for i in broken.graph.initializer if i.name.endswith("_packed"))
    data = bytearray(numpy_helper.to_array(init).tobytes())
    data[position % len(data)] ^= 0x5A
    init.CopyFrom(numpy_helper.from_array(np.frombuffer(bytes(data), np.uint8), init.name))
    return broken


@pytest.mark.parametrize("command", ["inspect", "unpack"])
def test_corrupt_truncated_or_unpacked_files_are_one_line_errors(capsys, digits_model, digits_quantized, tmp_path,
                                                                 command):
    packed = pack_model(digits_quantized[8]).model
    cases = {"plain.onnx": digits_model, "corrupt_header.onnx": corrupt_packed(packed, 20),
             "corrupt_values.onnx": corrupt_packed(packed, -3)}
    for name, model in cases.items():
        onnx.save(model, str(tmp_path / name))
    good = tmp_path / "good.onnx"
    onnx.save(packed, str(good))
    (tmp_path / "truncated.onnx").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    for name in [*cases, "truncated.onnx"]:
        arguments = [command, str(tmp_path / name)] + ([str(tmp_path / "out.onnx")] if command == "unpack" else [])
        code = main(arguments)
        stderr = capsys.readouterr().err
        assert code == 1 and len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr, (name, stderr)
        assert not (tmp_path / "out.onnx").exists()


@pytest.mark.zoo
def test_zoo_model_packs_and_unpacks_exactly(zoo_path, zoo_name):
    model = onnxsparse.prune(onnxsparse.load_model(zoo_path(zoo_name)), "1x16", 0.8)
    result = pack_model(model)
    restored = unpack_model(result.model)
    assert initializers(restored) == initializers(model)


def test_forced_encoding_family_packs_what_fits_and_notes_the_rest(digits_quantized):
    result = pack_model(digits_quantized[8], encoding="nm")
    encodings = {t.node_name: t.info.encoding.name for t in result.tensors}
    assert encodings["/conv1/Conv"] != "nm" and any("/conv1/Conv" in note and "auto instead" in note
                                                    for note in result.notes)
    forced = pack_model(digits_quantized[8], encoding="block:16")
    assert {t.node_name: t.info.encoding.spec for t in forced.tensors}["/conv3/Conv"].startswith("block:16")
    assert any("/fc2/Gemm" in note for note in forced.notes)


def test_unknown_encoding_is_a_usage_error(capsys, digits_quantized, tmp_path):
    source = tmp_path / "q.onnx"
    onnxsparse.save_model(digits_quantized[8], source)
    code = main(["pack", str(source), str(tmp_path / "p.onnx"), "--encoding", "zigzag"])
    assert code == 2 and "unknown encoding 'zigzag'" in capsys.readouterr().err
    assert not (tmp_path / "p.onnx").exists()


def test_a_packed_model_runs_in_both_runtimes(capsys, digits_quantized, tmp_path):
    packed, saved = tmp_path / "p.onnx", {}
    onnxsparse.save_model(pack_model(digits_quantized[8]).model, packed)
    for runtime in ("ort", "reference"):
        out = tmp_path / f"{runtime}.npz"
        assert main(["run", str(packed), "--random", "--runtime", runtime, "--output", str(out)]) == 0
        with np.load(out) as arrays:
            saved[runtime] = arrays["logits"]
    capsys.readouterr()
    np.testing.assert_array_equal(saved["ort"], saved["reference"])  # the QDQ model runs as its integer form


def test_unpack_and_inspect_refuse_tensors_beyond_the_element_bound(monkeypatch, digits_quantized):
    import onnxsparse.formats.inspect as inspect_module
    import onnxsparse.formats.pack as pack_module
    from onnxsparse.formats.errors import FormatError

    packed = pack_model(digits_quantized[8]).model
    monkeypatch.setattr(pack_module, "MAX_WEIGHT_ELEMENTS", 1000)
    monkeypatch.setattr(inspect_module, "MAX_WEIGHT_ELEMENTS", 1000)
    with pytest.raises(FormatError, match="allowed"):
        unpack_model(packed)
    with pytest.raises(FormatError, match="allowed"):
        inspect_model(packed)


def test_stats_of_a_packed_model_are_those_of_its_weights(digits_quantized):
    from onnxsparse.report.stats import model_stats

    packed = pack_model(digits_quantized[8]).model
    assert model_stats(packed) == model_stats(digits_quantized[8])
