"""The buffer and DRAM model: SRAM accesses per operand, DRAM bytes and stall cycles of a layer.

docs/SYSTOLIC.md states the model. In short: every fold reads its operand tiles from the SRAMs;
an operand is fetched from DRAM once when its working set fits half its (double-buffered) SRAM,
otherwise once per pass the dataflow makes over it; partial sums that do not fit half the ofmap
SRAM spill to DRAM and back between reduction folds; a layer stalls when its DRAM traffic at
the given bandwidth takes longer than its compute, since transfers overlap compute otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from onnxsparse.systolic.array import ArrayConfig
from onnxsparse.systolic.cycles import FoldGrid

ACTIVATION_BYTES = 1  # 8-bit activations
PARTIAL_SUM_BYTES = 4  # int32 accumulators
BIAS_BYTES = 4  # int32 biases


@dataclass(frozen=True)
class Traffic:
    """SRAM accesses (elements) per operand and DRAM bytes per operand of one layer."""

    ifmap_reads: int = 0
    filter_reads: int = 0
    ofmap_reads: int = 0  # partial sums read back to accumulate the next reduction fold
    ofmap_writes: int = 0
    dram_ifmap_bytes: int = 0
    dram_filter_bytes: int = 0
    dram_ofmap_bytes: int = 0

    @property
    def dram_bytes(self) -> int:
        return self.dram_ifmap_bytes + self.dram_filter_bytes + self.dram_ofmap_bytes


def filter_bytes(stored_values: int, index_bits: int, out_channels: int) -> int:
    """DRAM bytes of a layer's weights: 8-bit values, their position indices, int32 biases."""
    return stored_values + math.ceil(index_bits / 8) + BIAS_BYTES * out_channels


def mac_traffic(config: ArrayConfig, grid: FoldGrid, output_pixels: int, reduction_length: int, filters: int,
                groups: int, stored_per_filter: int, input_bytes: int, weight_bytes: int,
                output_bytes: int) -> Traffic:
    """SRAM and DRAM traffic of a conv/gemm of `groups` independent P × Wn × K products.

    stored_per_filter: weight values one filter keeps on this PE (Wn when dense)."""
    pixels, reduction, weights = output_pixels, reduction_length, stored_per_filter * filters
    outputs = pixels * filters
    half_ifmap, half_filter, half_ofmap = (config.ifmap_sram_bytes / 2, config.filter_sram_bytes / 2,
                                           config.ofmap_sram_bytes / 2)
    spill_per_fold = 2 * PARTIAL_SUM_BYTES * outputs * (grid.row_folds - 1)
    if config.dataflow == "ws":  # filter tiles stationary; column folds outer, reduction folds inner
        ifmap_reads, filter_reads = pixels * reduction * grid.col_folds, weights
        ofmap_writes, ofmap_reads = outputs * grid.row_folds, outputs * (grid.row_folds - 1)
        ifmap_passes = 1 if input_bytes <= half_ifmap * groups else grid.col_folds
        filter_passes = 1
        spill = spill_per_fold if pixels * min(filters, config.cols) * PARTIAL_SUM_BYTES > half_ofmap else 0
    elif config.dataflow == "os":  # output tiles stationary; pixel folds outer, filter folds inner
        ifmap_reads, filter_reads = pixels * reduction * grid.col_folds, weights * grid.row_folds
        ofmap_writes, ofmap_reads = outputs, 0
        ifmap_passes = 1 if config.rows * reduction * ACTIVATION_BYTES <= half_ifmap else grid.col_folds
        filter_passes = 1 if weight_bytes <= half_filter * groups else grid.row_folds
        spill = 0
    else:  # is: input tiles stationary; pixel folds outer, reduction folds inner, filters streamed
        ifmap_reads, filter_reads = pixels * reduction, weights * grid.col_folds
        ofmap_writes, ofmap_reads = outputs * grid.row_folds, outputs * (grid.row_folds - 1)
        ifmap_passes = 1
        filter_passes = 1 if weight_bytes <= half_filter * groups else grid.col_folds
        spill = spill_per_fold if filters * min(pixels, config.cols) * PARTIAL_SUM_BYTES > half_ofmap else 0
    return Traffic(groups * ifmap_reads, groups * filter_reads, groups * ofmap_reads, groups * ofmap_writes,
                   input_bytes * ifmap_passes, weight_bytes * filter_passes, output_bytes + groups * spill)


def vector_traffic(elements_read: int, elements_written: int, input_bytes: int, output_bytes: int) -> Traffic:
    """A non-MAC layer streams its inputs from the ifmap SRAM once and writes its outputs once."""
    return Traffic(ifmap_reads=elements_read, ofmap_writes=elements_written, dram_ifmap_bytes=input_bytes,
                   dram_ofmap_bytes=output_bytes)


def vector_cycles(config: ArrayConfig, elements_read: int, elements_written: int) -> int:
    """Non-MAC layers: one element per array column per cycle."""
    return math.ceil(max(elements_read, elements_written) / config.cols)


def stall_cycles(config: ArrayConfig, dram_bytes: int, compute_cycles: int) -> int:
    """Cycles the layer waits for DRAM: its transfer time beyond its compute time."""
    return max(0, math.ceil(dram_bytes / config.dram_bytes_per_cycle) - compute_cycles)
