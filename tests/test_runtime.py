"""The runtime: packed models run in native kernels hosted in onnxruntime and give the unpacked
model's outputs (fp32 within 1e-4 relative, integer bit for bit with the reference and within one
unit of onnxruntime), on the native SIMD path and the forced scalar one; pack records the kernel
choice; run and bench work from the command line; hostile packed files stop at the reader."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

import onnxsparse
from onnxsparse import _native
from onnxsparse import model as model_io
from onnxsparse.cli import main
from onnxsparse.formats.pack import pack_model
from onnxsparse.quant.lower import lower_to_integer
from onnxsparse.quant.quantize import quantize
from onnxsparse.quant.reference import run_reference
from onnxsparse.runtime import InferenceSession, hosting
from conftest import DIGITS_TRAIN
from test_pack import corrupt_packed

SPARSE = lambda node: {"kernel": "sparse", "reason": "test"}  # noqa: E731
DENSE = lambda node: {"kernel": "dense", "reason": "test"}  # noqa: E731
SIMD_LEVELS = ["auto", "scalar"]


@pytest.fixture(params=SIMD_LEVELS)
def simd(request):
    _native.set_simd_level(request.param)
    yield request.param
    _native.set_simd_level("auto")


def packed(model: onnx.ModelProto, choose=SPARSE) -> onnx.ModelProto:
    return pack_model(model, choose_kernel=choose).model


def ort_outputs(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    return model_io.onnxruntime_session(model, threads=2).run(None, feeds)


def assert_close(got: np.ndarray, expected: np.ndarray) -> None:
    scale = max(float(np.max(np.abs(expected))), 1e-6)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    assert float(np.max(np.abs(got - expected))) <= 1e-4 * scale


@pytest.fixture(scope="module")
def digits_integer(digits_model):
    # 7-bit weights: onnxruntime's u8s8 kernels saturate on full-range weights on CPUs without VNNI
    # (docs/QUANTIZATION.md), and the comparison with onnxruntime below needs it to compute right
    pruned = onnxsparse.prune(digits_model, "1x16", 0.75)
    return lower_to_integer(quantize(pruned, DIGITS_TRAIN, weight_bits=7))


@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.75), ("1x16", 0.75), ("1x4", 0.5), ("2:4", None),
                                              ("bank:16", 0.75), ("mcbbs:c2r4", 0.5)])
def test_packed_float_model_matches_onnxruntime_on_the_unpacked_model(digits_model, digits_test, simd, pattern,
                                                                      sparsity):
    model = onnxsparse.prune(digits_model, pattern, sparsity)
    session = InferenceSession(packed(model), threads=2)
    assert session.plan.partition.regions and len(session.plan.sparse_layers) == 7
    feeds = {"input": digits_test.inputs[:9]}
    assert_close(session.run(None, feeds)[0], ort_outputs(model, feeds)[0])


def test_packed_integer_model_is_bit_exact_with_the_reference(digits_integer, digits_test, simd):
    session = InferenceSession(packed(digits_integer), threads=2)
    assert len(session.plan.sparse_layers) == 7
    inputs = digits_test.inputs[:16]
    # compare the integer tensors themselves: the last integer op's output, before DequantizeLinear
    last = next(n for n in reversed(digits_integer.graph.node) if n.op_type == "DequantizeLinear").input[0]
    exposed = onnx.ModelProto()
    exposed.CopyFrom(digits_integer)
    exposed.graph.output.append(onnx.helper.make_tensor_value_info(last, onnx.TensorProto.UINT8, None))
    exposed_session = InferenceSession(packed(exposed), threads=2)
    got = exposed_session.run(None, {"input": inputs})
    reference = run_reference(exposed, {"input": inputs})
    for mine, exact in zip(got, reference):
        np.testing.assert_array_equal(mine, exact)
    stock = ort_outputs(exposed, {"input": inputs})[1]
    assert int(np.max(np.abs(got[1].astype(np.int32) - stock.astype(np.int32)))) <= 1
    np.testing.assert_array_equal(session.run(None, {"input": inputs})[0], got[0])


def test_packed_qdq_model_runs_as_its_integer_form(digits_model, digits_test):
    qdq = quantize(onnxsparse.prune(digits_model, "unstructured", 0.5), DIGITS_TRAIN)
    session = InferenceSession(packed(qdq), threads=2)
    assert len(session.plan.sparse_layers) == 7
    inputs = {"input": digits_test.inputs[:16]}
    np.testing.assert_array_equal(session.run(None, inputs)[0], run_reference(lower_to_integer(qdq), inputs)[0])


def test_layers_chosen_dense_stay_in_onnxruntime(digits_model, digits_test):
    model = onnxsparse.prune(digits_model, "1x16", 0.75)
    session = InferenceSession(packed(model, DENSE))
    assert not session.plan.partition.regions and len(session.plan.dense_layers) == 7
    feeds = {"input": digits_test.inputs[:4]}
    assert_close(session.run(None, feeds)[0], ort_outputs(model, feeds)[0])


def test_chains_that_feed_each_other_share_one_region(digits_model):
    session = InferenceSession(packed(onnxsparse.prune(digits_model, "1x16", 0.75)))
    regions = session.plan.partition.regions
    # conv1..conv4 (with their ReLUs), the max pooling, conv5 and both FCs are one region: the
    # first FC takes in the global average pool and the flatten in front of it
    assert [len(region.chains) for region in regions] == [8]
    custom = [n for n in session.plan.model.graph.node if n.domain == hosting.DOMAIN]
    left = {n.op_type for n in session.plan.model.graph.node}
    assert len(custom) == 1 and not left & {"Conv", "Relu", "Gemm", "MaxPool", "GlobalAveragePool", "Flatten"}, left


def resnet_head(model: onnx.ModelProto, kernel: tuple[int, int]) -> onnx.ModelProto:
    """The digits model with ResNet-50's head: its GlobalAveragePool an AveragePool of `kernel` (stride
    2), its Flatten a Reshape to [0, -1]."""
    edited = onnx.ModelProto()
    edited.CopyFrom(model)
    for node in edited.graph.node:
        if node.op_type == "GlobalAveragePool":
            node.op_type = "AveragePool"
            node.attribute.extend([onnx.helper.make_attribute("kernel_shape", list(kernel)),
                                   onnx.helper.make_attribute("strides", [2, 2])])
        elif node.op_type == "Flatten":
            node.op_type = "Reshape"
            del node.attribute[:]
            node.input.append("head_shape")
    edited.graph.initializer.append(onnx.numpy_helper.from_array(np.array([0, -1], np.int64), "head_shape"))
    return edited


@pytest.mark.parametrize("kernel, joins", [((4, 4), True), ((3, 3), False)], ids=["whole_input", "one_corner"])
def test_an_average_pool_over_the_whole_input_joins_the_fc_chain(digits_model, digits_test, kernel, joins):
    """An average pool whose window is its whole input (4x4 here), then a reshape to 2-D, runs inside
    the region with the Gemm after it; a 3x3 window (one output pixel too, but a corner of the input)
    stays in onnxruntime. Float within 1e-4 of onnxruntime, integer bit for bit with the reference."""
    model = resnet_head(onnxsparse.prune(digits_model, "1x16", 0.75), kernel)
    integer = lower_to_integer(quantize(model, DIGITS_TRAIN, weight_bits=7))
    feeds = {"input": digits_test.inputs[:9]}
    for unpacked, pool in ((model, "AveragePool"), (integer, "QLinearAveragePool")):
        session = InferenceSession(packed(unpacked), threads=2)
        left = {node.op_type for node in session.plan.model.graph.node}
        assert (pool in left) != joins and ("Reshape" in left) != joins, left
        assert len(session.plan.partition.regions) == (1 if joins else 2)
        got = session.run(None, feeds)[0]
        if unpacked is model:
            assert_close(got, ort_outputs(model, feeds)[0])
        else:
            np.testing.assert_array_equal(got, run_reference(integer, feeds)[0])


@pytest.mark.parametrize("integer", [False, True], ids=["float", "integer"])
def test_regions_replay_their_first_run_with_the_same_results(digits_model, digits_integer, digits_test, integer):
    model = digits_integer if integer else onnxsparse.prune(digits_model, "1x16", 0.75)
    session = InferenceSession(packed(model), threads=2)
    region = session.plan.partition.regions[0]
    assert len(region.chains) >= 6

    def expected(feeds):
        return run_reference(model, feeds)[0] if integer else ort_outputs(model, feeds)[0]

    def check(got, want):
        if integer:
            np.testing.assert_array_equal(got, want)
        else:
            assert_close(got, want)

    inputs = digits_test.inputs
    first = session.run(None, {"input": inputs[:3]})[0]
    assert list(region._recorded) == [((3, 1, 8, 8),)]  # the first run recorded its buffers
    kept = first.copy()
    for batch in (inputs[3:6], inputs[6:9], inputs[:5], inputs[9:14]):  # replays, and a new batch size
        feeds = {"input": batch}
        check(session.run(None, feeds)[0], expected(feeds))
    np.testing.assert_array_equal(first, kept)  # an earlier result is never written over
    assert set(region._recorded) == {((3, 1, 8, 8),), ((5, 1, 8, 8),)}
    # the region called directly: the replayed run equals the planned one, and a call that finds
    # the recorded arrays in use plans its own
    x = np.ascontiguousarray(inputs[:3]) if not integer else None
    if x is not None:
        planned = [a.copy() for a in region._planned((x,), ((3, 1, 8, 8),))]
        replayed = region(x)
        for a, b in zip(planned, replayed):
            np.testing.assert_array_equal(a, b)
        with region._replaying:
            for a, b in zip(planned, region(x)):
                np.testing.assert_array_equal(a, b)
        # what a call returned stays as it was through the next calls
        before = region(x)
        copies = [a.copy() for a in before]
        region(np.ascontiguousarray(inputs[3:6]))
        for a, b in zip(before, copies):
            np.testing.assert_array_equal(a, b)
    # more input shapes than a region records: the oldest recordings go, the results stay right
    for size in (1, 2, 4, 6, 7):
        feeds = {"input": inputs[:size]}
        check(session.run(None, feeds)[0], expected(feeds))
    assert region.RECORDINGS == 4 and list(region._recorded) == [((size, 1, 8, 8),) for size in (2, 4, 6, 7)]


def test_an_integer_max_pool_joins_the_region_unless_the_kernel_cannot_take_it(digits_integer, digits_test):
    feeds = {"input": digits_test.inputs[:6]}
    session = InferenceSession(packed(digits_integer), threads=2)
    names = [chain.node_names for region in session.plan.partition.regions for chain in region.chains]
    assert any(node.op_type == "MaxPool" for node in digits_integer.graph.node)
    assert not any(node.op_type == "MaxPool" for node in session.plan.model.graph.node), names
    expected = run_reference(digits_integer, feeds)[0]
    np.testing.assert_array_equal(session.run(None, feeds)[0], expected)
    model = onnx.ModelProto()
    model.CopyFrom(digits_integer)
    pool = next(node for node in model.graph.node if node.op_type == "MaxPool")
    kept = [a for a in pool.attribute if a.name != "ceil_mode"]
    del pool.attribute[:]
    pool.attribute.extend([*kept, onnx.helper.make_attribute("ceil_mode", 1)])
    session = InferenceSession(packed(model), threads=2)
    assert any(node.op_type == "MaxPool" for node in session.plan.model.graph.node)
    np.testing.assert_array_equal(session.run(None, feeds)[0], expected)  # even sizes: ceil_mode changes nothing


def test_an_integer_max_pool_fed_by_onnxruntime_runs_natively(digits_integer, digits_test):
    feeds = {"input": digits_test.inputs[:6]}
    nodes = digits_integer.graph.node
    producer = {out: node for node in nodes for out in node.output}
    feeder = producer[next(node for node in nodes if node.op_type == "MaxPool").input[0]]  # a residual add
    conv = next(producer[name] for name in feeder.input if producer.get(name, feeder).op_type == "QLinearConv")
    # the conv (and so its add) before the pool stays dense, in onnxruntime; the pool still leaves it
    session = InferenceSession(packed(digits_integer, lambda node: (DENSE if node.name == conv.name else SPARSE)(node)))
    left = [node.op_type for node in session.plan.model.graph.node]
    assert feeder.op_type in left and "QLinearConv" in left and "MaxPool" not in left, left
    np.testing.assert_array_equal(session.run(None, feeds)[0], run_reference(digits_integer, feeds)[0])
    plain = InferenceSession(packed(digits_integer, DENSE))  # no native chain: plain onnxruntime
    assert not plain.plan.partition.regions


def test_a_plain_model_runs_in_plain_onnxruntime(digits_model, digits_test):
    session = InferenceSession(digits_model)
    assert not session.plan.partition.regions
    feeds = {"input": digits_test.inputs[:4]}
    np.testing.assert_array_equal(session.run(None, feeds)[0], ort_outputs(digits_model, feeds)[0])


def test_other_python_operators_keep_working_with_the_array_hook():
    from onnx import TensorProto, helper
    from onnxruntime_extensions import PyCustomOpDef, onnx_op

    hosting.operator_type([np.float32], [np.float32])  # installs the hook

    @onnx_op(op_type="OnnxsparseTestTwice", inputs=[PyCustomOpDef.dt_float], outputs=[PyCustomOpDef.dt_float])
    def twice(x):
        return x * 2

    node = helper.make_node("OnnxsparseTestTwice", ["x"], ["y"], domain=hosting.DOMAIN)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid(hosting.DOMAIN, 1)], ir_version=8)
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.register_custom_ops_library(hosting.library_path())
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(session.run(None, {"x": x})[0], 2 * x)


def test_pack_auto_records_measured_choices_per_layer_and_for_the_whole_model(digits_model, tmp_path, capsys):
    source, target = tmp_path / "pruned.onnx", tmp_path / "packed.onnx"
    onnxsparse.save_model(onnxsparse.prune(digits_model, "1x16", 0.75), source)
    assert main(["pack", str(source), str(target), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    choices = {t["node"]: t["kernel"] for t in document["tensors"]}
    variant = choices["/conv2/Conv"]["model_variant"]
    assert variant in ("per layer", "all sparse", "all native", "all dense")
    # conv1 has no zeros: measured in the whole model only, native with the rest in "all native"
    assert set(choices["/conv2/Conv"]["model_ms"]) == {"per layer", "all sparse", "all native", "all dense"}
    if variant == "all native":
        assert choices["/conv1/Conv"]["kernel"] == "sparse" and choices["/conv1/Conv"]["reason"].startswith("no zeros;")
    else:
        assert choices["/conv1/Conv"]["kernel"] == "dense" and choices["/conv1/Conv"]["reason"] == "no zeros"
    for name, choice in choices.items():
        assert choice["kernel"] in ("sparse", "dense") and choice["model_variant"] == variant
        if choice["kernel"] == "sparse" and variant == "per layer":
            assert choice["sparse_ms"] <= choice["dense_ms"]
        if variant == "all dense":
            assert choice["kernel"] == "dense"
    session = InferenceSession(str(target))
    assert set(session.plan.sparse_layers) == {name for name, c in choices.items() if c["kernel"] == "sparse"}


def test_the_all_native_variant_runs_layers_without_zeros_natively(digits_model, digits_test):
    from onnxsparse.runtime.costmodel import NO_ZEROS, model_variants

    model = onnxsparse.prune(digits_model, "1x16", 0.75)
    weights = {ref.node_name: ref.tensor_name for ref in model_io.find_weights(model)}
    index = model_io.GraphIndex(model)
    without_zeros = {name for name, w in weights.items() if np.all(index.constant(w) != 0)}
    assert without_zeros == {"/conv1/Conv", "/fc2/Gemm"}  # the pruner leaves the first and last layers alone

    def recorded(node):  # what pack --kernels auto records before the whole-model measurement
        if node.name in without_zeros:
            return {"kernel": "dense", "reason": NO_ZEROS, "sparse_ms": None, "dense_ms": None}
        return {"kernel": "sparse", "reason": "test", "sparse_ms": 1.0, "dense_ms": 2.0}

    variants = model_variants(packed(model, recorded))
    assert list(variants) == ["per layer", "all sparse", "all native", "all dense"]
    feeds = {"input": digits_test.inputs[:5]}
    expected = ort_outputs(model, feeds)[0]
    for name, variant in variants.items():
        session = InferenceSession(variant, threads=2)
        native = set(session.plan.sparse_layers)
        assert native == {"all dense": set(), "all native": set(weights)}.get(name, set(weights) - without_zeros), name
        assert_close(session.run(None, feeds)[0], expected)
    # without a layer that has no zeros there is nothing for "all native" to add
    everything_sparse = packed(model, lambda node: {"kernel": "sparse", "reason": "test", "sparse_ms": 1.0})
    assert list(model_variants(everything_sparse)) == ["per layer", "all sparse", "all dense"]


def test_the_cost_model_measures_integer_layers_past_a_residual_add():
    # onnx's type inference stops at com.microsoft operators; every layer after the first
    # QLinearAdd was kept dense unmeasured ("input shape unknown") until the types went on past it
    from test_reference import MS, GraphBuilder, add_conv

    from onnxsparse.runtime.costmodel import KernelChooser

    g, rng = GraphBuilder(), np.random.default_rng(3)
    q = g.node("QuantizeLinear", [g.input("x", np.float32, [1, 32, 12, 12]),
                                  *g.quant_params("input", 0.04, 0, np.uint8)], "q")
    a, a_scale, a_zero_point = add_conv(g, q, 0.04, 0, np.uint8, 32, 32, (1, 1), rng, output="conv1")
    total = g.node("QLinearAdd", [a, *g.quant_params("add_a", a_scale, a_zero_point, np.uint8),
                                  q, *g.quant_params("add_q", 0.04, 0, np.uint8),
                                  *g.quant_params("sum", 0.08, 0, np.uint8)], "sum", domain=MS)
    pooled = g.node("MaxPool", [total], "pooled", kernel_shape=[2, 2], strides=[2, 2])
    b, *_ = add_conv(g, pooled, 0.08, 0, np.uint8, 32, 32, (3, 3), rng, output="conv2", pads=[1, 1, 1, 1])
    model = g.model(b)
    weight = next(init for init in model.graph.initializer if init.name == "conv2_w")
    pruned = onnx.numpy_helper.to_array(weight).copy()
    pruned[:, ::2] = 0
    weight.CopyFrom(onnx.numpy_helper.from_array(pruned, "conv2_w"))
    chooser = KernelChooser(model)
    assert chooser.types["sum"] == chooser.types["pooled"] == onnx.TensorProto.UINT8
    choice = chooser.choose(model.graph.node[-1])
    assert choice.sparse_ms is not None and choice.dense_ms is not None, choice.reason


def test_run_command_runs_a_packed_model(digits_model, digits_test, tmp_path, capsys):
    model = onnxsparse.prune(digits_model, "1x16", 0.75)
    target, inputs, outputs = tmp_path / "packed.onnx", tmp_path / "x.npy", tmp_path / "y.npz"
    onnxsparse.save_model(packed(model), target)
    np.save(inputs, digits_test.inputs[:5])
    assert main(["run", str(target), "--input", str(inputs), "--output", str(outputs)]) == 0
    capsys.readouterr()
    with np.load(outputs) as saved:
        assert_close(saved["logits"], ort_outputs(model, {"input": digits_test.inputs[:5]})[0])
    assert main(["run", str(target), "--random"]) == 0
    assert "logits" in capsys.readouterr().out


def test_an_input_a_kernel_rejects_raises_and_the_session_goes_on(digits_model, digits_test, tmp_path, capsys):
    # with a symbolic channel dimension onnxruntime lets a 2-channel input reach the first region;
    # the kernel's error must come back as an exception (raised inside the operator it would end
    # the process) and leave the session usable
    model = onnxsparse.prune(digits_model, "1x16", 0.75)
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "channels"
    session = InferenceSession(packed(model), threads=2)
    with pytest.raises(ValueError, match=r"node /conv1/Conv: the input has 2 channels"):
        session.run(None, {"input": np.zeros((1, 2, 8, 8), np.float32)})
    feeds = {"input": digits_test.inputs[:3]}
    assert_close(session.run(None, feeds)[0], ort_outputs(model, feeds)[0])
    target, inputs = tmp_path / "packed.onnx", tmp_path / "x.npy"
    onnxsparse.save_model(packed(model), target)
    np.save(inputs, np.zeros((1, 2, 8, 8), np.float32))
    assert main(["run", str(target), "--input", str(inputs)]) == 2
    stderr = capsys.readouterr().err
    assert "2 channels" in stderr and len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr


def test_bench_command_reports_medians_and_ratios(digits_model, tmp_path, capsys):
    source, target = tmp_path / "pruned.onnx", tmp_path / "packed.onnx"
    model = onnxsparse.prune(digits_model, "1x16", 0.75)
    onnxsparse.save_model(model, source)
    onnxsparse.save_model(packed(model), target)
    assert main(["bench", str(target), "--against", str(source), "--rounds", "3", "--warmup", "1", "--batch", "4",
                 "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    names = [t["name"] for t in document["timings"]]
    assert names == ["onnxruntime fp32", "onnxruntime int8", "packed"]
    assert all(t["runs"] == 3 and t["median_ms"] > 0 for t in document["timings"])
    assert document["batch"] == 4 and document["max_output_difference"] < 1e-3
    assert set(document["speedup"]) == {"onnxruntime fp32", "onnxruntime int8"}
    assert main(["bench", str(source)]) == 2  # not packed: a usage error
    assert "not packed" in capsys.readouterr().err


def test_speedups_are_medians_of_per_round_ratios():
    from onnxsparse.runtime.bench import round_speedups

    # slow phases (twice the time) hit rounds 3-5 of onnxruntime, rounds 4-5 of the packed model:
    # the ratio of the medians would say 100 / 27 = 3.7x; each round's ratio is 2 except round 3
    samples = {"ort": [50.0, 52.0, 100.0, 104.0, 102.0], "packed": [25.0, 26.0, 27.0, 52.0, 51.0]}
    assert round_speedups(samples) == {"ort": 2.0}


def test_the_whole_model_decision_keeps_a_variant_only_past_the_margin():
    from onnxsparse.runtime.costmodel import decide

    dense = [60.0, 62.0, 58.0, 61.0, 90.0, 59.0, 60.0, 63.0]

    def variant(speedup, slow_rounds=()):
        return [d / (0.5 if i in slow_rounds else speedup) for i, d in enumerate(dense)]

    # a clear win is kept at once; the best of several wins, measured again when a rival is close
    assert decide({"all sparse": variant(1.8), "all native": variant(2.2), "all dense": dense}) == ("all native", False)
    assert decide({"all sparse": variant(2.1), "all native": variant(2.2), "all dense": dense}) == ("all native", True)
    # close rivals: all sparse has the larger median speed-up (2.05 against 1.98) and even the smaller
    # median time, but all native is faster in 5 rounds of 8 (its median round 0.97 of all sparse's)
    native = [28.0, 30.8, 29.9, 32.1, 28.5, 27.0, 30.8, 32.4]
    sparse = [29.8, 35.9, 30.1, 29.0, 34.1, 30.7, 28.7, 28.9]
    assert decide({"all sparse": sparse, "all native": native, "all dense": dense}) == ("all native", True)
    # 1.25x is past the margin (1/0.85 = 1.18) but close to it: kept, and measured again
    assert decide({"all sparse": variant(1.25), "all dense": dense}) == ("all sparse", True)
    # 1.1x is below the margin, close to it: all dense, and measured again
    assert decide({"all sparse": variant(1.1), "all dense": dense}) == ("all dense", True)
    # fast in most rounds but slower than dense in 3 of 8 (the lower quartile below 1): all dense
    assert decide({"all sparse": variant(2.0, slow_rounds=(1, 3, 6)), "all dense": dense}) == ("all dense", False)
    assert decide({"all sparse": variant(0.7), "all dense": dense}) == ("all dense", False)
    assert decide({"all dense": dense}) == ("all dense", False)


def test_hostile_packed_tensors_stop_at_the_reader(digits_integer, tmp_path, capsys):
    good = packed(digits_integer)
    for position in (20, 40, -3):
        path = tmp_path / f"broken{position}.onnx"
        onnx.save(corrupt_packed(good, position), str(path))
        code = main(["run", str(path), "--random"])
        stderr = capsys.readouterr().err
        assert code == 1 and len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr, stderr


@pytest.mark.zoo
def test_zoo_model_packed_runs_like_onnxruntime(zoo_path, zoo_name, simd):
    model = onnxsparse.prune(onnxsparse.load_model(zoo_path(zoo_name)), "1x16", 0.8)
    session = InferenceSession(packed(model), threads=2)
    assert session.plan.sparse_layers
    feeds = {value.name: np.random.default_rng(0).standard_normal(
        [d.dim_value for d in value.type.tensor_type.shape.dim]).astype(np.float32) for value in model.graph.input
        if value.name not in {i.name for i in model.graph.initializer}}
    for got, expected in zip(session.run(None, feeds), ort_outputs(model, feeds)):
        assert_close(got, expected)


def region_reference(integer: onnx.ModelProto, region, inputs: list[np.ndarray]) -> list[np.ndarray]:
    """The reference executor on the region's own nodes alone."""
    from onnx import helper

    names = {name for chain in region.chains for name in chain.node_names}
    sub = onnx.ModelProto()
    sub.CopyFrom(integer)
    kept = [node for node in sub.graph.node if model_io.display_name(node) in names]
    del sub.graph.node[:]
    sub.graph.node.extend(kept)
    del sub.graph.input[:], sub.graph.output[:], sub.graph.value_info[:]
    sub.graph.input.extend(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(dtype), None)
                           for name, dtype in zip(region.inputs, region.input_types))
    sub.graph.output.extend(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(dtype), None)
                            for name, dtype in zip(region.outputs, region.output_types))
    return run_reference(sub, dict(zip(region.inputs, inputs)))


@pytest.mark.zoo
def test_zoo_model_packed_integer_regions_are_bit_exact(zoo_path, zoo_name):
    """Each native region returns exactly what the reference executor computes from the same
    inputs (taken from onnxruntime's run of the unpacked model, which runs the rest of the graph)."""
    from onnx import helper

    from onnxsparse.runner import random_inputs

    model = onnxsparse.prune(onnxsparse.load_model(zoo_path(zoo_name)), "1x16", 0.8)
    calibration = [{k: v[0] for k, v in random_inputs(model, seed).items()} for seed in range(2)]
    integer = lower_to_integer(quantize(model, calibration, weight_bits=7))
    session = InferenceSession(packed(integer), threads=2)
    regions = session.plan.partition.regions
    assert regions and session.plan.sparse_layers
    types = {name: dtype for region in regions for name, dtype in zip(region.inputs, region.input_types)}
    exposed = onnx.ModelProto()
    exposed.CopyFrom(integer)
    exposed.graph.output.extend(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(dtype), None)
                                for name, dtype in types.items())
    values = dict(zip(types, ort_outputs(exposed, random_inputs(model, 7))[len(integer.graph.output):]))
    for region in regions:
        inputs = [values[name] for name in region.inputs]
        for got, exact in zip(region(*inputs), region_reference(integer, region, inputs)):
            np.testing.assert_array_equal(got, exact)


def test_with_batch_frees_reshape_targets_written_for_batch_one():
    from onnx import TensorProto, helper, numpy_helper

    from onnxsparse.runtime.bench import with_batch

    node = helper.make_node("Reshape", ["x", "shape"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
                              [numpy_helper.from_array(np.array([1, 8], np.int64), "shape")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    x = np.arange(24, dtype=np.float32).reshape(3, 4, 2)
    np.testing.assert_array_equal(ort_outputs(with_batch(model, 3), {"x": x})[0], x.reshape(3, 8))


def test_regions_write_outputs_into_the_residual_or_a_dead_intermediate(monkeypatch):
    # a = conv1(x); b = conv2(a); c = conv3(b); d = conv4(c) + a; e = conv5(d): conv4 writes into a
    # (its residual, dead there), conv5 into c (dead, same shape, the newest spare), and both still
    # give onnxruntime's result
    from onnx import TensorProto, helper, numpy_helper

    from onnxsparse.runtime import steps

    rng = np.random.default_rng(4)
    names = ["conv1", "conv2", "conv3", "conv4", "conv5"]
    weights = [numpy_helper.from_array((rng.standard_normal((16, 16, 3, 3)) * 0.2).astype(np.float32), f"{n}_w")
               for n in names]
    conv = dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    nodes = [helper.make_node("Conv", ["x", "conv1_w"], ["a"], name="conv1", **conv),
             helper.make_node("Conv", ["a", "conv2_w"], ["b"], name="conv2", **conv),
             helper.make_node("Conv", ["b", "conv3_w"], ["c"], name="conv3", **conv),
             helper.make_node("Conv", ["c", "conv4_w"], ["c4"], name="conv4", **conv),
             helper.make_node("Add", ["c4", "a"], ["d"], name="add"),
             helper.make_node("Conv", ["d", "conv5_w"], ["e"], name="conv5", **conv)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16, 9, 9])],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2, 16, 9, 9])], weights)
    model = onnxsparse.prune(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
                             "1x16", 0.5)
    writes = {}
    run = steps.Chain.run

    def spy(chain, x, residual, out=None):
        writes[chain.label] = "residual" if out is not None and out is residual else "spare" if out is not None else None
        return run(chain, x, residual, out)

    monkeypatch.setattr(steps.Chain, "run", spy)
    session = InferenceSession(packed(model), threads=2)
    feeds = {"x": rng.standard_normal((2, 16, 9, 9)).astype(np.float32)}
    for _ in range(2):  # the second run starts without spares again
        assert_close(session.run(None, feeds)[0], ort_outputs(model, feeds)[0])
        assert writes == {"conv1": None, "conv2": None, "conv3": None, "conv4": "residual", "conv5": "spare"}
