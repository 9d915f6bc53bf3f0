"""An independent check that a pruned W[O, K] meets its pattern exactly.

Written from the pattern definitions in DESIGN.md with plain reshapes and loops, not with the
index arrays the patterns module uses, so that a bug there cannot hide itself here. Assumes the
weights had no zeros before pruning (tests use normal random weights).
"""

from __future__ import annotations

import math

import numpy as np

from onnxsparse.sparsity.patterns import MCBBS, NM, Bank, Block, Channel, Filter, Kernel, MatrixShape, Unstructured


def round_half_up(value: float) -> int:
    return math.floor(value + 0.5 + 1e-9)


def _strips(matrix: np.ndarray, shape: MatrixShape, multiple: int) -> tuple[np.ndarray, np.ndarray]:
    """Strips padded with zeros to a multiple of `multiple`: values and a real-position mask."""
    strips = matrix.reshape(shape.out_channels * shape.kernel_positions, shape.strip_length)
    padded_length = -(-shape.strip_length // multiple) * multiple
    values = np.zeros((strips.shape[0], padded_length), matrix.dtype)
    real = np.zeros_like(values, dtype=bool)
    values[:, : shape.strip_length] = strips
    real[:, : shape.strip_length] = True
    return values, real


def _all_or_nothing(unit_values: np.ndarray, unit_real: np.ndarray) -> np.ndarray:
    """Per unit (last axis = its elements): True if kept. Fails unless each unit is all zero or all
    nonzero over its real elements."""
    nonzero = (unit_values != 0) & unit_real
    kept = nonzero.any(axis=-1)
    complete = (nonzero == unit_real).all(axis=-1)
    assert np.all(complete | ~kept), "a unit is partly pruned"
    return kept


def check_pattern(matrix: np.ndarray, shape: MatrixShape, pattern, sparsity: float) -> None:
    """Assert that `matrix` meets `pattern` at `sparsity` exactly (counts and structure)."""
    assert matrix.shape == (shape.out_channels, shape.columns)
    if isinstance(pattern, Unstructured):
        expected = max(1, round_half_up((1 - sparsity) * matrix.size))
        assert np.count_nonzero(matrix) == expected
        return
    if isinstance(pattern, (NM, Bank)):
        group = pattern.group if isinstance(pattern, NM) else pattern.bank_size
        keep = pattern.keep if isinstance(pattern, NM) else max(1, round_half_up((1 - sparsity) * group))
        values, real = _strips(matrix, shape, group)
        per_group = (values != 0).reshape(values.shape[0], -1, group).sum(axis=-1)
        real_per_group = real.reshape(real.shape[0], -1, group).sum(axis=-1)
        assert np.array_equal(per_group, np.minimum(keep, real_per_group))
        return
    if isinstance(pattern, MCBBS):
        cluster, prune_range = pattern.cluster_size, pattern.prune_range
        keep = max(1, math.ceil((1 - sparsity) * prune_range - 1e-6))
        values, real = _strips(matrix, shape, cluster * prune_range)
        clusters = values.reshape(values.shape[0], -1, prune_range, cluster)
        clusters_real = real.reshape(real.shape[0], -1, prune_range, cluster)
        kept = _all_or_nothing(clusters, clusters_real)
        real_clusters = clusters_real.any(axis=-1).sum(axis=-1)
        assert np.array_equal(kept.sum(axis=-1), np.minimum(keep, real_clusters))
        return
    cube = matrix.reshape(shape.out_channels, shape.kernel_positions, shape.strip_length)
    if isinstance(pattern, Block):
        rows = pattern.block_rows
        padded_rows = -(-shape.out_channels // rows) * rows
        values = np.zeros((padded_rows, shape.kernel_positions, shape.strip_length), matrix.dtype)
        real = np.zeros_like(values, dtype=bool)
        values[: shape.out_channels], real[: shape.out_channels] = cube, True
        # unit (block row b, input channel i): rows of the block x every kernel position
        units = values.reshape(-1, rows, shape.kernel_positions, shape.strip_length).transpose(0, 3, 1, 2)
        units_real = real.reshape(-1, rows, shape.kernel_positions, shape.strip_length).transpose(0, 3, 1, 2)
        kept = _all_or_nothing(units.reshape(*units.shape[:2], -1), units_real.reshape(*units.shape[:2], -1))
        keep = max(1, round_half_up((1 - sparsity) * shape.strip_length))
        assert np.all(kept.sum(axis=1) == keep), "block rows keep different unit counts"
        return
    if isinstance(pattern, Kernel):
        kept = _all_or_nothing(cube.transpose(0, 2, 1), np.ones_like(cube.transpose(0, 2, 1), dtype=bool))
    elif isinstance(pattern, Filter):
        kept = _all_or_nothing(matrix, np.ones_like(matrix, dtype=bool))
    elif isinstance(pattern, Channel):
        columns = cube.transpose(2, 0, 1).reshape(shape.strip_length, -1)
        kept = _all_or_nothing(columns, np.ones_like(columns, dtype=bool))
    else:
        raise AssertionError(f"no invariant for {pattern}")
    assert kept.sum() == max(1, round_half_up((1 - sparsity) * kept.size))
