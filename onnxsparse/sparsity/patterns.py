"""Sparsity patterns as pure functions from a weight matrix W[O, K] and a sparsity to a mask.

Every pattern is the same mechanism with different geometry: the matrix is cut into *units*
(weights pruned or kept together) grouped into *domains*; every domain keeps the same number of
its highest-scoring units. W[O, K] is read as O rows of `kernel_positions` strips, each of
`strip_length` input channels (see onnxsparse.model.WeightLayout).

| pattern        | unit                                        | domain                     | kept per domain        |
|----------------|---------------------------------------------|----------------------------|------------------------|
| unstructured   | one weight                                  | the whole matrix           | round((1-s)*units)     |
| N:M            | one weight                                  | M consecutive in a strip   | N                      |
| bank:B         | one weight                                  | B consecutive in a strip   | round((1-s)*B)         |
| mcbbs:cCrR     | C consecutive input channels in a strip     | R consecutive clusters     | ceil((1-s)*R)          |
| 1xN            | N output channels x 1 input channel x kernel | N output channels (a block row) | round((1-s)*in ch.) |
| kernel         | one kh x kw kernel (1 out x 1 in channel)   | the whole matrix           | round((1-s)*units)     |
| filter         | one output channel (a row)                  | the whole matrix           | round((1-s)*rows)      |
| channel        | one input channel across all rows           | the whole matrix           | round((1-s)*channels)  |

Ragged tails (the one rule): a strip whose length is not a multiple of the group length (M, B,
R*C), or an O that is not a multiple of N, is padded with virtual zeros. Virtual units lose every
comparison, so a tail domain with r real units keeps min(kept, r) of them. Every domain keeps at
least one unit. Ties between equal scores keep the unit that comes first.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from onnxsparse.errors import UsageError

# Tolerance for sparsities given as decimals (0.75 from a command line, 1/3 from a division).
_EPS = 1e-9


@dataclass(frozen=True)
class MatrixShape:
    """The geometry patterns need: W[O, K] with K = kernel_positions * strip_length."""

    out_channels: int
    kernel_positions: int
    strip_length: int

    @property
    def columns(self) -> int:
        return self.kernel_positions * self.strip_length

    @property
    def size(self) -> int:
        return self.out_channels * self.columns


@dataclass(frozen=True)
class Units:
    """Index arrays cutting a matrix into units: index[domain, unit, element] into the flattened
    matrix, with `size` (one past the end) standing for a virtual zero; valid marks real units."""

    index: np.ndarray
    valid: np.ndarray
    size: int

    def gather(self, matrix: np.ndarray) -> np.ndarray:
        flat = np.append(matrix.reshape(-1), np.zeros(1, matrix.dtype))
        return flat[self.index]

    def real_elements(self) -> np.ndarray:
        return (self.index != self.size).sum(axis=-1)

    def scatter(self, keep_units: np.ndarray) -> np.ndarray:
        """The element mask (flattened, without the virtual slot) of the kept units."""
        mask = np.zeros(self.size + 1, dtype=bool)
        mask[self.index[keep_units]] = True
        return mask[: self.size]


class Pattern:
    """A sparsity pattern: its unit geometry, how many units a domain keeps, its valid sparsities."""

    spec: str
    #: the sparsity the pattern itself fixes (N:M), else None
    fixed_sparsity: float | None = None

    def units(self, shape: MatrixShape) -> Units:
        raise NotImplementedError

    def keep_count(self, sparsity: float, units_per_domain: int) -> int:
        return max(1, math.floor((1.0 - sparsity) * units_per_domain + 0.5 + _EPS))

    def too_small(self, shape: MatrixShape) -> str | None:
        """Why this pattern cannot apply to a matrix of this shape, or None."""
        return None

    def check_sparsity(self, sparsity: float) -> None:
        """Raise UsageError unless the pattern can be asked for this sparsity."""
        if not 0.0 <= sparsity < 1.0:
            raise UsageError(f"sparsity {sparsity} is outside [0, 1); give the fraction of zeros, e.g. 0.75")

    def nearest_valid(self, sparsity: float) -> float:
        """The closest sparsity this pattern can be asked for (used by global scope)."""
        return min(max(sparsity, 0.0), 1.0 - 1e-6)

    def floor_valid(self, sparsity: float) -> float:
        """The largest sparsity this pattern can be asked for that does not exceed `sparsity` (caps)."""
        return sparsity

    def mask(self, matrix: np.ndarray, shape: MatrixShape, sparsity: float, criterion) -> np.ndarray:
        """Boolean mask of the weights to keep, shape W[O, K]."""
        units = self.units(shape)
        keep = self.keep_count(sparsity, units.index.shape[1])
        return select(matrix, units, keep, criterion).reshape(shape.out_channels, shape.columns)

    def __str__(self) -> str:
        return self.spec


def select(matrix: np.ndarray, units: Units, keep: int, criterion) -> np.ndarray:
    """Keep the `keep` best-scoring real units of every domain; return the flat element mask."""
    scores = criterion.score(units.gather(matrix)).astype(np.float64)
    scores[~units.valid] = -np.inf
    return units.scatter(top_per_row(scores, keep) & units.valid)


def top_per_row(scores: np.ndarray, keep: int) -> np.ndarray:
    """Mask of the `keep` highest scores of every row; among equal scores the first wins.

    Linear time (a partition, not a sort): the same result as a stable descending sort.
    """
    units = scores.shape[1]
    keep = min(keep, units)
    if keep == units:
        return np.ones(scores.shape, dtype=bool)
    if keep <= 0:
        return np.zeros(scores.shape, dtype=bool)
    threshold = np.partition(scores, units - keep, axis=1)[:, units - keep, None]
    kept = scores > threshold
    ties = scores == threshold
    still_needed = keep - kept.sum(axis=1, keepdims=True)
    return kept | (ties & (np.cumsum(ties, axis=1) <= still_needed))


def _element_index(shape: MatrixShape, rows: np.ndarray, positions: np.ndarray,
                   channels: np.ndarray) -> np.ndarray:
    """Flat index of (row, kernel position, input channel), virtual (= size) where out of range."""
    rows, positions, channels = np.broadcast_arrays(rows, positions, channels)
    index = rows * shape.columns + positions * shape.strip_length + channels
    virtual = (rows >= shape.out_channels) | (channels >= shape.strip_length)
    return np.where(virtual, shape.size, index).astype(np.int64)


def _strip_groups(shape: MatrixShape, group_length: int, cluster: int = 1) -> Units:
    """Domains of `group_length` consecutive clusters (of `cluster` channels) along every strip."""
    span = group_length * cluster
    groups = -(-shape.strip_length // span)
    o = np.arange(shape.out_channels)[:, None, None, None, None]
    p = np.arange(shape.kernel_positions)[None, :, None, None, None]
    g = np.arange(groups)[None, None, :, None, None]
    u = np.arange(group_length)[None, None, None, :, None]
    e = np.arange(cluster)[None, None, None, None, :]
    index = _element_index(shape, o, p, g * span + u * cluster + e)
    index = index.reshape(-1, group_length, cluster)
    return Units(index, (index != shape.size).any(axis=-1), shape.size)


def _whole(index: np.ndarray, size: int) -> Units:
    """One domain holding every unit; index shape [units, elements]."""
    return Units(index[None], np.ones((1, index.shape[0]), dtype=bool), size)


@dataclass(frozen=True)
class Unstructured(Pattern):
    spec: str = "unstructured"

    def units(self, shape):
        return _whole(np.arange(shape.size, dtype=np.int64)[:, None], shape.size)

    def too_small(self, shape):
        return "fewer than 2 weights" if shape.size < 2 else None


@dataclass(frozen=True)
class NM(Pattern):
    """In every run of M consecutive positions of a strip exactly N are kept."""

    keep: int
    group: int

    @property
    def spec(self):
        return f"{self.keep}:{self.group}"

    @property
    def fixed_sparsity(self):
        return 1.0 - self.keep / self.group

    def units(self, shape):
        return _strip_groups(shape, self.group)

    def keep_count(self, sparsity, units_per_domain):
        return self.keep

    def too_small(self, shape):
        if shape.strip_length < self.group:
            return f"strip of {shape.strip_length} input channels is shorter than M={self.group}"
        return None

    def check_sparsity(self, sparsity):
        super().check_sparsity(sparsity)
        if abs(sparsity - self.fixed_sparsity) > 1e-6:
            raise UsageError(f"pattern {self.spec} fixes sparsity at {self.fixed_sparsity:g}, "
                             f"not {sparsity:g}; leave out the sparsity or change N")

    def nearest_valid(self, sparsity):
        return self.fixed_sparsity


@dataclass(frozen=True)
class Bank(Pattern):
    """Each strip cut into banks of B; every bank keeps round(B(1-s)) (rounded half up)."""

    bank_size: int

    @property
    def spec(self):
        return f"bank:{self.bank_size}"

    def units(self, shape):
        return _strip_groups(shape, self.bank_size)

    def too_small(self, shape):
        if shape.strip_length < self.bank_size:
            return f"strip of {shape.strip_length} input channels is shorter than the bank of {self.bank_size}"
        return None

    def nearest_valid(self, sparsity):
        kept = min(max(round((1 - sparsity) * self.bank_size), 1), self.bank_size)
        return 1 - kept / self.bank_size


@dataclass(frozen=True)
class MCBBS(Pattern):
    """Micro-range clustered bank-balanced: ceil((1-s)R) of every R clusters of C channels kept."""

    cluster_size: int
    prune_range: int

    @property
    def spec(self):
        return f"mcbbs:c{self.cluster_size}r{self.prune_range}"

    def units(self, shape):
        return _strip_groups(shape, self.prune_range, self.cluster_size)

    def keep_count(self, sparsity, units_per_domain):
        return max(1, math.ceil((1.0 - sparsity) * self.prune_range - 1e-6))

    def too_small(self, shape):
        span = self.prune_range * self.cluster_size
        if shape.strip_length < span:
            return f"strip of {shape.strip_length} input channels is shorter than R*C={span}"
        return None

    def check_sparsity(self, sparsity):
        super().check_sparsity(sparsity)
        steps = sparsity * self.prune_range
        if abs(steps - round(steps)) > 1e-6:
            valid = ", ".join(f"{k / self.prune_range:g}" for k in range(self.prune_range))
            raise UsageError(f"{self.spec} keeps whole clusters out of R={self.prune_range}, so sparsity "
                             f"{sparsity:g} is not possible; use one of {valid}")

    def nearest_valid(self, sparsity):
        kept = min(max(round((1 - sparsity) * self.prune_range), 1), self.prune_range)
        return 1 - kept / self.prune_range

    def floor_valid(self, sparsity):
        return math.floor(sparsity * self.prune_range + 1e-6) / self.prune_range


@dataclass(frozen=True)
class Block(Pattern):
    """1xN: units of N output channels x one input channel x the whole kernel; every block row
    of N output channels keeps the same number of units."""

    block_rows: int

    @property
    def spec(self):
        return f"1x{self.block_rows}"

    def units(self, shape):
        blocks = -(-shape.out_channels // self.block_rows)
        b = np.arange(blocks)[:, None, None, None]
        i = np.arange(shape.strip_length)[None, :, None, None]
        r = np.arange(self.block_rows)[None, None, :, None]
        p = np.arange(shape.kernel_positions)[None, None, None, :]
        index = _element_index(shape, b * self.block_rows + r, p, i)
        index = index.reshape(blocks, shape.strip_length, self.block_rows * shape.kernel_positions)
        return Units(index, np.ones(index.shape[:2], dtype=bool), shape.size)

    def too_small(self, shape):
        if shape.out_channels < self.block_rows:
            return f"{shape.out_channels} output channels are fewer than N={self.block_rows}"
        return None


@dataclass(frozen=True)
class Kernel(Pattern):
    spec: str = "kernel"

    def units(self, shape):
        o = np.arange(shape.out_channels)[:, None, None]
        i = np.arange(shape.strip_length)[None, :, None]
        p = np.arange(shape.kernel_positions)[None, None, :]
        index = _element_index(shape, o, p, i).reshape(-1, shape.kernel_positions)
        return _whole(index, shape.size)

    def too_small(self, shape):
        return "1x1 kernels (use unstructured)" if shape.kernel_positions < 2 else None


@dataclass(frozen=True)
class Filter(Pattern):
    spec: str = "filter"

    def units(self, shape):
        return _whole(np.arange(shape.size, dtype=np.int64).reshape(shape.out_channels, shape.columns),
                      shape.size)

    def too_small(self, shape):
        return "a single output channel" if shape.out_channels < 2 else None


@dataclass(frozen=True)
class Channel(Pattern):
    spec: str = "channel"

    def units(self, shape):
        i = np.arange(shape.strip_length)[:, None, None]
        o = np.arange(shape.out_channels)[None, :, None]
        p = np.arange(shape.kernel_positions)[None, None, :]
        index = _element_index(shape, o, p, i).reshape(shape.strip_length, -1)
        return _whole(index, shape.size)

    def too_small(self, shape):
        return "a single input channel" if shape.strip_length < 2 else None


PATTERN_SYNTAX = ("unstructured, N:M (e.g. 2:4), 1xN (e.g. 1x16), bank:B (e.g. bank:16), "
                  "mcbbs:cCrR (e.g. mcbbs:c2r4), kernel, filter, channel")


def parse_pattern(text: str) -> Pattern:
    """A pattern from its user-facing spec, e.g. '2:4', '1x16', 'bank:16', 'mcbbs:c2r4'."""
    spec = text.strip().lower().replace("×", "x")
    named = {"unstructured": Unstructured(), "kernel": Kernel(), "filter": Filter(), "channel": Channel()}
    if spec in named:
        return named[spec]
    if match := re.fullmatch(r"(\d+):(\d+)", spec):
        keep, group = int(match[1]), int(match[2])
        if not 1 <= keep < group:
            raise UsageError(f"pattern {text!r}: N:M needs 1 <= N < M (N kept out of every M)")
        return NM(keep, group)
    if match := re.fullmatch(r"1x(\d+)", spec):
        if int(match[1]) < 1:
            raise UsageError(f"pattern {text!r}: 1xN needs N >= 1 output channels per block")
        return Block(int(match[1]))
    if match := re.fullmatch(r"bank:(\d+)", spec):
        if int(match[1]) < 2:
            raise UsageError(f"pattern {text!r}: bank:B needs a bank of B >= 2")
        return Bank(int(match[1]))
    if match := re.fullmatch(r"mcbbs:c(\d+)r(\d+)", spec):
        cluster, prune_range = int(match[1]), int(match[2])
        if cluster < 1 or prune_range < 2:
            raise UsageError(f"pattern {text!r}: mcbbs:cCrR needs cluster C >= 1 and range R >= 2")
        return MCBBS(cluster, prune_range)
    raise UsageError(f"unknown pattern {text!r}; use one of: {PATTERN_SYNTAX}")


# Detection: the first of these that explains a tensor's zeros. More specific patterns come
# first: a channel mask is also a 1xN mask, a 1xN mask also a kernel mask, a c2r4 mask
# also a c2r8 mask (at the same sparsity), a 2:4 mask also a 4:8 and a bank:16 mask.
DETECTION_ORDER = tuple(parse_pattern(spec) for spec in (
    "filter", "channel", "1x32", "1x16", "1x8", "1x4", "kernel",
    "mcbbs:c4r4", "mcbbs:c2r4", "mcbbs:c2r8", "2:4", "1:4", "3:4", "4:8", "2:8", "1:8",
    "bank:16", "bank:32", "bank:64",
))


@dataclass(frozen=True)
class Detected:
    """The strongest pattern a tensor's zeros satisfy, and the sparsity that pattern accounts for."""

    spec: str
    pattern_sparsity: float


def structural_sparsity(matrix: np.ndarray, shape: MatrixShape, pattern: Pattern) -> float:
    """The sparsity of the densest mask of `pattern` that keeps every nonzero of `matrix`.

    Zero when the nonzeros fit the pattern only with every unit kept (or never for N:M when some
    run holds more than N nonzeros)."""
    units = pattern.units(shape)
    nonzero_units = (units.gather(matrix) != 0).any(axis=-1) & units.valid
    if isinstance(pattern, NM):
        if nonzero_units.sum(axis=1).max(initial=0) > pattern.keep:
            return 0.0
        kept_units = pattern.keep
    else:
        kept_units = int(nonzero_units.sum(axis=1).max(initial=0))
    if units.index.shape[0] == 1:  # one domain: the zero units themselves are the structure
        keep_units = nonzero_units
    else:
        keep_units = np.minimum(kept_units, units.valid.sum(axis=1))[:, None] > np.arange(units.valid.shape[1])
        keep_units &= units.valid
    real = units.real_elements()
    return 1.0 - float(real[keep_units].sum()) / shape.size


def detect_pattern(matrix: np.ndarray, shape: MatrixShape, explained: float = 0.9) -> Detected:
    """The first pattern in DETECTION_ORDER whose structure accounts for at least `explained` of
    the tensor's sparsity; 'unstructured' when none does, 'dense' when there are no zeros."""
    zeros = shape.size - int(np.count_nonzero(matrix))
    if zeros == 0:
        return Detected("dense", 0.0)
    sparsity = zeros / shape.size
    for pattern in DETECTION_ORDER:
        if pattern.too_small(shape):
            continue
        structural = structural_sparsity(matrix, shape, pattern)
        if structural > 0 and structural >= explained * sparsity - 1e-12:
            return Detected(pattern.spec, structural)
    return Detected("unstructured", sparsity)
