"""The dense cycle model of a systolic array: SCALE-Sim's compute cycles and mapping efficiency.

One home of the per-dataflow formulas (docs/SYSTOLIC.md). A layer is a matrix product of
`output_pixels` (P) rows, `reduction_length` (Wn = kh·kw·C/groups) and `filters` (K) columns on an
array of AR rows × AC columns:

- ws (weight stationary): a fold holds an AR × AC tile of W[Wn, K]; folds = ⌈Wn/AR⌉·⌈K/AC⌉, each
  taking 2·AR + AC + P − 2 cycles (fill the weights, stream P pixels, drain).
- os (output stationary): a fold holds an AR × AC tile of the output [P, K]; folds = ⌈P/AR⌉·⌈K/AC⌉,
  each AR + AC + Wn − 2 cycles.
- is (input stationary): ws with the roles of P and K swapped; folds = ⌈Wn/AR⌉·⌈P/AC⌉, each
  2·AR + AC + K − 2 cycles.

SCALE-Sim (3.0.0, stall-free) reports folds · cycles_per_fold − 1.
"""

from __future__ import annotations

import math
from typing import NamedTuple

DATAFLOWS = ("ws", "os", "is")


class FoldGrid(NamedTuple):
    """How a layer maps to the array: the two operand dimensions placed on rows and columns, the
    dimension streamed through, and how many tiles (folds) cover it."""

    row_dim: int  # what the array rows hold (ws/is: Wn; os: P)
    col_dim: int  # what the array columns hold (ws: K; os: K; is: P)
    streamed: int  # what flows through each fold (ws: P; os: Wn; is: K)
    row_folds: int
    col_folds: int

    @property
    def folds(self) -> int:
        return self.row_folds * self.col_folds


def _check(dataflow: str, array_rows: int, array_cols: int, *dims: int) -> None:
    if dataflow not in DATAFLOWS:
        raise ValueError(f"unknown dataflow {dataflow!r}; use one of {', '.join(DATAFLOWS)}")
    if array_rows < 1 or array_cols < 1:
        raise ValueError("array rows and columns must be at least 1")
    if min(dims) < 1:
        raise ValueError("output pixels, reduction length and filters must be at least 1")


def fold_grid(dataflow: str, array_rows: int, array_cols: int, output_pixels: int, reduction_length: int,
              filters: int) -> FoldGrid:
    """The operand tiling of one layer under a dataflow."""
    _check(dataflow, array_rows, array_cols, output_pixels, reduction_length, filters)
    row_dim, col_dim, streamed = {
        "ws": (reduction_length, filters, output_pixels),
        "os": (output_pixels, filters, reduction_length),
        "is": (reduction_length, output_pixels, filters),
    }[dataflow]
    return FoldGrid(row_dim, col_dim, streamed, math.ceil(row_dim / array_rows), math.ceil(col_dim / array_cols))


def fold_cycles(dataflow: str, array_rows: int, array_cols: int, streamed: int) -> int:
    """Cycles of one fold that streams `streamed` elements: fill, stream, drain."""
    if dataflow == "os":
        return array_rows + array_cols + streamed - 2
    return 2 * array_rows + array_cols + streamed - 2


def dense_compute_cycles(dataflow: str, array_rows: int, array_cols: int, output_pixels: int, reduction_length: int,
                         filters: int) -> int:
    """SCALE-Sim's stall-free compute cycles of one layer on a dense AR × AC array."""
    grid = fold_grid(dataflow, array_rows, array_cols, output_pixels, reduction_length, filters)
    return grid.folds * fold_cycles(dataflow, array_rows, array_cols, grid.streamed) - 1


def mapping_efficiency(dataflow: str, array_rows: int, array_cols: int, output_pixels: int, reduction_length: int,
                       filters: int) -> float:
    """The fraction of PEs the folds occupy: row_dim·col_dim / (row_folds·AR · col_folds·AC)."""
    grid = fold_grid(dataflow, array_rows, array_cols, output_pixels, reduction_length, filters)
    return (grid.row_dim * grid.col_dim) / (grid.row_folds * array_rows * grid.col_folds * array_cols)
