"""The ONNX model zoo architectures shipped inside the onnx package, made runnable.

onnx ships ResNet-50, VGG-19, DenseNet-121, Inception v1/v2, ShuffleNet, SqueezeNet, AlexNet and
ZFNet under onnx/backend/test/data/light/ with every weight a ConstantOfShape filled with 0.02.
`materialize` replaces those with seeded He-initialized weights (normal, std sqrt(2/fan_in)),
biases 0, batch norms the identity (scale 1, bias 0, mean 0, variance 1), upgrades the model to
a working opset, and caches it outside git. The result is a real-sized structure and speed corpus;
its outputs mean nothing.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxsparse import model as model_io
from onnxsparse.errors import UsageError

ZOO_MODELS = {
    "resnet50": "light_resnet50.onnx",
    "vgg19": "light_vgg19.onnx",
    "densenet121": "light_densenet121.onnx",
    "inception_v1": "light_inception_v1.onnx",
    "inception_v2": "light_inception_v2.onnx",
    "shufflenet": "light_shufflenet.onnx",
    "squeezenet": "light_squeezenet.onnx",
    "alexnet": "light_bvlc_alexnet.onnx",
    "zfnet512": "light_zfnet512.onnx",
}
# Bump when materialization changes, so stale cached models are rebuilt.
MATERIALIZE_VERSION = 3


def cache_dir() -> Path:
    """$ONNXSPARSE_CACHE, else $XDG_CACHE_HOME/onnxsparse, else ~/.cache/onnxsparse."""
    if os.environ.get("ONNXSPARSE_CACHE"):
        return Path(os.environ["ONNXSPARSE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "onnxsparse"


def light_model_path(name: str) -> Path:
    if name not in ZOO_MODELS:
        raise UsageError(f"unknown zoo model {name!r}; use one of: {', '.join(ZOO_MODELS)}")
    return Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / ZOO_MODELS[name]


def zoo_model_path(name: str, seed: int = 0, directory: Path | None = None) -> Path:
    """Path of the materialized model, creating it (once) when missing."""
    directory = Path(directory) if directory is not None else cache_dir() / "zoo"
    path = directory / f"{name}-seed{seed}-v{MATERIALIZE_VERSION}.onnx"
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        model_io.save_model(materialize(name, seed), path)
    return path


def materialize(name: str, seed: int = 0) -> onnx.ModelProto:
    """The zoo model `name` with seeded weights in place of its ConstantOfShape placeholders."""
    # Upgrade while the weights are still placeholders: converting is cheap then. It also
    # unlists initializers from the graph inputs (IR 3), which must happen before pruning them.
    model = model_io.upgrade_model(onnx.load(str(light_model_path(name))), source=name)
    graph = model.graph
    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for position, tensor in enumerate(node.input):
            consumers.setdefault(tensor, []).append((node, position))

    kept_nodes, new_initializers = [], []
    for node in graph.node:
        if node.op_type != "ConstantOfShape" or node.input[0] not in constants:
            kept_nodes.append(node)
            continue
        shape = tuple(int(d) for d in constants[node.input[0]])
        output = node.output[0]
        rng = np.random.default_rng([seed, zlib.crc32(output.encode())])
        value = _initial_value(output, shape, consumers, rng)
        new_initializers.append(numpy_helper.from_array(value.astype(np.float32), output))
    placeholders = {init.name for init in new_initializers}  # the ConstantOfShape outputs just replaced
    for node in kept_nodes:
        node.name = _readable_name(node, placeholders)
    del graph.node[:]
    graph.node.extend(kept_nodes)
    graph.initializer.extend(new_initializers)
    model_io.remove_unused(model)
    model.producer_name = "onnxsparse.zoo"
    helper.set_model_props(model, {"onnxsparse.zoo": f"{name} seed={seed} v{MATERIALIZE_VERSION}"})
    onnx.checker.check_model(model)
    return model


def _readable_name(node: onnx.NodeProto, placeholders: set[str]) -> str:
    """Weight-bearing nodes are named after their weight ("gpu_0/res2_0_branch2a_w_0" ->
    "res2_0_branch2a", "fire2/squeeze1x1_w_0" -> "fire2/squeeze1x1"), which is unique; the light
    models name every node "n<k>"."""
    if node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and len(node.input) > 1 \
            and node.input[1] in placeholders:
        weight = node.input[1].removeprefix("gpu_0/")
        return weight[: -len("_w_0")] if weight.endswith("_w_0") else weight
    return node.name


def _initial_value(tensor: str, shape: tuple[int, ...], consumers, rng: np.random.Generator) -> np.ndarray:
    """He-normal for weights, identity for normalizations, zeros for biases, by the tensor's use."""
    node, position = _first_real_consumer(tensor, consumers)
    op = node.op_type if node is not None else ""
    if (op in ("Conv", "ConvTranspose") and position == 1) or (op in ("Gemm", "MatMul") and position in (0, 1)):
        fan_in = _fan_in(node, position, shape)
        return rng.normal(0.0, np.sqrt(2.0 / fan_in), size=shape)
    if op == "BatchNormalization":
        return np.ones(shape) if position in (1, 4) else np.zeros(shape)  # scale, var | bias, mean
    if op in ("Mul", "Div"):
        return np.ones(shape)
    return np.zeros(shape)  # biases, additive shifts


def _first_real_consumer(tensor: str, consumers):
    """The consumer that gives the tensor its meaning, looking through shape-only ops."""
    for _ in range(8):
        uses = consumers.get(tensor, [])
        if not uses:
            return None, -1
        node, position = uses[0]
        if node.op_type not in ("Unsqueeze", "Squeeze", "Reshape", "Identity", "Cast") or position != 0:
            return node, position
        tensor = node.output[0]
    return None, -1


def _fan_in(node: onnx.NodeProto, position: int, shape: tuple[int, ...]) -> int:
    if node.op_type == "Conv":
        return max(1, int(np.prod(shape[1:])))
    if node.op_type == "ConvTranspose":
        return max(1, shape[0] * int(np.prod(shape[2:])))
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Gemm" and position == 1:
        return shape[1] if attrs.get("transB", 0) else shape[0]
    if node.op_type == "Gemm":
        return shape[0] if attrs.get("transA", 0) else shape[1]
    return shape[0] if position == 1 else shape[-1]
