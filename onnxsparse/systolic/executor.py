"""The systolic-array reference executor: a quantized model's outputs, bit for bit, and its cost.

Values follow docs/ARITHMETIC.md exactly (they equal onnxsparse.quant.reference's); cycles,
utilization and buffer/DRAM traffic follow docs/SYSTOLIC.md.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import onnx

from onnxsparse.errors import OnnxSparseError, UsageError
from onnxsparse.systolic.array import ArrayConfig
from onnxsparse.systolic.cycles import dense_compute_cycles, fold_grid, mapping_efficiency
from onnxsparse.systolic.layers import CompiledModel, MacLayer, Step, compile_model, integer_form
from onnxsparse.systolic.memory import filter_bytes, mac_traffic, stall_cycles, vector_cycles, vector_traffic
from onnxsparse.systolic.pe import WeightMapping, map_weights
from onnxsparse.systolic.report import LayerReport, SimulationReport


def _grouped_cycles(config: ArrayConfig, pixels: int, reduction_steps: int, filters: int, groups: int) -> int:
    """Compute cycles of `groups` independent products run one after another."""
    single = dense_compute_cycles(config.dataflow, config.rows, config.cols, pixels, reduction_steps, filters)
    return groups * (single + 1) - 1


class SystolicExecutor:
    """Runs an integer-form (or QDQ, or packed) model on a modelled systolic array."""

    def __init__(self, model: onnx.ModelProto, config: ArrayConfig, model_name: str = "model"):
        self.config = config
        self.model_name = model_name
        self.compiled: CompiledModel = compile_model(integer_form(model))
        self.mappings: dict[str, WeightMapping] = {}
        for step in self.compiled.steps:
            if step.kind == "mac":
                layer: MacLayer = step.kernel
                self.mappings[step.name] = map_weights(config.pe, config.dataflow, layer.matrix, layer.matrix_shape,
                                                       step.name)

    @property
    def mac_layers(self) -> list[MacLayer]:
        return [step.kernel for step in self.compiled.steps if step.kind == "mac"]

    def run(self, feeds: dict[str, np.ndarray],
            on_layer: Callable[[str], None] | None = None) -> SimulationReport:
        """Outputs and per-layer costs for one set of inputs (any batch size)."""
        started = time.perf_counter()
        values = dict(self.compiled.constants)
        values.update(self._checked(feeds))
        last_use = {name: index for index, step in enumerate(self.compiled.steps) for name in step.inputs}
        kept = set(self.compiled.outputs)
        layers: list[LayerReport] = []
        for index, step in enumerate(self.compiled.steps):
            inputs = [values[name] if name else None for name in step.inputs]
            try:
                if step.kind == "mac":
                    output, layer = self._mac(step, inputs[0], len(layers))
                    results = [output]
                else:
                    results = step.kernel(inputs)
                    layer = self._vector(step, inputs, results[0], len(layers)) if step.kind == "vector" else None
            except ValueError as exc:  # numpy's shape errors on this node's inputs
                raise OnnxSparseError(f"node {step.name} ({step.op_type}): {exc}") from exc
            if layer is not None:
                layers.append(layer)
                if on_layer:
                    on_layer(step.name)
            for name, value in zip(step.outputs, results):
                if name:
                    values[name] = value
            for name in step.inputs:
                if name and last_use.get(name) == index and name not in kept and name not in self.compiled.constants:
                    values.pop(name, None)
        outputs = {name: values[name] for name in self.compiled.outputs}
        return SimulationReport(self.model_name, self.config, layers, outputs, time.perf_counter() - started)

    def _checked(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        expected = self.compiled.inputs
        for name in feeds:
            if name not in expected:
                raise UsageError(f"feed {name}: the model has no such input; inputs: {', '.join(expected)}")
        checked = {}
        for name, dtype in expected.items():
            if name not in feeds:
                raise UsageError(f"input {name}: missing from the feeds")
            value = np.asarray(feeds[name])
            if value.dtype != dtype:
                raise UsageError(f"input {name}: expected {dtype}, got {value.dtype}")
            checked[name] = value
        return checked

    def _mac(self, step: Step, x: np.ndarray, index: int) -> tuple[np.ndarray, LayerReport]:
        config, layer, mapping = self.config, step.kernel, self.mappings[step.name]
        geometry = layer.geometry(x.shape)
        pixels, filters, groups = geometry.output_pixels, geometry.filters, geometry.groups
        grid = fold_grid(config.dataflow, config.rows, config.cols, pixels, mapping.reduction_steps, filters)
        output = layer.run(x, grid.row_folds if config.dataflow in ("ws", "is") else 1)
        compute = _grouped_cycles(config, pixels, mapping.reduction_steps, filters, groups)
        dense = _grouped_cycles(config, pixels, mapping.dense_steps, filters, groups)
        out_channels = filters * groups
        stored_per_filter = mapping.stored_values // out_channels
        traffic = mac_traffic(config, grid, pixels, geometry.reduction_length, filters, groups, stored_per_filter,
                              x.nbytes, filter_bytes(mapping.stored_values, mapping.index_bits, out_channels),
                              output.nbytes)
        performed = pixels * out_channels * stored_per_filter
        capacity = (compute + 1) * config.rows * config.cols * config.pe.macs_per_cycle
        efficiency = mapping_efficiency(config.dataflow, config.rows, config.cols, pixels, mapping.reduction_steps,
                                        filters)
        report = LayerReport(
            index=index, name=step.name, op_type=step.op_type, kind="mac", input_shape=tuple(x.shape),
            output_shape=tuple(output.shape), output_pixels=pixels, reduction_length=geometry.reduction_length,
            filters=filters, groups=groups, macs=geometry.macs, performed_macs=performed, sparse=mapping.sparse,
            weight_sparsity=mapping.sparsity, kept_per_domain=mapping.kept_per_domain, compute_cycles=compute,
            dense_cycles=dense, stall_cycles=stall_cycles(config, traffic.dram_bytes, compute),
            utilization=performed / capacity, mapping_efficiency=efficiency,
            sram_ifmap_reads=traffic.ifmap_reads, sram_filter_reads=traffic.filter_reads,
            sram_ofmap_reads=traffic.ofmap_reads, sram_ofmap_writes=traffic.ofmap_writes,
            dram_ifmap_bytes=traffic.dram_ifmap_bytes, dram_filter_bytes=traffic.dram_filter_bytes,
            dram_ofmap_bytes=traffic.dram_ofmap_bytes, note=mapping.note)
        return output, report

    def _vector(self, step: Step, inputs: list, output: np.ndarray, index: int) -> LayerReport:
        config = self.config
        tensors = [value for value in inputs if isinstance(value, np.ndarray) and value.dtype.itemsize == 1]
        if step.op_type in ("MaxPool", "QLinearAveragePool"):
            read = output.size * step.window_size
        else:
            read = sum(value.size for value in tensors)
        written = output.size
        cycles = vector_cycles(config, read, written)
        traffic = vector_traffic(read, written, sum(value.nbytes for value in tensors), output.nbytes)
        return LayerReport(
            index=index, name=step.name, op_type=step.op_type, kind="vector",
            input_shape=tuple(tensors[0].shape) if tensors else (), output_shape=tuple(output.shape),
            output_pixels=0, reduction_length=0, filters=0, groups=1, macs=0, performed_macs=read, sparse=False,
            weight_sparsity=0.0, kept_per_domain=0, compute_cycles=cycles, dense_cycles=cycles,
            stall_cycles=stall_cycles(config, traffic.dram_bytes, cycles),
            utilization=max(read, written) / max(cycles * config.cols, 1), mapping_efficiency=1.0,
            sram_ifmap_reads=traffic.ifmap_reads, sram_filter_reads=0, sram_ofmap_reads=0,
            sram_ofmap_writes=traffic.ofmap_writes, dram_ifmap_bytes=traffic.dram_ifmap_bytes, dram_filter_bytes=0,
            dram_ofmap_bytes=traffic.dram_ofmap_bytes)


def simulate(model: onnx.ModelProto, config: ArrayConfig, feeds: dict[str, np.ndarray], model_name: str = "model",
             on_layer: Callable[[str], None] | None = None) -> SimulationReport:
    """Run `model` (QDQ, integer form or packed) once on the array `config`."""
    return SystolicExecutor(model, config, model_name).run(feeds, on_layer)
