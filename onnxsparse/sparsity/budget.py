"""Sparsity budgets: how a model-wide target is shared among layers (global scope)."""

from __future__ import annotations

import numpy as np

from onnxsparse.sparsity.patterns import MatrixShape, Pattern


def global_sparsities(matrices: list[np.ndarray], shapes: list[MatrixShape], pattern: Pattern,
                      target: float, criteria: list) -> list[float]:
    """Per-layer sparsities that together prune `target` of all these layers' weights.

    Units (elements for unstructured, blocks/banks/clusters/channels for the others) of every
    layer are ranked on one scale, their score divided by their size (so a 3x3 unit does not
    outrank a 1x1 one for being bigger); the weakest go first until `target` of the weights are
    gone. Each layer's share is then rounded to a sparsity its pattern can be asked for, and the
    layer is pruned locally at it, so every domain still keeps an equal count.
    """
    per_layer_scores, per_layer_sizes = [], []
    for matrix, shape, criterion in zip(matrices, shapes, criteria):
        units = pattern.units(shape)
        sizes = units.real_elements()
        scores = criterion.normalized(units.gather(matrix), sizes)
        per_layer_scores.append(scores[units.valid])
        per_layer_sizes.append(sizes[units.valid])
    threshold = _weighted_threshold(np.concatenate(per_layer_scores), np.concatenate(per_layer_sizes), target)
    sparsities = []
    for scores, sizes in zip(per_layer_scores, per_layer_sizes):
        below = scores < threshold
        share = float(sizes[below].sum()) / max(int(sizes.sum()), 1)
        sparsities.append(pattern.nearest_valid(share))
    return sparsities


def _weighted_threshold(scores: np.ndarray, sizes: np.ndarray, target: float) -> float:
    """The score below which units hold `target` of all elements (the weakest go first)."""
    total = int(sizes.sum())
    if np.all(sizes == sizes[0]):  # equal units (always for unstructured): a partition will do
        count = int(target * total) // int(sizes[0])
        return float(np.partition(scores, count)[count]) if count < len(scores) else np.inf
    order = np.argsort(scores)
    cut = int(np.searchsorted(np.cumsum(sizes[order]), target * total, side="right"))
    return float(scores[order[cut]]) if cut < len(order) else np.inf
