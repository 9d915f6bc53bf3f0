"""The command line: output, exit statuses, and one-line errors that write nothing."""

from __future__ import annotations

import json
import subprocess
import sys

import jsonschema
import numpy as np
import onnx
import pytest
from onnx import helper

import onnxsparse
from onnxsparse.cli import main
from onnxsparse.validation import load_schema
from conftest import DIGITS_MODEL, DIGITS_TEST, DIGITS_TRAIN
from test_prune import conv_net


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "net.onnx"
    onnx.save(conv_net(), str(path))
    return path


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_prune_writes_the_model_and_prints_a_summary(capsys, model_file, tmp_path):
    out = tmp_path / "pruned.onnx"
    code, stdout, _ = run_cli(capsys, "prune", model_file, out, "--pattern", "1x16", "--sparsity", "0.75")
    assert code == 0
    assert "body" in stdout and "1x16" in stdout and "first conv kept dense" in stdout
    pruned = onnxsparse.load_model(out)
    assert onnxsparse.model_stats(pruned).layers[2].sparsity == pytest.approx(0.75)


def test_prune_json_summary(capsys, model_file, tmp_path):
    code, stdout, _ = run_cli(capsys, "prune", model_file, tmp_path / "o.onnx", "-p", "2:4", "--json")
    assert code == 0
    layers = {layer["node_name"]: layer for layer in json.loads(stdout)["layers"]}
    assert layers["body"]["pattern"] == "2:4" and layers["body"]["sparsity"] == pytest.approx(0.5)


def test_stats_json_follows_its_schema(capsys, model_file):
    code, stdout, _ = run_cli(capsys, "stats", model_file, "--json")
    assert code == 0
    document = json.loads(stdout)
    jsonschema.validate(document, load_schema("stats"))
    assert [layer["name"] for layer in document["layers"]] == ["stem", "depthwise", "body", "fc"]
    assert document["totals"]["params"] == 32 * 27 + 32 * 9 + 64 * 32 * 9 + 10 * 1024


def test_stats_table_names_layers_and_patterns(capsys, tmp_path):
    pruned = tmp_path / "p.onnx"
    onnxsparse.save_model(onnxsparse.prune(conv_net(), "mcbbs:c2r4", 0.75), pruned)
    code, stdout, _ = run_cli(capsys, "stats", pruned)
    assert code == 0 and "mcbbs:c2r4" in stdout and "total (4 layers)" in stdout


@pytest.mark.parametrize("command", ["prune", "stats", "quantize", "run", "zoo", "demo"])
def test_help_shows_an_example(capsys, command):
    code, stdout, _ = run_cli(capsys, command, "--help")
    assert code == 0 and "Example" in stdout and "onnxsparse " + command in stdout


def write_bytes(tmp_path, name, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def bad_prune_cases(tmp_path, model_file):
    """(arguments, expected exit status, text the error must contain)."""
    not_onnx = write_bytes(tmp_path, "notes.onnx", b"these are not the weights you are looking for\n" * 20)
    truncated = write_bytes(tmp_path, "cut.onnx", model_file.read_bytes()[: model_file.stat().st_size // 2])
    relu = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])]), ir_version=8)
    no_weights = tmp_path / "relu.onnx"
    onnx.save(relu, str(no_weights))
    unknown_key = write_bytes(tmp_path, "unknown.yaml", b"layers:\n  - match: body\n    sparsty: 0.5\n")
    no_match = write_bytes(tmp_path, "nomatch.yaml", b"layers:\n  - match: '^conv9$'\n    pattern: '2:4'\n")
    ok = ["-p", "unstructured", "-s", "0.5"]
    return [
        ([not_onnx, *ok], 1, "notes.onnx"),
        ([truncated, *ok], 1, "cut.onnx"),
        ([no_weights, *ok], 1, "no prunable weights"),
        ([tmp_path / "missing.onnx", *ok], 2, "no such file"),
        ([model_file, "-p", "zigzag", "-s", "0.5"], 2, "unknown pattern 'zigzag'"),
        ([model_file, "-p", "4:4"], 2, "N < M"),
        ([model_file, "-p", "1x0", "-s", "0.5"], 2, "N >= 1"),
        ([model_file, "-p", "unstructured", "-s", "1.0"], 2, "outside [0, 1)"),
        ([model_file, "-p", "unstructured", "-s", "-0.5"], 2, "outside [0, 1)"),
        ([model_file, "-p", "mcbbs:c2r4", "-s", "0.8"], 2, "use one of 0, 0.25, 0.5, 0.75"),
        ([model_file, "--recipe", unknown_key], 2, "sparsty"),
        ([model_file, "--recipe", no_match], 2, "matches no weight-bearing node"),
        ([model_file, "-p", "unstructured"], 2, "needs a sparsity"),
        ([model_file, "-p", "unstructured", "-s", "half"], 2, "half"),
    ]


def test_bad_input_gives_one_line_errors_and_writes_nothing(capsys, tmp_path, model_file):
    for arguments, status, text in bad_prune_cases(tmp_path, model_file):
        out = tmp_path / "out" / "pruned.onnx"
        out.parent.mkdir(exist_ok=True)
        code, stdout, stderr = run_cli(capsys, "prune", arguments[0], out, *arguments[1:])
        assert (code, text in stderr) == (status, True), (arguments, stderr)
        assert len(stderr.strip().splitlines()) == 1 and stderr.startswith("onnxsparse: error: "), stderr
        assert list(out.parent.iterdir()) == [], f"{arguments} wrote {list(out.parent.iterdir())}"


def test_output_equal_to_input_is_refused_and_the_input_is_untouched(capsys, model_file):
    before = model_file.read_bytes()
    code, _, stderr = run_cli(capsys, "prune", model_file, model_file, "-p", "2:4")
    assert code == 2 and "output is the input" in stderr
    assert model_file.read_bytes() == before


def test_output_folder_must_exist(capsys, model_file, tmp_path):
    code, _, stderr = run_cli(capsys, "prune", model_file, tmp_path / "nowhere" / "o.onnx", "-p", "2:4")
    assert code == 2 and "does not exist" in stderr


def test_console_script_exit_status_and_debug_traceback(tmp_path):
    bad = write_bytes(tmp_path, "bad.onnx", b"\x00garbage")
    command = [sys.executable, "-m", "onnxsparse.cli", "stats", str(bad)]
    plain = subprocess.run(command, capture_output=True, text=True)
    assert plain.returncode == 1 and plain.stderr.count("\n") == 1 and "bad.onnx" in plain.stderr
    debug = subprocess.run(command[:3] + ["--debug"] + command[3:], capture_output=True, text=True)
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_demo_reports_accuracy_before_and_after(capsys, tmp_path):
    code, stdout, _ = run_cli(capsys, "demo", "--out-dir", tmp_path, "--model", DIGITS_MODEL, "--train", DIGITS_TRAIN,
                              "--test", DIGITS_TEST)
    assert code == 0
    assert "float model" in stdout and "held-out top-1" in stdout and "mcbbs:c2r4" in stdout
    assert (tmp_path / "digits_pruned.onnx").is_file()
    pruned = onnxsparse.load_model(tmp_path / "digits_pruned.onnx")
    assert np.isclose(onnxsparse.model_stats(pruned).sparsity, 0.5, atol=0.1)


def test_quantize_writes_a_model_that_run_executes_with_both_runtimes(capsys, tmp_path):
    out = tmp_path / "int.onnx"
    code, stdout, _ = run_cli(capsys, "quantize", DIGITS_MODEL, out, "--calib", DIGITS_TRAIN, "--integer",
                              "--weight-bits", "7")
    assert code == 0 and "integer-only model" in stdout and "5 batch norms folded" in stdout
    inputs = tmp_path / "x.npz"
    np.savez(inputs, input=np.load(DIGITS_TEST)["input"][:16])
    outputs = {}
    for runtime in ("ort", "reference"):
        target = tmp_path / f"{runtime}.npz"
        code, stdout, _ = run_cli(capsys, "run", out, "--input", inputs, "--runtime", runtime, "--output", target)
        assert code == 0 and "logits" in stdout
        outputs[runtime] = np.load(target)["logits"]
    assert outputs["ort"].shape == (16, 10)
    assert (outputs["ort"].argmax(1) == outputs["reference"].argmax(1)).all()


def test_quantize_bad_input_is_one_line_and_writes_nothing(capsys, tmp_path):
    empty_folder = tmp_path / "images"
    empty_folder.mkdir()
    quantized_model = tmp_path / "q.onnx"
    assert main(["quantize", str(DIGITS_MODEL), str(quantized_model), "--calib", str(DIGITS_TRAIN)]) == 0
    capsys.readouterr()
    cases = [
        (["--calib", DIGITS_TRAIN, "--weight-bits", "9"], 2, "weight bits must be 2-8"),
        (["--calib", DIGITS_TRAIN, "--act-bits", "6"], 2, "activation bits must be 4 or 8"),
        (["--calib", empty_folder], 2, "no images"),
        (["--calib", tmp_path / "missing.npz"], 2, "no such file"),
    ]
    for arguments, status, text in cases:
        out = tmp_path / "out" / "q.onnx"
        out.parent.mkdir(exist_ok=True)
        code, _, stderr = run_cli(capsys, "quantize", DIGITS_MODEL, out, *arguments)
        assert (code, text in stderr, len(stderr.strip().splitlines())) == (status, True, 1), stderr
        assert not list(out.parent.iterdir())
    code, _, stderr = run_cli(capsys, "quantize", quantized_model, tmp_path / "out" / "qq.onnx", "--calib", DIGITS_TRAIN)
    assert code == 1 and "already quantized" in stderr


def test_run_needs_exactly_one_input_source(capsys):
    code, _, stderr = run_cli(capsys, "run", DIGITS_MODEL)
    assert code == 2 and "exactly one of --input" in stderr
    code, stdout, _ = run_cli(capsys, "run", DIGITS_MODEL, "--random")
    assert code == 0 and "1x10" in stdout
