"""How one layer's weights map onto the PEs: the reduction each PE steps through, what is stored.

A layer's weight is the shared view W[O, K] (onnxsparse.model.WeightLayout): O filters, K =
kernel_positions strips of strip_length input channels. A dense PE takes one MAC per weight; a
sparse PE skips the zeros its pattern guarantees, every PE stepping through the same (balanced)
count, the largest any filter needs. docs/SYSTOLIC.md states the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from onnxsparse.errors import UsageError
from onnxsparse.sparsity.patterns import detect_pattern, MatrixShape
from onnxsparse.systolic.array import PEOption

# The FPL 2021 design stores a 4-bit position per kept cluster; longer ranges need more bits.
MCBBS_INDEX_BITS = 4
# A layer whose zeros the PE pattern does not explain is an error when at least this sparse; below
# it the zeros are incidental (rounding in a dense model) and the layer runs dense.
INCIDENTAL_SPARSITY = 0.1
# The PE pattern explains a layer's zeros when it skips at least this share of them (as detect_pattern).
EXPLAINED = 0.9


@dataclass(frozen=True)
class WeightMapping:
    """One layer's weights on the configured PE.

    reduction_steps: PE cycles per filter and output pixel (the reduction the dataflow tiles or
    streams); dense_steps: the same PE running every weight. stored_values: weight values kept in
    DRAM/SRAM (balanced, so padding zeros included); index_bits: their position indices.
    """

    sparse: bool  # whether this layer skips zeros on this PE
    reduction_steps: int
    dense_steps: int
    stored_values: int
    index_bits: int
    sparsity: float  # the layer's fraction of zero weights
    kept_per_domain: int  # NZ (mcbbs: clusters per range; nm: per M; block: channels per block); 0 when dense
    note: str = ""


def _padded(values: np.ndarray, axis: int, multiple: int) -> np.ndarray:
    extra = -values.shape[axis] % multiple
    if not extra:
        return values
    width = [(0, 0)] * values.ndim
    width[axis] = (0, extra)
    return np.pad(values, width)


def map_weights(pe: PEOption, dataflow: str, matrix: np.ndarray, shape: MatrixShape,
                layer: str) -> WeightMapping:
    """The mapping of W[O, K] (integer weights, zero weights exactly 0) onto `pe`.

    Raises UsageError naming `layer` when the layer is pruned (at least INCIDENTAL_SPARSITY zeros)
    in a way the PE's pattern does not explain.
    """
    out_channels, reduction = shape.out_channels, shape.columns
    nonzero = matrix != 0
    sparsity = 1.0 - float(nonzero.sum()) / max(nonzero.size, 1)
    dense_values = out_channels * reduction

    def dense(steps: int, note: str = "") -> WeightMapping:
        return WeightMapping(False, steps, steps, dense_values, 0, sparsity, 0, note)

    if pe.kind == "dense":
        return dense(reduction)
    by_strip = nonzero.reshape(out_channels, shape.kernel_positions, shape.strip_length)
    if pe.kind == "mcbbs":
        span = pe.cluster_size * pe.prune_range
        ranges = shape.kernel_positions * math.ceil(shape.strip_length / span)
        dense_steps = math.ceil(ranges / pe.simd_ranges) * pe.prune_range
        if shape.strip_length < span:
            return dense(dense_steps, f"strip of {shape.strip_length} channels is shorter than R*C={span}: dense")
        clusters = _padded(by_strip, 2, span).reshape(out_channels, ranges, pe.prune_range, pe.cluster_size)
        kept = int(clusters.any(axis=-1).sum(axis=-1).max(initial=0))
        skipped = 1 - kept / pe.prune_range
        steps = math.ceil(ranges / pe.simd_ranges) * kept
        values = out_channels * ranges * kept * pe.cluster_size
        index_bits = out_channels * ranges * kept * max(MCBBS_INDEX_BITS, math.ceil(math.log2(pe.prune_range)))
    elif pe.kind == "nm":
        if shape.strip_length < pe.group:
            return dense(reduction, f"strip of {shape.strip_length} channels is shorter than M={pe.group}: dense")
        runs = _padded(by_strip, 2, pe.group).reshape(out_channels, -1, pe.group)
        kept = int(runs.sum(axis=-1).max(initial=0))
        skipped = 1 - pe.keep / pe.group if kept <= pe.keep else 0.0
        kept = pe.keep
        steps = runs.shape[1] * pe.keep
        values = out_channels * steps
        index_bits = values * math.ceil(math.log2(pe.group))
    else:  # block: 1xN, N output channels share their kept input channels (whole kernels)
        blocks = _padded(by_strip, 0, pe.block_rows).reshape(-1, pe.block_rows, shape.kernel_positions,
                                                             shape.strip_length)
        kept = int(blocks.any(axis=(1, 2)).sum(axis=-1).max(initial=0))
        skipped = 1 - kept / shape.strip_length
        steps = kept * shape.kernel_positions
        values = out_channels * steps
        index_bits = blocks.shape[0] * kept * max(1, math.ceil(math.log2(shape.strip_length)))
    explained = sparsity == 0 or skipped >= EXPLAINED * sparsity - 1e-12
    if not explained:
        if sparsity >= INCIDENTAL_SPARSITY:
            found = detect_pattern(matrix, shape)
            raise UsageError(f"layer {layer}: its zeros ({100 * sparsity:.1f}% sparse, pattern {found.spec}) do not "
                             f"fit the {pe.spec} PE; prune it with --pattern {pe.pattern_spec} or simulate with "
                             f"another --pe")
        return dense(dense_steps if pe.kind == "mcbbs" else reduction)
    if skipped <= 0:
        return dense(dense_steps if pe.kind == "mcbbs" else reduction)
    if dataflow == "is":
        return dense(dense_steps if pe.kind == "mcbbs" else reduction,
                     "is: every PE holds a stationary input, so no filter's zeros can be skipped: dense")
    return WeightMapping(True, steps, dense_steps if pe.kind == "mcbbs" else reduction, values, index_bits,
                         sparsity, kept)
