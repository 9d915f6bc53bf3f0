"""Packed models (docs/FORMAT.md section 6): weight-bearing nodes become ai.onnxsparse.Packed<Op>
nodes whose weight is a packed tensor in a uint8 initializer; unpack restores them bit for bit."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxsparse import model as model_io
from onnxsparse.errors import OnnxSparseError, UsageError
from onnxsparse.formats.container import ENCODINGS, Encoding, PackedInfo, Quantization, pack_tensor, read_info, unpack_tensor
from onnxsparse.formats.errors import FormatError

DOMAIN = "ai.onnxsparse"
WEIGHT_INPUT_ATTRIBUTE = "onnxsparse_weight_input"
RESTORE_ATTRIBUTE = "onnxsparse_restore"
# The runtime's choice for this layer (docs/RUNTIME.md): {"kernel": "sparse" | "dense", ...}
EXECUTION_ATTRIBUTE = "onnxsparse_execution"
QUANTIZATION_METADATA = "onnxsparse.quantization"
# No CNN weight comes near this many elements (4 GiB as float32): a packed tensor claiming more is
# refused before it is decoded (a valid csr tensor of zeros can claim any shape cheaply).
MAX_WEIGHT_ELEMENTS = 2**30
# Integer ops: where their weight's scale and zero point are, and the ONNX axis of per-channel values.
_INTEGER_WEIGHT_PARAMS = {"QLinearConv": (4, 5), "QLinearMatMul": (4, 5), "QGemm": (4, 5),
                          "ConvInteger": (None, 3), "MatMulInteger": (None, 3)}


@dataclass(frozen=True)
class PackedTensor:
    """One packed weight of a packed model."""

    node_name: str
    op_type: str
    initializer: str  # the uint8 initializer holding the packed bytes
    weight_name: str  # the weight it restores to
    info: PackedInfo
    original_dtype: str
    kernel_choice: dict | None = None  # the runtime's choice (EXECUTION_ATTRIBUTE), when pack measured it


@dataclass(frozen=True)
class PackResult:
    model: onnx.ModelProto
    tensors: tuple[PackedTensor, ...]
    notes: tuple[str, ...]


def pack_model(model: onnx.ModelProto, *, encoding: str = "auto", huffman: str = "auto", mcbbs_window: int = 4,
               on_layer: Callable[[str], None] | None = None,
               choose_kernel: Callable[[onnx.NodeProto], dict] | None = None) -> PackResult:
    """Pack every weight-bearing node's weight; the input model is not modified.

    `choose_kernel(node)` (the runtime's cost model) returns the record stored on the packed node
    as EXECUTION_ATTRIBUTE: whether the runtime runs it sparse or leaves it to dense onnxruntime.
    """
    if any(node.domain == DOMAIN for node in model.graph.node):
        raise OnnxSparseError("the model is already packed; unpack it first")
    if encoding.strip().lower() not in ("auto", *ENCODINGS):
        Encoding.parse(encoding, mcbbs_window=mcbbs_window)  # a bad spec is the user's error, not a misfit
    packed = onnx.ModelProto()
    packed.CopyFrom(model)
    declared_bits = _declared_weight_bits(packed)
    lookups = model_io.GraphIndex(packed)
    tensors, notes, dropped = [], [], set()
    for ref in model_io.find_weights(packed):
        if on_layer is not None:
            on_layer(ref.node_name)
        node = packed.graph.node[ref.node_index]
        source = _weight_source(packed, lookups, ref, node, declared_bits)
        if source is None:
            notes.append(f"{ref.node_name}: weight stored in a way pack does not handle; left as is")
            continue
        weight, quantization, value_bits, restore, dequantize_index = source
        options = dict(value_bits=value_bits, quantization=quantization, huffman=huffman, mcbbs_window=mcbbs_window)
        try:
            data = pack_tensor(weight, ref.layout, encoding=encoding, **options)
        except UsageError as exc:
            if encoding.strip().lower() == "auto":
                raise UsageError(f"node {ref.node_name}: {exc}") from exc
            notes.append(f"{ref.node_name}: {exc}; packed with auto instead")  # a forced encoding that does not fit
            data = pack_tensor(weight, ref.layout, encoding="auto", **options)
        name = model_io.unique_name(lookups, f"{restore['weight']['name']}_packed")
        lookups.initializers[name] = None
        packed.graph.initializer.append(numpy_helper.from_array(np.frombuffer(data, dtype=np.uint8), name))
        choice = None
        if choose_kernel is not None:
            choice = choose_kernel(model.graph.node[ref.node_index])
            node.attribute.append(helper.make_attribute(EXECUTION_ATTRIBUTE, json.dumps(choice, sort_keys=True)))
        restore.update(op_type=node.op_type, domain=node.domain, weight_input=ref.input_index)
        node.input[ref.input_index] = name
        node.attribute.extend([helper.make_attribute(WEIGHT_INPUT_ATTRIBUTE, ref.input_index),
                               helper.make_attribute(RESTORE_ATTRIBUTE, json.dumps(restore, sort_keys=True))])
        node.op_type, node.domain = f"Packed{node.op_type}", DOMAIN
        if dequantize_index is not None:
            dropped.add(dequantize_index)
        tensors.append(PackedTensor(ref.node_name, restore["op_type"], name, restore["weight"]["name"],
                                    read_info(data), restore["weight"]["dtype"], choice))
    if dropped:
        kept = [node for index, node in enumerate(packed.graph.node) if index not in dropped]
        del packed.graph.node[:]
        packed.graph.node.extend(kept)
    if tensors and not any(opset.domain == DOMAIN for opset in packed.opset_import):
        packed.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    model_io.remove_unused(packed)
    return PackResult(packed, tuple(tensors), tuple(notes))


def _declared_weight_bits(model: onnx.ModelProto) -> dict[str, int]:
    """Bit widths `quantize` recorded for its int8-container weights (below 8 means bit-packable)."""
    for prop in model.metadata_props:
        if prop.key == QUANTIZATION_METADATA:
            try:
                return {name: int(bits) for name, bits in json.loads(prop.value).get("weight_bits", {}).items()}
            except (ValueError, AttributeError, TypeError):
                return {}
    return {}


def _weight_source(model, lookups, ref, node, declared_bits):
    """(weight in ONNX layout, quantization, value bits, restore record, index of a DQ node to drop)."""
    if ref.op_type in _INTEGER_WEIGHT_PARAMS:
        if ref.chain or ref.source.kind != "initializer" or lookups.uses(ref.source.name) != 1:
            return None
        weight = numpy_helper.to_array(lookups.initializers[ref.source.name])
        if weight.dtype != np.int8:
            return None
        scale_at, zero_at = _INTEGER_WEIGHT_PARAMS[ref.op_type]
        quantization = _integer_op_quantization(lookups, node, ref, scale_at, zero_at)
        bits = declared_bits.get(ref.source.name, 8)
        return weight, quantization, bits, {"weight": _tensor_record(ref.source.name, weight)}, None
    if not ref.chain and ref.source.kind == "initializer" and lookups.uses(ref.source.name) == 1:
        weight = numpy_helper.to_array(lookups.initializers[ref.source.name])
        if weight.dtype not in (np.float32, np.float16):
            return None
        return weight, None, None, {"weight": _tensor_record(ref.source.name, weight), "dequantize": None}, None
    if len(ref.chain) == 1 and ref.chain[0].op_type == "DequantizeLinear" and ref.source.kind == "initializer":
        dq = model.graph.node[ref.chain[0].node_index]
        if lookups.uses(dq.output[0]) != 1 or lookups.uses(ref.source.name) != 1:
            return None
        weight = numpy_helper.to_array(lookups.initializers[ref.source.name])
        if weight.dtype != np.int8:
            return None
        attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
        scale = lookups.constant(dq.input[1])
        zero = lookups.constant(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
        axis = attrs.get("axis", 1) % weight.ndim if scale.size > 1 or scale.ndim == 1 else None
        zero_values = np.zeros_like(scale, dtype=np.int32) if zero is None else zero.astype(np.int32)
        quantization = Quantization(axis if scale.ndim == 1 else None, scale.reshape(-1).astype(np.float32),
                                    zero_values.reshape(-1))
        restore = {"weight": _tensor_record(ref.source.name, weight), "dequantize": {
            "node": dq.name, "output": dq.output[0], "attributes": {k: v for k, v in attrs.items()},
            "scale": _tensor_record(dq.input[1], scale),
            "zero_point": None if zero is None else _tensor_record(dq.input[2], zero)}}
        bits = declared_bits.get(ref.source.name, 8)
        return weight, quantization, bits, restore, ref.chain[0].node_index
    return None


def _integer_op_quantization(lookups, node, ref, scale_at, zero_at) -> Quantization | None:
    zero = lookups.constant(node.input[zero_at]) if len(node.input) > zero_at and node.input[zero_at] else None
    scale = lookups.constant(node.input[scale_at]) if scale_at is not None else None
    if scale is None:
        scale = np.ones_like(zero, dtype=np.float32) if zero is not None else np.ones(1, np.float32)
    zero_values = np.zeros(scale.size, np.int32) if zero is None else zero.reshape(-1).astype(np.int32)
    axis = None
    if scale.size > 1:
        kind = ref.layout.kind
        axis = 0 if kind in ("conv", "rows") else 1
    return Quantization(axis, scale.reshape(-1).astype(np.float32), zero_values)


def _tensor_record(name: str, value: np.ndarray) -> dict:
    return {"name": name, "dtype": value.dtype.name, "shape": list(value.shape)}


def unpack_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """The standard ONNX model a packed one came from, weights bit for bit."""
    if not any(node.domain == DOMAIN for node in model.graph.node):
        raise OnnxSparseError("not a packed model (no ai.onnxsparse nodes); nothing to unpack")
    unpacked = onnx.ModelProto()
    unpacked.CopyFrom(model)
    graph = unpacked.graph
    lookups = model_io.GraphIndex(unpacked)
    nodes = []
    for node in graph.node:
        if node.domain != DOMAIN:
            nodes.append(node)
            continue
        label = f"node {model_io.display_name(node)} ({node.op_type})"
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        try:
            restore = json.loads(attrs[RESTORE_ATTRIBUTE])
            weight_input = int(attrs[WEIGHT_INPUT_ATTRIBUTE])
            packed_name = node.input[weight_input]
        except (KeyError, ValueError, IndexError, TypeError) as exc:
            raise OnnxSparseError(f"{label}: missing or unreadable {RESTORE_ATTRIBUTE}/{WEIGHT_INPUT_ATTRIBUTE}") from exc
        if packed_name not in lookups.initializers:
            raise OnnxSparseError(f"{label}: packed input {packed_name!r} is not an initializer")
        data = numpy_helper.to_array(lookups.initializers[packed_name])
        try:
            weight = unpack_tensor(data.tobytes(), max_elements=MAX_WEIGHT_ELEMENTS)
        except FormatError as exc:
            raise FormatError(f"{label}: {packed_name}: {exc}") from exc
        record = restore["weight"]
        graph.initializer.append(numpy_helper.from_array(
            weight.astype(record["dtype"]).reshape(record["shape"]), record["name"]))
        weight_tensor = record["name"]
        dequantize = restore.get("dequantize")
        if dequantize:
            info = read_info(data.tobytes())
            _restore_dequantize(graph, nodes, dequantize, record["name"], info.quantization)
            weight_tensor = dequantize["output"]
        node.input[weight_input] = weight_tensor
        kept = [a for a in node.attribute
                if a.name not in (RESTORE_ATTRIBUTE, WEIGHT_INPUT_ATTRIBUTE, EXECUTION_ATTRIBUTE)]
        del node.attribute[:]
        node.attribute.extend(kept)
        node.op_type, node.domain = restore["op_type"], restore["domain"]
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    remaining = [opset for opset in unpacked.opset_import if opset.domain != DOMAIN]
    del unpacked.opset_import[:]
    unpacked.opset_import.extend(remaining)
    model_io.remove_unused(unpacked)
    return unpacked


def _restore_dequantize(graph, nodes: list, record: dict, weight_name: str, quantization: Quantization) -> None:
    scale = record["scale"]
    graph.initializer.append(numpy_helper.from_array(
        quantization.scales.astype(scale["dtype"]).reshape(scale["shape"]), scale["name"]))
    inputs = [weight_name, scale["name"]]
    if record["zero_point"] is not None:
        zero = record["zero_point"]
        graph.initializer.append(numpy_helper.from_array(
            quantization.zero_points.astype(zero["dtype"]).reshape(zero["shape"]), zero["name"]))
        inputs.append(zero["name"])
    dq = helper.make_node("DequantizeLinear", inputs, [record["output"]], name=record["node"])
    dq.attribute.extend(helper.make_attribute(key, value) for key, value in sorted(record["attributes"].items()))
    nodes.append(dq)


def packed_tensors(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, str, bytes]]:
    """(node, initializer name, bytes) of every packed weight in a packed model."""
    initializers = {init.name: init for init in model.graph.initializer}
    found = []
    for node in model.graph.node:
        if node.domain != DOMAIN:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        index = int(attrs.get(WEIGHT_INPUT_ATTRIBUTE, -1))
        if not 0 <= index < len(node.input) or node.input[index] not in initializers:
            raise OnnxSparseError(f"node {model_io.display_name(node)}: no packed weight input")
        found.append((node, node.input[index], numpy_helper.to_array(initializers[node.input[index]]).tobytes()))
    if not found:
        raise OnnxSparseError("not a packed model (no ai.onnxsparse nodes); pack it with `onnxsparse pack`")
    return found
