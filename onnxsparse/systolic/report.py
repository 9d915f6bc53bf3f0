"""What a simulation reports: per-layer records, totals, outputs; as JSON, CSV rows and a plot."""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from onnxsparse.systolic.array import ArrayConfig


@dataclass(frozen=True)
class LayerReport:
    """One layer on the array. Cycles are array cycles; SRAM counts are element accesses."""

    index: int
    name: str
    op_type: str
    kind: str  # "mac" | "vector"
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    output_pixels: int  # P (MAC layers; batch included)
    reduction_length: int  # Wn = kh·kw·C/groups
    filters: int  # K per group
    groups: int
    macs: int  # dense MACs of the layer
    performed_macs: int  # MACs the PEs perform on the stored weights (vector layers: elements processed)
    sparse: bool  # whether the PE skips zeros in this layer
    weight_sparsity: float
    kept_per_domain: int  # NZ of the PE's pattern (0 when dense)
    compute_cycles: int
    dense_cycles: int  # the same PE running every weight
    stall_cycles: int
    utilization: float  # performed MACs / (compute cycles · rows · cols · MACs per PE)
    mapping_efficiency: float
    sram_ifmap_reads: int
    sram_filter_reads: int
    sram_ofmap_reads: int
    sram_ofmap_writes: int
    dram_ifmap_bytes: int
    dram_filter_bytes: int
    dram_ofmap_bytes: int
    note: str = ""

    @property
    def total_cycles(self) -> int:
        return self.compute_cycles + self.stall_cycles

    @property
    def dram_bytes(self) -> int:
        return self.dram_ifmap_bytes + self.dram_filter_bytes + self.dram_ofmap_bytes


@dataclass(frozen=True)
class Totals:
    layers: int
    mac_layers: int
    sparse_layers: int
    macs: int
    performed_macs: int
    compute_cycles: int
    dense_cycles: int
    stall_cycles: int
    total_cycles: int
    utilization: float
    sram_ifmap_reads: int
    sram_filter_reads: int
    sram_ofmap_reads: int
    sram_ofmap_writes: int
    dram_bytes: int

    @property
    def speedup(self) -> float:
        """Dense-PE compute cycles over configured-PE compute cycles."""
        return self.dense_cycles / max(self.compute_cycles, 1)


@dataclass(frozen=True)
class SimulationReport:
    model: str
    config: ArrayConfig
    layers: list[LayerReport]
    outputs: dict[str, np.ndarray]
    seconds: float

    @property
    def totals(self) -> Totals:
        layers = self.layers
        compute = sum(layer.compute_cycles for layer in layers)
        capacity = sum(layer.compute_cycles for layer in layers if layer.kind == "mac") * \
            self.config.rows * self.config.cols * self.config.pe.macs_per_cycle
        performed = sum(layer.performed_macs for layer in layers if layer.kind == "mac")
        return Totals(
            layers=len(layers), mac_layers=sum(layer.kind == "mac" for layer in layers),
            sparse_layers=sum(layer.sparse for layer in layers), macs=sum(layer.macs for layer in layers),
            performed_macs=performed, compute_cycles=compute,
            dense_cycles=sum(layer.dense_cycles for layer in layers),
            stall_cycles=sum(layer.stall_cycles for layer in layers),
            total_cycles=sum(layer.total_cycles for layer in layers),
            utilization=performed / capacity if capacity else 0.0,
            sram_ifmap_reads=sum(layer.sram_ifmap_reads for layer in layers),
            sram_filter_reads=sum(layer.sram_filter_reads for layer in layers),
            sram_ofmap_reads=sum(layer.sram_ofmap_reads for layer in layers),
            sram_ofmap_writes=sum(layer.sram_ofmap_writes for layer in layers),
            dram_bytes=sum(layer.dram_bytes for layer in layers))

    def to_json(self) -> dict:
        """The --json document (schemas/simulate-report.schema.json)."""
        config = asdict(self.config)
        config["pe"] = self.config.pe.spec
        totals = asdict(self.totals)
        totals["speedup"] = self.totals.speedup
        return {
            "model": self.model, "config": config, "seconds": self.seconds,
            "layers": [_layer_json(layer) for layer in self.layers], "totals": totals,
            "outputs": {name: {"shape": list(value.shape), "dtype": value.dtype.name, "values": value.tolist()}
                        for name, value in self.outputs.items()},
        }

    def write_csv(self, path: str | Path) -> None:
        names = [f.name for f in fields(LayerReport)] + ["total_cycles", "dram_bytes"]
        staging = Path(path).with_name(Path(path).name + ".tmp")
        with open(staging, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(names)
            for layer in self.layers:
                row = _layer_json(layer)
                writer.writerow(["x".join(map(str, row[name])) if isinstance(row[name], list) else row[name]
                                 for name in names])
        staging.replace(path)

    def plot(self, path: str | Path) -> None:
        """Two panels: per-layer compute cycles (dense PE vs configured PE), and PE utilization."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        layers = [layer for layer in self.layers if layer.kind == "mac"]
        positions = np.arange(len(layers))
        figure, (cycles_axis, utilization_axis) = plt.subplots(2, 1, figsize=(max(8, 0.25 * len(layers) + 4), 7),
                                                                sharex=True)
        width = 0.4
        cycles_axis.bar(positions - width / 2, [layer.dense_cycles for layer in layers], width, label="dense PE")
        cycles_axis.bar(positions + width / 2, [layer.compute_cycles for layer in layers], width,
                        label=f"{self.config.pe.spec} PE")
        cycles_axis.bar(positions + width / 2, [layer.stall_cycles for layer in layers], width,
                        bottom=[layer.compute_cycles for layer in layers], label="stalls", color="tab:red", alpha=0.6)
        cycles_axis.set_ylabel("cycles")
        cycles_axis.set_yscale("log")
        cycles_axis.legend()
        cycles_axis.set_title(f"{Path(self.model).name} on {self.config.label}: "
                              f"{self.totals.speedup:.2f}x over the dense PE")
        utilization_axis.bar(positions, [100 * layer.utilization for layer in layers], color="tab:green")
        utilization_axis.set_ylabel("PE utilization (%)")
        utilization_axis.set_ylim(0, 100)
        utilization_axis.set_xticks(positions, [layer.name for layer in layers], rotation=90, fontsize=6)
        figure.tight_layout()
        staging = Path(path).with_name(Path(path).name + ".tmp.png")
        figure.savefig(staging, dpi=120)
        plt.close(figure)
        staging.replace(path)


def _layer_json(layer: LayerReport) -> dict:
    document = asdict(layer)
    document["input_shape"], document["output_shape"] = list(layer.input_shape), list(layer.output_shape)
    document["total_cycles"], document["dram_bytes"] = layer.total_cycles, layer.dram_bytes
    return document
