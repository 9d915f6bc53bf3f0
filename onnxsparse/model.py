"""Model I/O and the one place that finds weight-bearing nodes and reads/writes their weights.

Everything else in onnxsparse sees a weight only as the matrix W[O, K] (see WeightLayout) and
never cares whether it was stored as an initializer, a Constant node, behind Identity/Cast/
Reshape/Transpose, or as DequantizeLinear of an integer tensor.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxsparse.errors import OnnxSparseError, UsageError

# Models older than MIN_OPSET are converted to TARGET_OPSET on load (the zoo models are opset 9).
MIN_OPSET = 13
TARGET_OPSET = 17
# Protobuf cannot serialize a message of 2 GiB or more; past this size weights go to external data.
EXTERNAL_DATA_THRESHOLD_BYTES = 1_800_000_000


# ---------------------------------------------------------------------------------------------
# Loading, upgrading, saving
# ---------------------------------------------------------------------------------------------


def load_model(path: str | os.PathLike, *, upgrade: bool = True) -> onnx.ModelProto:
    """Read and validate an ONNX model (external data included); upgrade old opsets and IR."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf's DecodeError and friends, truncated external data
        raise OnnxSparseError(
            f"{path}: not a readable ONNX model ({_first_line(exc)}); check the file is complete"
        ) from exc
    if not model.graph.node:
        raise OnnxSparseError(f"{path}: not an ONNX model (no graph nodes); check the file")
    try:
        # protobuf cannot hold 2 GB in one message: the checker reads large models from the file
        onnx.checker.check_model(model if _fits_in_protobuf(model) else str(path))
    except Exception as exc:
        raise OnnxSparseError(f"{path}: invalid ONNX model: {_first_line(exc)}") from exc
    if upgrade:
        model = upgrade_model(model, source=str(path))
    return model


def upgrade_model(model: onnx.ModelProto, *, source: str = "model") -> onnx.ModelProto:
    """Bring an old model to a working form: IR >= 4 and opset >= MIN_OPSET.

    IR 3 had to list every initializer as a graph input too; from IR 4 on that would make them
    overridable inputs rather than constants, so they are unlisted.
    """
    if model.ir_version < 4:
        initializer_names = {init.name for init in model.graph.initializer}
        graph_inputs = [inp for inp in model.graph.input if inp.name not in initializer_names]
        del model.graph.input[:]
        model.graph.input.extend(graph_inputs)
        model.ir_version = 4
    if default_opset(model) < MIN_OPSET:
        try:
            model = onnx.version_converter.convert_version(model, TARGET_OPSET)
        except Exception as exc:
            raise OnnxSparseError(
                f"{source}: cannot upgrade opset {default_opset(model)} to {TARGET_OPSET}: "
                f"{_first_line(exc)}; convert the model with a newer exporter"
            ) from exc
    return model


def default_opset(model: onnx.ModelProto) -> int:
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            return opset.version
    return 1


def save_model(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Write atomically (temp files + rename); weights go to external data past ~2 GB."""
    path = Path(path)
    if path.parent and not path.parent.is_dir():
        raise UsageError(f"{path}: the folder {path.parent} does not exist")
    external = not _fits_in_protobuf(model)
    data_name = path.name + ".data"
    staging = Path(tempfile.mkdtemp(prefix=".onnxsparse-", dir=path.parent))
    try:
        staged_model = staging / path.name
        if external:
            unchanged = onnx.ModelProto()  # onnx moves the weights out of the proto it saves
            unchanged.CopyFrom(model)
            onnx.save_model(unchanged, str(staged_model), save_as_external_data=True,
                            all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
            if (staging / data_name).exists():  # absent when every tensor is under size_threshold
                os.replace(staging / data_name, path.parent / data_name)
        else:
            onnx.save_model(model, str(staged_model))
        os.replace(staged_model, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when two paths name the same file (existing or not)."""
    return Path(a).resolve() == Path(b).resolve()


# Integer operators whose output shape is that of a float twin: (twin, data inputs, attributes kept).
_FLOAT_TWINS = {
    "QLinearConv": ("Conv", (0, 3, 8), None),
    "QLinearMatMul": ("MatMul", (0, 3), None),
    "QGemm": ("Gemm", (0, 3, 6), ("transA", "transB", "alpha")),
    "QLinearAdd": ("Add", (0, 3), ()),
    "QLinearGlobalAveragePool": ("GlobalAveragePool", (0,), ()),
    "QLinearAveragePool": ("AveragePool", (0,), ("auto_pad", "ceil_mode", "count_include_pad", "kernel_shape",
                                                  "pads", "strides")),
}


def _shape_twin(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with each integer operator replaced by its float twin on float-cast inputs: the
    same output shapes, in a form onnx's shape inference knows (it has no com.microsoft ops)."""
    twin = onnx.ModelProto()
    twin.CopyFrom(model)
    nodes = []
    for node in twin.graph.node:
        if node.op_type == "QLinearConcat":
            op_type, positions, kept = "Concat", tuple(range(2, len(node.input), 3)), ("axis",)
        elif node.op_type in _FLOAT_TWINS:
            op_type, positions, kept = _FLOAT_TWINS[node.op_type]
        else:
            nodes.append(node)
            continue
        inputs = []
        for position in positions:
            if position < len(node.input) and node.input[position]:
                cast = f"{node.input[position]}__as_float_{len(nodes)}"
                nodes.append(helper.make_node("Cast", [node.input[position]], [cast], to=onnx.TensorProto.FLOAT))
                inputs.append(cast)
        attributes = [a for a in node.attribute if kept is None or a.name in kept]
        replacement = helper.make_node(op_type, inputs, list(node.output[:1]))
        replacement.attribute.extend(attributes)
        nodes.append(replacement)
    del twin.graph.node[:]
    twin.graph.node.extend(nodes)
    return twin


def infer_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...] | None]:
    """Shapes of every tensor at batch 1: symbolic or unknown dimensions count as 1."""
    try:
        inferred = onnx.shape_inference.infer_shapes(_shape_twin(model), data_prop=True)
    except Exception:
        inferred = model
    shapes: dict[str, tuple[int, ...] | None] = {}
    graph = inferred.graph
    for value in list(graph.input) + list(graph.value_info) + list(graph.output):
        tensor_type = value.type.tensor_type
        if not tensor_type.HasField("shape"):
            shapes[value.name] = None
            continue
        shapes[value.name] = tuple(
            dim.dim_value if dim.HasField("dim_value") and dim.dim_value > 0 else 1
            for dim in tensor_type.shape.dim
        )
    for init in graph.initializer:
        shapes[init.name] = tuple(init.dims)
    return shapes


# onnx's inference has no com.microsoft operators: their output takes the element type of this
# input (the output zero point), and the types they give let it go on past them
_OUTPUT_ZERO_POINT = {"QLinearAdd": 7, "QLinearMul": 7, "QGemm": 8, "QLinearAveragePool": 4,
                      "QLinearGlobalAveragePool": 4, "QLinearConcat": 1, "QLinearSigmoid": 4,
                      "QLinearLeakyRelu": 4}


def element_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type (onnx.TensorProto code) of every tensor onnx can type, past com.microsoft
    quantized operators too."""
    typed = _weightless(model)  # inference serializes the model on every pass
    types: dict[str, int] = {}
    for _ in range(len(model.graph.node) + 1):  # each pass types at least one more operator, or stops
        graph = onnx.shape_inference.infer_shapes(typed).graph
        types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.value_info, *graph.output]
                 if v.type.tensor_type.elem_type}
        types.update({init.name: init.data_type for init in model.graph.initializer})
        found = {}
        for node in model.graph.node:
            position = _OUTPUT_ZERO_POINT.get(node.op_type) if node.domain == "com.microsoft" else None
            if position is None or not node.output or node.output[0] in types:
                continue
            zero_point = node.input[position] if position < len(node.input) else ""
            # QGemm without an output scale and zero point gives float
            found[node.output[0]] = types.get(zero_point) if zero_point else onnx.TensorProto.FLOAT
        found = {name: kind for name, kind in found.items() if kind}
        if not found:
            break
        typed.graph.value_info.extend(helper.make_empty_tensor_value_info(name) for name in found)
        for value in typed.graph.value_info[-len(found):]:
            value.type.tensor_type.elem_type = found[value.name]
    return types


def check_model(model: onnx.ModelProto) -> None:
    """onnx.checker on an in-memory model; past protobuf's 2 GB only what fits is checked (node
    and graph structure), since the checker cannot take such a message."""
    if _fits_in_protobuf(model):
        onnx.checker.check_model(model)
        return
    onnx.checker.check_model(_weightless(model))


def _weightless(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with each initializer turned into a graph input of the same name, type and shape."""
    structure = onnx.ModelProto()
    structure.CopyFrom(model)
    graph = structure.graph
    listed = {value.name for value in graph.input}  # before IR 4, initializers are inputs too
    graph.input.extend(helper.make_tensor_value_info(init.name, init.data_type, init.dims)
                       for init in graph.initializer if init.name not in listed)
    del graph.initializer[:]
    return structure


def _fits_in_protobuf(model: onnx.ModelProto) -> bool:
    return _weight_bytes(model) <= EXTERNAL_DATA_THRESHOLD_BYTES


def _weight_bytes(model: onnx.ModelProto) -> int:
    total = 0
    for init in model.graph.initializer:
        if init.HasField("raw_data"):
            total += len(init.raw_data)
        else:
            total += int(np.prod(init.dims, dtype=np.int64)) * 4
    return total


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


# ---------------------------------------------------------------------------------------------
# The weight view W[O, K]
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightLayout:
    """How an ONNX weight maps to W[O, K] with K = kernel_positions strips of strip_length.

    kind: "conv" W[O, I/g, *k]; "conv_transpose" W[I, O/g, *k]; "rows" W[O, K]; "cols" W[K, O].
    For convolutions K runs channels-last, (kh, kw, i), so each strip is one kernel position.
    """

    kind: str
    onnx_shape: tuple[int, ...]
    groups: int = 1

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        return self.onnx_shape[2:] if self.kind in ("conv", "conv_transpose") else ()

    @property
    def kernel_positions(self) -> int:
        return int(np.prod(self.kernel_shape, dtype=np.int64))

    @property
    def out_channels(self) -> int:
        if self.kind == "conv":
            return self.onnx_shape[0]
        if self.kind == "conv_transpose":
            return self.onnx_shape[1] * self.groups
        return self.onnx_shape[0] if self.kind == "rows" else self.onnx_shape[1]

    @property
    def strip_length(self) -> int:
        """Input channels per group (convolutions) or the whole reduction length (matrices)."""
        if self.kind == "conv":
            return self.onnx_shape[1]
        if self.kind == "conv_transpose":
            return self.onnx_shape[0] // self.groups
        return self.onnx_shape[1] if self.kind == "rows" else self.onnx_shape[0]

    @property
    def in_channels(self) -> int:
        """All input channels (across groups) for convolutions; K for matrices."""
        if self.kind in ("conv", "conv_transpose"):
            return self.strip_length * self.groups
        return self.strip_length

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return self.out_channels, self.kernel_positions * self.strip_length

    def to_matrix(self, weight: np.ndarray) -> np.ndarray:
        """ONNX layout -> W[O, K] (a copy)."""
        if self.kind == "conv":
            spatial = tuple(range(2, weight.ndim))
            return np.ascontiguousarray(weight.transpose((0, *spatial, 1))).reshape(self.matrix_shape)
        if self.kind == "conv_transpose":
            in_channels, out_per_group = weight.shape[:2]
            grouped = weight.reshape(self.groups, in_channels // self.groups, out_per_group,
                                     *self.kernel_shape)
            spatial = tuple(range(3, grouped.ndim))
            return np.ascontiguousarray(grouped.transpose((0, 2, *spatial, 1))).reshape(self.matrix_shape)
        if self.kind == "rows":
            return np.array(weight, copy=True)
        return np.ascontiguousarray(weight.T)

    def from_matrix(self, matrix: np.ndarray) -> np.ndarray:
        """W[O, K] -> ONNX layout; exact inverse of to_matrix."""
        if matrix.shape != self.matrix_shape:
            raise ValueError(f"matrix shape {matrix.shape} != {self.matrix_shape}")
        if self.kind == "conv":
            out_channels, in_per_group = self.onnx_shape[:2]
            channels_last = matrix.reshape(out_channels, *self.kernel_shape, in_per_group)
            order = (0, channels_last.ndim - 1, *range(1, channels_last.ndim - 1))
            return np.ascontiguousarray(channels_last.transpose(order))
        if self.kind == "conv_transpose":
            in_channels, out_per_group = self.onnx_shape[:2]
            grouped = matrix.reshape(self.groups, out_per_group, *self.kernel_shape,
                                     in_channels // self.groups)
            last = grouped.ndim - 1
            order = (0, last, 1, *range(2, last))
            return np.ascontiguousarray(grouped.transpose(order)).reshape(self.onnx_shape)
        if self.kind == "rows":
            return np.array(matrix, copy=True)
        return np.ascontiguousarray(matrix.T)


# ---------------------------------------------------------------------------------------------
# Resolving where a constant tensor comes from, and writing it back there
# ---------------------------------------------------------------------------------------------

_CHAIN_OPS = ("Identity", "Cast", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "DequantizeLinear")


@dataclass(frozen=True)
class _Step:
    """One invertible op between a stored tensor and the weight a node consumes."""

    node_index: int
    op_type: str
    input_shape: tuple[int, ...]
    input_dtype: np.dtype
    perm: tuple[int, ...] = ()
    scale: np.ndarray | None = None
    zero_point: np.ndarray | None = None

    def forward(self, value: np.ndarray, output_dtype: np.dtype) -> np.ndarray:
        if self.op_type == "DequantizeLinear":
            return ((value.astype(np.int32) - self.zero_point.astype(np.int32)) * self.scale).astype(output_dtype)
        if self.op_type == "Transpose":
            return value.transpose(self.perm)
        return value.astype(output_dtype)  # Identity, Cast (reshaping ops reshape in GraphIndex.resolve)

    def inverse(self, value: np.ndarray) -> np.ndarray:
        if self.op_type == "DequantizeLinear":
            info = np.iinfo(self.input_dtype)
            quantized = np.rint(value.astype(np.float64) / self.scale) + self.zero_point.astype(np.float64)
            return np.clip(quantized, info.min, info.max).astype(self.input_dtype)
        if self.op_type == "Transpose":
            return value.transpose(np.argsort(self.perm))
        return value.astype(self.input_dtype).reshape(self.input_shape)


@dataclass(frozen=True)
class _Source:
    """Where a constant tensor is stored: an initializer, a Constant node, or a ConstantOfShape."""

    kind: str  # "initializer" | "constant" | "constant_of_shape"
    name: str  # initializer name, or the producing node's output name
    node_index: int = -1


@dataclass(frozen=True)
class WeightRef:
    """A weight-bearing node's weight: which node, which input, and how it is stored."""

    node_name: str
    node_index: int
    op_type: str
    input_index: int
    tensor_name: str
    layout: WeightLayout
    source: _Source
    chain: tuple[_Step, ...]
    dtype: np.dtype  # dtype the node consumes
    storage_dtype: np.dtype  # dtype it is stored in (int8 behind DequantizeLinear, fp16 behind Cast)
    data_input: str  # the activation the node multiplies the weight with

    @property
    def quantized(self) -> bool:
        return any(step.op_type == "DequantizeLinear" for step in self.chain)


class GraphIndex:
    """Lookups over one graph: producers, consumers, initializers."""

    def __init__(self, model: onnx.ModelProto):
        self.graph = model.graph
        self.initializers = {init.name: init for init in self.graph.initializer}
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = {}
        for index, node in enumerate(self.graph.node):
            for out in node.output:
                self.producer[out] = index
            for inp in node.input:
                self.consumers.setdefault(inp, []).append(index)
        self.graph_outputs = {out.name for out in self.graph.output}
        # An initializer also listed as a graph input is a default the caller may override: not constant.
        self.graph_inputs = {inp.name for inp in self.graph.input}

    def uses(self, name: str) -> int:
        return len(self.consumers.get(name, [])) + (name in self.graph_outputs)

    def constant(self, name: str) -> np.ndarray | None:
        """The value of a tensor computable from stored constants alone, else None."""
        resolved = self.resolve(name)
        return None if resolved is None else resolved[0]

    def resolve(self, name: str) -> tuple[np.ndarray, _Source, tuple[_Step, ...]] | None:
        """Value, storage and the chain of invertible steps from storage to `name`."""
        if name in self.graph_inputs:
            return None
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name]), _Source("initializer", name), ()
        index = self.producer.get(name)
        if index is None:
            return None
        node = self.graph.node[index]
        if node.op_type == "Constant":
            value = _constant_node_value(node)
            return (None if value is None else (value, _Source("constant", name, index), ()))
        if node.op_type == "ConstantOfShape":
            shape = self.constant(node.input[0])
            if shape is None:
                return None
            fill = next((numpy_helper.to_array(a.t) for a in node.attribute if a.name == "value"),
                        np.zeros(1, np.float32))
            return np.full(tuple(int(d) for d in shape), fill.reshape(-1)[0], dtype=fill.dtype), \
                _Source("constant_of_shape", name, index), ()
        if node.op_type not in _CHAIN_OPS:
            return None
        inner = self.resolve(node.input[0])
        if inner is None:
            return None
        value, source, chain = inner
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        step_kwargs = dict(node_index=index, op_type=node.op_type, input_shape=value.shape,
                           input_dtype=value.dtype)
        if node.op_type == "Identity":
            step, out_dtype = _Step(**step_kwargs), value.dtype
        elif node.op_type == "Cast":
            step, out_dtype = _Step(**step_kwargs), helper.tensor_dtype_to_np_dtype(attrs["to"])
        elif node.op_type == "Transpose":
            perm = tuple(attrs.get("perm", range(value.ndim - 1, -1, -1)))
            step, out_dtype = _Step(**step_kwargs, perm=perm), value.dtype
        elif node.op_type == "Reshape":
            target = self.constant(node.input[1])
            if target is None:
                return None
            shape = _reshape_target(value.shape, [int(d) for d in target], attrs.get("allowzero", 0))
            return value.reshape(shape), source, chain + (_Step(**step_kwargs),)
        elif node.op_type in ("Squeeze", "Unsqueeze"):  # a reshape whose axes are an input (opset 13+) or attribute
            axes = self.constant(node.input[1]) if len(node.input) > 1 and node.input[1] else attrs.get("axes")
            if axes is None and node.op_type == "Unsqueeze":
                return None
            if node.op_type == "Squeeze":
                squeezed = None if axes is None else tuple(int(a) % value.ndim for a in np.ravel(axes))
                return np.squeeze(value, axis=squeezed), source, chain + (_Step(**step_kwargs),)
            rank = value.ndim + len(np.ravel(axes))
            return np.expand_dims(value, tuple(int(a) % rank for a in np.ravel(axes))), source, \
                chain + (_Step(**step_kwargs),)
        else:  # DequantizeLinear
            dq = self._dequantize_params(node, value, attrs)
            if dq is None:
                return None
            scale, zero_point = dq
            step = _Step(**step_kwargs, scale=scale, zero_point=zero_point)
            out_dtype = scale.dtype
        return step.forward(value, out_dtype), source, chain + (step,)

    def _dequantize_params(self, node, value, attrs):
        scale = self.constant(node.input[1])
        if scale is None or "block_size" in attrs and attrs["block_size"]:
            return None
        zero_point = (self.constant(node.input[2]) if len(node.input) > 2 and node.input[2]
                      else np.zeros_like(scale, dtype=value.dtype))
        if zero_point is None:
            return None
        if scale.ndim == 1 and value.ndim > 1:  # per-axis: broadcast along `axis`
            axis = attrs.get("axis", 1) % value.ndim
            shape = [1] * value.ndim
            shape[axis] = scale.shape[0]
            scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
        return scale, zero_point


def _constant_node_value(node: onnx.NodeProto) -> np.ndarray | None:
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name == "value_float":
            return np.array(attr.f, dtype=np.float32)
        if attr.name == "value_floats":
            return np.array(attr.floats, dtype=np.float32)
        if attr.name == "value_int":
            return np.array(attr.i, dtype=np.int64)
        if attr.name == "value_ints":
            return np.array(attr.ints, dtype=np.int64)
    return None


def _reshape_target(in_shape: tuple[int, ...], target: list[int], allowzero: int) -> tuple[int, ...]:
    shape = [in_shape[i] if d == 0 and not allowzero else d for i, d in enumerate(target)]
    return tuple(shape)


def display_name(node: onnx.NodeProto) -> str:
    """A node's name, or its first output's name when it has none (old exporters name no nodes)."""
    return node.name or (node.output[0] if node.output else node.op_type)


# Weight-bearing ops: float (Conv, ConvTranspose, Gemm, MatMul) and their integer forms.
WEIGHT_BEARING_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "QLinearConv", "ConvInteger", "QLinearMatMul",
                      "MatMulInteger", "QGemm")


def find_weights(model: onnx.ModelProto) -> list[WeightRef]:
    """Every weight-bearing node with a constant weight, in graph order."""
    lookups = GraphIndex(model)
    refs = []
    for index, node in enumerate(model.graph.node):
        ref = _weight_ref(lookups, index, node)
        if ref is not None:
            refs.append(ref)
    return refs


def _weight_ref(lookups: GraphIndex, index: int, node: onnx.NodeProto) -> WeightRef | None:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    candidates: list[tuple[int, str, int]] = []  # (input index, layout kind, groups)
    if node.op_type == "Conv" and len(node.input) > 1:
        candidates = [(1, "conv", attrs.get("group", 1))]
    elif node.op_type == "ConvTranspose" and len(node.input) > 1:
        candidates = [(1, "conv_transpose", attrs.get("group", 1))]
    elif node.op_type == "Gemm":
        candidates = [(1, "rows" if attrs.get("transB", 0) else "cols", 1),
                      (0, "cols" if attrs.get("transA", 0) else "rows", 1)]
    elif node.op_type == "MatMul":
        candidates = [(1, "cols", 1), (0, "rows", 1)]
    elif node.op_type == "QLinearConv":  # x, x_scale, x_zp, w, ...
        candidates = [(3, "conv", attrs.get("group", 1))]
    elif node.op_type == "ConvInteger":
        candidates = [(1, "conv", attrs.get("group", 1))]
    elif node.op_type == "QLinearMatMul":
        candidates = [(3, "cols", 1)]
    elif node.op_type == "MatMulInteger":
        candidates = [(1, "cols", 1)]
    elif node.op_type == "QGemm":  # com.microsoft: A, a_scale, a_zp, B, ...
        candidates = [(3, "rows" if attrs.get("transB", 0) else "cols", 1)]
    for input_index, kind, groups in candidates:
        name = node.input[input_index]
        resolved = lookups.resolve(name)
        if resolved is None:
            continue
        value, source, chain = resolved
        if kind in ("rows", "cols") and value.ndim != 2:
            continue
        if kind in ("conv", "conv_transpose") and value.ndim < 3:
            continue
        if not (np.issubdtype(value.dtype, np.floating) or np.issubdtype(value.dtype, np.integer)):
            continue
        data_input = node.input[1 - input_index] if node.op_type in ("Gemm", "MatMul") else node.input[0]
        return WeightRef(
            node_name=display_name(node), node_index=index, op_type=node.op_type,
            input_index=input_index, tensor_name=name,
            layout=WeightLayout(kind, tuple(value.shape), int(groups)),
            source=source, chain=chain, dtype=value.dtype,
            storage_dtype=chain[0].input_dtype if chain else value.dtype,
            data_input=data_input,
        )
    return None


def read_weight(model: onnx.ModelProto, ref: WeightRef) -> np.ndarray:
    """The weight as the node consumes it, in ONNX layout."""
    resolved = GraphIndex(model).resolve(ref.tensor_name)
    if resolved is None:
        raise OnnxSparseError(f"node {ref.node_name}: weight {ref.tensor_name} is no longer constant")
    return resolved[0]


def read_matrix(model: onnx.ModelProto, ref: WeightRef) -> np.ndarray:
    """The weight as W[O, K]."""
    return ref.layout.to_matrix(read_weight(model, ref))


def write_matrix(model: onnx.ModelProto, ref: WeightRef, matrix: np.ndarray) -> None:
    """Store W[O, K] back where the weight lives, in its own layout, dtype and chain.

    The stored tensor keeps its name, dtype and shape; values pass back through the chain
    (Transpose, Reshape, Cast, DequantizeLinear) exactly. When the stored tensor also feeds other
    nodes, or cannot hold values (ConstantOfShape), the weight gets an initializer of its own.
    """
    weight = ref.layout.from_matrix(np.asarray(matrix)).astype(ref.dtype, copy=False)
    lookups = GraphIndex(model)
    shared = any(lookups.uses(model.graph.node[step.node_index].output[0]) > 1 for step in ref.chain)
    stored_name = ref.source.name
    if shared or lookups.uses(stored_name) > 1 or ref.source.kind == "constant_of_shape":
        _own_initializer(model, lookups, ref, weight)
        return
    value = weight
    for step in reversed(ref.chain):
        value = step.inverse(value)
    if ref.source.kind == "initializer":
        tensor = lookups.initializers[stored_name]
        tensor.CopyFrom(numpy_helper.from_array(value.astype(numpy_helper.to_array(tensor).dtype,
                                                              copy=False), stored_name))
    else:
        node = model.graph.node[ref.source.node_index]
        attrs = [a for a in node.attribute if a.name != "value" and not a.name.startswith("value_")]
        del node.attribute[:]
        node.attribute.extend(attrs + [helper.make_attribute("value", numpy_helper.from_array(value))])


def _own_initializer(model: onnx.ModelProto, lookups: GraphIndex, ref: WeightRef, weight: np.ndarray) -> None:
    """Give the node its weight as a fresh initializer; drop producers nothing uses any more."""
    node = model.graph.node[ref.node_index]
    new_name = unique_name(lookups, f"{ref.tensor_name}_pruned")
    model.graph.initializer.append(numpy_helper.from_array(weight, new_name))
    node.input[ref.input_index] = new_name
    remove_unused(model)


def unique_name(lookups: GraphIndex, base: str) -> str:
    name, counter = base, 1
    while name in lookups.initializers or name in lookups.producer or name in lookups.consumers:
        name, counter = f"{base}_{counter}", counter + 1
    return name


def remove_unused(model: onnx.ModelProto) -> None:
    """Drop nodes and initializers whose outputs nothing consumes (graph outputs count as uses)."""
    graph = model.graph
    needed = {out.name for out in graph.output}
    keep = []
    for node in reversed(graph.node):
        if any(out in needed for out in node.output) or not node.output:
            keep.append(node)
            needed.update(node.input)
            for attr in node.attribute:  # subgraphs read outer names implicitly
                if attr.type == onnx.AttributeProto.GRAPH:
                    needed.update(_outer_names(attr.g))
    keep.reverse()
    if len(keep) != len(graph.node):
        del graph.node[:]
        graph.node.extend(keep)
    inits = [init for init in graph.initializer if init.name in needed]
    if len(inits) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(inits)


def _outer_names(graph: onnx.GraphProto) -> set[str]:
    names = set()
    for node in graph.node:
        names.update(node.input)
    return names


def onnxruntime_session(model: onnx.ModelProto, threads: int = 1):
    """A plain onnxruntime session on an in-memory model (used by checks, demo and tests)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
