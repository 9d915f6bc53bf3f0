"""The hardware reference bundle of the FPL 2021 flow: trace, parameters and reference in/out.

`<name>_trace.yaml` (per-layer topology and quantization), `<name>_parameters.npz` (`<id>_weight`,
`<id>_bias` on the quantization grid) and `<name>_inout.yaml` (reference input and output);
docs/REFERENCE_EXPORT.md describes every field and schemas/reference-*.schema.json validate them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import yaml

from onnxsparse.quant.reference import ReferenceExecutor
from onnxsparse.sparsity.patterns import detect_pattern
from onnxsparse.systolic.array import ArrayConfig
from onnxsparse.systolic.executor import SystolicExecutor
from onnxsparse.systolic.layers import MacLayer

TRACE_VERSION = 1
_LAYER_KINDS = {"QLinearConv": "conv", "QGemm": "gemm", "QLinearMatMul": "matmul", "QLinearAdd": "add",
                "QLinearConcat": "concat", "MaxPool": "maxpool", "QLinearAveragePool": "avgpool",
                "QLinearGlobalAveragePool": "globalavgpool", "Max": "relu"}


@dataclass(frozen=True)
class Bundle:
    paths: tuple[Path, Path, Path]
    layers: int
    mac_layers: int


def fraction_bits(scale: float) -> int | None:
    """f when scale == 2**-f exactly (the fixed-point scheme), else None."""
    mantissa, exponent = math.frexp(float(scale))
    return 1 - exponent if mantissa == 0.5 else None


def _quantization(layer: MacLayer) -> dict:
    x_scale, w_scale, y_scale = layer.scales
    weight_bits = [fraction_bits(s) for s in np.unique(w_scale)]
    fixed = None
    if all(bits is not None for bits in weight_bits) and len(weight_bits) == 1 \
            and fraction_bits(x_scale) is not None and fraction_bits(y_scale) is not None:
        fixed = {"input": fraction_bits(x_scale), "weight": weight_bits[0], "output": fraction_bits(y_scale),
                 "bias": fraction_bits(x_scale) + weight_bits[0]}
    return {"input_scale": x_scale, "input_zero_point": int(layer.x_zero_point),
            "weight_scale": [float(s) for s in w_scale], "output_scale": y_scale,
            "output_zero_point": int(layer.y_zero_point), "output_type": np.dtype(layer.y_type).name,
            "fraction_bits": fixed}


def _sparsity(layer: MacLayer) -> dict:
    shape = layer.matrix_shape
    detected = detect_pattern(layer.matrix, shape)
    record = {"sparsity": float(1 - np.count_nonzero(layer.matrix) / max(layer.matrix.size, 1)),
              "pattern": detected.spec, "cluster_size": None, "pruning_range": None, "kept_per_range": None}
    if match := re.fullmatch(r"mcbbs:c(\d+)r(\d+)", detected.spec):
        cluster, prune_range = int(match[1]), int(match[2])
        span = cluster * prune_range
        padded = np.pad(layer.matrix.reshape(shape.out_channels, shape.kernel_positions, shape.strip_length) != 0,
                        [(0, 0), (0, 0), (0, -shape.strip_length % span)])
        kept = padded.reshape(shape.out_channels, -1, prune_range, cluster).any(-1).sum(-1).max(initial=0)
        record.update(cluster_size=cluster, pruning_range=prune_range, kept_per_range=int(kept))
    return record


def export_reference(model: onnx.ModelProto, out_dir: Path, name: str, feeds: dict[str, np.ndarray]) -> Bundle:
    """Write the three files of `model` run on `feeds` into out_dir (created if missing)."""
    executor = SystolicExecutor(model, ArrayConfig())
    report = executor.run(feeds)
    compiled = executor.compiled
    producers = {input_name: "input" for input_name in compiled.inputs}
    layers, parameters, index = [], {}, 0
    reports = iter(report.layers)
    quantized_inputs: list[str] = []
    for step in compiled.steps:
        sources = [producers.get(tensor) for tensor in step.inputs if tensor in producers]
        if step.kind == "host":
            for tensor in step.outputs:  # shape ops, quantize/dequantize pass their producer on
                producers[tensor] = sources[0] if sources else "input"
            if step.op_type == "QuantizeLinear" and step.inputs[0] in compiled.inputs:
                quantized_inputs.append(step.outputs[0])
            continue
        layer_report = next(reports)
        layer_id = str(index)
        record = {"id": layer_id, "name": step.name, "op_type": step.op_type, "type": _LAYER_KINDS[step.op_type],
                  "producers": sources, "input_shape": list(layer_report.input_shape),
                  "output_shape": list(layer_report.output_shape)}
        if step.kind == "mac":
            layer: MacLayer = step.kernel
            window = layer.window
            rank = len(window.kernel) if window else 0
            record.update({
                "kernel": list(window.kernel) if window else None,
                "stride": list(window.strides) if window else None,
                "padding": list(window.pads) if window else None,
                "dilation": list(window.dilations) if window else None,
                "groups": layer.groups, "in_channels": layer.layout.in_channels,
                "out_channels": layer.layout.out_channels, "weight_shape": list(layer.weight.shape),
                "quantization": _quantization(layer), **_sparsity(layer)})
            if rank and window.auto_pad != "NOTSET":
                record["auto_pad"] = window.auto_pad
            parameters[f"{layer_id}_weight"] = layer.weight
            parameters[f"{layer_id}_bias"] = (layer.bias.astype(np.int32) if layer.bias is not None
                                              else np.zeros(layer.layout.out_channels, np.int32))
        elif step.op_type in ("MaxPool", "QLinearAveragePool"):
            record["kernel"] = [int(k) for k in step.kernel_shape]
        layers.append(record)
        for tensor in step.outputs:
            producers[tensor] = layer_id
        index += 1
    final_integers = [node.input[0] for node in compiled.model.graph.node
                      if node.op_type == "DequantizeLinear" and node.input[0] in producers]
    integer_values = ReferenceExecutor(compiled.model).run(feeds, outputs=quantized_inputs + final_integers)
    out_dir.mkdir(parents=True, exist_ok=True)
    trace_path = out_dir / f"{name}_trace.yaml"
    parameters_path = out_dir / f"{name}_parameters.npz"
    inout_path = out_dir / f"{name}_inout.yaml"
    trace = {"format_version": TRACE_VERSION, "model": name, "inputs": [
        {"name": input_name, "dtype": np.dtype(dtype).name, "shape": list(np.shape(feeds[input_name]))}
        for input_name, dtype in compiled.inputs.items()], "layers": layers}
    inout = {"format_version": TRACE_VERSION, "model": name,
             "inputs": [_tensor(input_name, feeds[input_name]) for input_name in compiled.inputs],
             "quantized_inputs": [_tensor(tensor, value) for tensor, value in
                                  zip(quantized_inputs, integer_values[:len(quantized_inputs)])],
             "quantized_outputs": [_tensor(tensor, value, producers.get(tensor)) for tensor, value in
                                   zip(final_integers, integer_values[len(quantized_inputs):])],
             "outputs": [_tensor(output, value) for output, value in report.outputs.items()]}
    _write_yaml(trace_path, trace)
    staging = parameters_path.with_name(parameters_path.name + ".tmp.npz")
    np.savez(staging, **parameters)
    staging.replace(parameters_path)
    _write_yaml(inout_path, inout)
    return Bundle((trace_path, parameters_path, inout_path), len(layers),
                  sum(record["type"] in ("conv", "gemm", "matmul") for record in layers))


def _tensor(name: str, value: np.ndarray, layer_id: str | None = None) -> dict:
    record = {"name": name, "dtype": value.dtype.name, "shape": list(value.shape), "values": value.tolist()}
    if layer_id is not None:
        record["layer"] = layer_id
    return record


def _write_yaml(path: Path, document: dict) -> None:
    staging = path.with_name(path.name + ".tmp")
    staging.write_text(yaml.safe_dump(document, sort_keys=False, default_flow_style=None, width=120))
    staging.replace(path)
