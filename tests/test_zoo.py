"""Every pattern on the materialized zoo models (CI: ResNet-50 and SqueezeNet; --zoo=all: all)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnxsparse
from onnxsparse import model as model_io
from onnxsparse.report.stats import model_stats
from test_prune import ALL_PATTERNS, check_pruned_layers

pytestmark = pytest.mark.zoo


def outputs(model: onnx.ModelProto) -> list[np.ndarray]:
    session = model_io.onnxruntime_session(model, threads=2)
    feed = {}
    for value in session.get_inputs():
        shape = [d if isinstance(d, int) else 1 for d in value.shape]
        feed[value.name] = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    return session.run(None, feed)


@pytest.fixture(scope="module")
def zoo_models(zoo_path):
    cache: dict[str, tuple[onnx.ModelProto, list[np.ndarray]]] = {}

    def get(name):
        if name not in cache:
            model = onnxsparse.load_model(zoo_path(name))
            cache[name] = model, outputs(model)
        return cache[name]

    return get


@pytest.mark.parametrize("spec,sparsity", ALL_PATTERNS)
def test_every_pattern_on_zoo_model_is_exact_valid_and_runs(zoo_models, zoo_name, spec, sparsity):
    model, dense_outputs = zoo_models(zoo_name)
    result = onnxsparse.prune_model(model, spec, sparsity, include=".*")  # depthwise and first convs too
    onnx.checker.check_model(result.model)
    assert [out.shape for out in outputs(result.model)] == [out.shape for out in dense_outputs]
    assert check_pruned_layers(result) > 0


def test_sparsity_zero_on_zoo_model_leaves_outputs_bit_identical(zoo_models, zoo_name):
    model, dense_outputs = zoo_models(zoo_name)
    pruned = onnxsparse.prune(model, "unstructured", 0.0, include=".*")
    for before, after in zip(dense_outputs, outputs(pruned)):
        assert np.array_equal(before, after)


def test_resnet50_stats_match_the_published_size(zoo_path):
    stats = model_stats(onnxsparse.load_model(zoo_path("resnet50")))
    assert len(stats.layers) == 54  # 53 convs and the classifier
    assert stats.params == 25_502_912  # conv and fc weights
    assert stats.model_params == pytest.approx(25.6e6, rel=0.005)  # with biases and batch norms
    assert stats.dense_macs == pytest.approx(4.1e9, rel=0.01)
    assert stats.dense_macs == stats.effective_macs
