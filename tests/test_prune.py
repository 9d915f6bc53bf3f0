"""The prune pass: layer selection, defaults, recipes, global scope, and exact patterns."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import onnxsparse
from onnxsparse import model as model_io
from onnxsparse.errors import OnnxSparseError, UsageError
from onnxsparse.sparsity.patterns import MatrixShape, parse_pattern
from pattern_invariants import check_pattern

ALL_PATTERNS = [("unstructured", 0.75), ("2:4", None), ("1x16", 0.75), ("bank:16", 0.75),
                ("mcbbs:c2r4", 0.75), ("kernel", 0.5), ("filter", 0.5), ("channel", 0.5)]


def conv_net(seed: int = 0) -> onnx.ModelProto:
    """input 1x3x8x8 -> conv 3->32 (first) -> relu -> depthwise 32 -> conv 32->64 -> flatten -> gemm 64*64->10."""
    rng = np.random.default_rng(seed)

    def weight(name, *shape):  # He-scaled, so layers differ in magnitude as trained ones do
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        return numpy_helper.from_array((rng.standard_normal(shape) * np.sqrt(2 / fan_in)).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "w_stem"], ["a"], name="stem", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["b"], name="relu"),
        helper.make_node("Conv", ["b", "w_dw"], ["c"], name="depthwise", group=32, pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["c", "w_body"], ["d"], name="body", strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Flatten", ["d"], ["e"], name="flatten"),
        helper.make_node("Gemm", ["e", "w_fc", "b_fc"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "conv_net",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 10])],
        [weight("w_stem", 32, 3, 3, 3), weight("w_dw", 32, 1, 3, 3), weight("w_body", 64, 32, 3, 3),
         weight("w_fc", 10, 64 * 16), weight("b_fc", 10)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def run(model: onnx.ModelProto, seed: int = 1) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((2, 3, 8, 8)).astype(np.float32)
    return model_io.onnxruntime_session(model).run(None, {"x": x})[0]


def layers_by_name(result: onnxsparse.PruneResult) -> dict[str, onnxsparse.LayerResult]:
    return {layer.node_name: layer for layer in result.layers}


def check_pruned_layers(result: onnxsparse.PruneResult) -> int:
    """Every layer the pass pruned meets its pattern exactly; returns how many were pruned."""
    pruned = 0
    for ref in model_io.find_weights(result.model):
        layer = layers_by_name(result)[ref.node_name]
        if layer.pattern == "dense":
            continue
        layout = ref.layout
        shape = MatrixShape(layout.out_channels, layout.kernel_positions, layout.strip_length)
        check_pattern(model_io.read_matrix(result.model, ref), shape, parse_pattern(layer.pattern),
                      layer.target_sparsity)
        pruned += 1
    return pruned


@pytest.mark.parametrize("spec,sparsity", ALL_PATTERNS)
def test_every_pattern_prunes_a_valid_runnable_model(spec, sparsity):
    model = conv_net()
    result = onnxsparse.prune_model(model, spec, sparsity)
    onnx.checker.check_model(result.model, full_check=True)
    assert run(result.model).shape == run(model).shape
    assert check_pruned_layers(result) >= 1


def test_input_model_is_not_modified():
    model = conv_net()
    before = model.SerializeToString()
    onnxsparse.prune(model, "unstructured", 0.9)
    assert model.SerializeToString() == before


@pytest.mark.parametrize("spec", ["unstructured", "1x16", "bank:16", "mcbbs:c2r4", "kernel", "filter", "channel"])
def test_sparsity_zero_leaves_outputs_bit_identical(spec):
    model = conv_net()
    pruned = onnxsparse.prune(model, spec, 0.0, include=".*")
    assert np.array_equal(run(pruned), run(model))


def test_first_conv_and_depthwise_stay_dense_unless_named():
    layers = layers_by_name(onnxsparse.prune_model(conv_net(), "unstructured", 0.5))
    assert layers["stem"].pattern == "dense" and "first conv" in layers["stem"].note
    assert layers["depthwise"].pattern == "dense" and "depthwise" in layers["depthwise"].note
    assert layers["body"].sparsity == pytest.approx(0.5)
    named = layers_by_name(onnxsparse.prune_model(conv_net(), "unstructured", 0.5, include="stem|depthwise"))
    assert named["stem"].sparsity == pytest.approx(0.5) and named["depthwise"].sparsity == pytest.approx(0.5)


def test_layers_too_small_for_the_pattern_are_skipped_with_a_note():
    layers = layers_by_name(onnxsparse.prune_model(conv_net(), "1x16", 0.5, include="stem"))
    assert layers["fc"].pattern == "dense"
    assert "too small for 1x16" in layers["fc"].note and "10 output channels" in layers["fc"].note
    assert layers["stem"].pattern == "1x16"


def test_exclude_keeps_matching_layers_dense():
    layers = layers_by_name(onnxsparse.prune_model(conv_net(), "unstructured", 0.5, exclude="^fc$"))
    assert layers["fc"].pattern == "dense" and layers["fc"].note == "excluded"
    assert layers["body"].pattern == "unstructured"


def test_recipe_sets_pattern_per_layer_and_first_matching_rule_wins():
    recipe = {"defaults": {"criterion": "l2"},
              "layers": [{"match": "^body$", "pattern": "mcbbs:c2r4", "sparsity": 0.5},
                         {"match": "body|fc", "pattern": "unstructured", "sparsity": 0.9},
                         {"match": "stem", "pattern": "dense"}]}
    result = onnxsparse.prune_model(conv_net(), recipe=recipe)
    layers = layers_by_name(result)
    assert layers["body"].pattern == "mcbbs:c2r4" and layers["body"].sparsity == pytest.approx(0.5)
    assert layers["fc"].pattern == "unstructured" and layers["fc"].sparsity == pytest.approx(0.9)
    assert layers["stem"].pattern == "dense" and layers["depthwise"].pattern == "dense"
    check_pruned_layers(result)


def test_recipe_file_is_read_and_validated(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("layers:\n  - match: body\n    pattern: '2:4'\n")
    assert layers_by_name(onnxsparse.prune_model(conv_net(), recipe=recipe))["body"].pattern == "2:4"
    recipe.write_text("layers:\n  - match: body\n    patern: '2:4'\n")
    with pytest.raises(UsageError, match="patern"):
        onnxsparse.prune_model(conv_net(), recipe=recipe)


@pytest.mark.parametrize("options,message", [
    (dict(recipe={"layers": [{"match": "nothing_like_this"}]}), "matches no weight-bearing node"),
    (dict(pattern="unstructured", sparsity=0.5, exclude="nothing_like_this"), "--exclude"),
    (dict(pattern="unstructured", sparsity=0.5, exclude="("), "not a valid regex"),
    (dict(pattern="unstructured"), "needs a sparsity"),
    (dict(pattern="mcbbs:c2r4", sparsity=0.8), "use one of 0, 0.25, 0.5, 0.75"),
    (dict(pattern="2:4", sparsity=0.75), "fixes sparsity"),
    (dict(pattern="2:4", scope="global"), "global scope"),
    (dict(pattern="unstructured", sparsity=0.5, cap_mismatched=1.5), "outside"),
    (dict(), "give a pattern"),
])
def test_impossible_requests_are_usage_errors(options, message):
    with pytest.raises(UsageError, match=message):
        onnxsparse.prune_model(conv_net(), **options)


def test_model_without_prunable_weights_is_an_error():
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])])
    with pytest.raises(OnnxSparseError, match="no prunable weights"):
        onnxsparse.prune(helper.make_model(graph), "unstructured", 0.5)


def test_cap_mismatched_limits_layers_whose_channel_counts_differ():
    layers = layers_by_name(onnxsparse.prune_model(conv_net(), "mcbbs:c2r4", 0.75, cap_mismatched=0.5))
    assert layers["body"].target_sparsity == 0.5 and "capped" in layers["body"].note  # 32 in, 64 out
    assert layers["fc"].target_sparsity == 0.5


@pytest.mark.parametrize("spec", ["unstructured", "1x16", "bank:16", "mcbbs:c2r4", "filter"])
def test_global_scope_reaches_the_target_over_all_layers_it_ranks(spec):
    target = 0.75
    result = onnxsparse.prune_model(conv_net(), spec, target, scope="global", include=".*")
    ranked = [layer for layer in result.layers if layer.note == "global"]
    sizes = np.array([np.prod(layer.weight_shape) for layer in ranked])
    achieved = float((np.array([layer.sparsity for layer in ranked]) * sizes).sum() / sizes.sum())
    tolerance = 0.02 if spec == "unstructured" else 0.15  # group patterns round per layer
    assert achieved == pytest.approx(target, abs=tolerance)
    if spec == "unstructured":  # group patterns may round every layer to the same step
        assert len({round(layer.sparsity, 3) for layer in ranked}) > 1
    check_pruned_layers(result)


def test_global_unstructured_prunes_the_smallest_magnitudes_model_wide():
    model = conv_net()
    scaled = onnx.ModelProto()
    scaled.CopyFrom(model)
    for init in scaled.graph.initializer:  # make fc's weights tiny: global pruning takes them first
        if init.name == "w_fc":
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1e-3, "w_fc"))
    layers = layers_by_name(onnxsparse.prune_model(scaled, "unstructured", 0.3, scope="global"))
    fc_size, body_size = 10 * 1024, 64 * 32 * 9  # stem and depthwise stay dense and are not ranked
    zeros = layers["fc"].sparsity * fc_size + layers["body"].sparsity * body_size
    assert zeros == pytest.approx(0.3 * (fc_size + body_size), abs=1)
    assert layers["fc"].sparsity > 0.8 and layers["body"].sparsity < 0.01


def test_pruning_a_quantized_weight_zeroes_its_integers():
    model = conv_net()
    body = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "w_body"))
    scale = np.abs(body).reshape(64, -1).max(axis=1) / 127
    quantized = np.clip(np.rint(body / scale[:, None, None, None]), -127, 127).astype(np.int8)
    quantized[quantized == 0] = 1  # no zeros before pruning, so every zero after it is the pattern's
    graph = model.graph
    graph.initializer.extend([numpy_helper.from_array(quantized, "w_body_q"),
                              numpy_helper.from_array(scale.astype(np.float32), "w_body_scale")])
    graph.node.insert(0, helper.make_node("DequantizeLinear", ["w_body_q", "w_body_scale"], ["w_body_dq"], axis=0))
    next(n for n in graph.node if n.name == "body").input[1] = "w_body_dq"
    model_io.remove_unused(model)
    result = onnxsparse.prune_model(model, "1x16", 0.5)
    stored = numpy_helper.to_array(next(i for i in result.model.graph.initializer if i.name == "w_body_q"))
    assert stored.dtype == np.int8
    assert np.count_nonzero(stored) == pytest.approx(stored.size / 2, rel=0.02)
    assert np.array_equal(stored[stored != 0], quantized[stored != 0])
    check_pruned_layers(result)


@pytest.mark.parametrize("spec,sparsity", ALL_PATTERNS)
def test_every_pattern_on_the_digits_model_is_exact_valid_and_runs(digits_model, digits_test, spec, sparsity):
    result = onnxsparse.prune_model(digits_model, spec, sparsity, include=".*")
    onnx.checker.check_model(result.model, full_check=True)
    session = model_io.onnxruntime_session(result.model)
    logits = session.run(None, {"input": digits_test.inputs[:8]})[0]
    assert logits.shape == (8, 10) and np.isfinite(logits).all()
    assert check_pruned_layers(result) >= 5


def test_sparsity_zero_on_the_digits_model_leaves_outputs_bit_identical(digits_model, digits_test):
    pruned = onnxsparse.prune(digits_model, "unstructured", 0.0, include=".*")
    dense = model_io.onnxruntime_session(digits_model).run(None, {"input": digits_test.inputs})[0]
    after = model_io.onnxruntime_session(pruned).run(None, {"input": digits_test.inputs})[0]
    assert np.array_equal(dense, after)
