"""Calibration observers: one class per method, all with the same two calls, in bounded memory.

`collect(values)` once per batch, then `compute_range()` gives (low, high) to quantize; like
onnxruntime's calibrators, but nothing is stored per value: histogram observers keep a fixed
number of bins whatever the number of batches.

| method     | range                                                                                |
|------------|--------------------------------------------------------------------------------------|
| minmax     | the exact min and max                                                                |
| percentile | the (100 - p)th and pth percentiles (of the magnitudes when symmetric)               |
| entropy    | the magnitude t whose clipped, quantized histogram is closest in KL divergence to    |
|            | the real one (TensorRT): (-t, t), (0, t) for non-negative data, else clipped min/max |
| mse        | the shrunk min/max range with the least expected squared quantization error          |

Every range includes 0 (the grid must represent it exactly) and is symmetric, (-t, t), when the
observer is. A tensor that is always zero gives (0, 0); quant.params turns that into a tiny scale.

The histogram (one row per channel) counts values by sign and by magnitude bin (jw, (j+1)w] over
[0, edge]. When a batch exceeds the edge, the edge doubles as often as needed and adjacent bins
merge, so the counts stay exact: the same histogram as if the final edge had been known up front.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Iterator

import numpy as np

from onnxsparse.errors import OnnxSparseError, UsageError
from onnxsparse.quant.params import QuantType, check_bits, range_params

DEFAULT_BINS = 2048
# Entropy calibration needs at least one bin per level of an 8-bit asymmetric grid.
MIN_BINS = 256
# The smallest clipping threshold entropy calibration considers, in bins of |x| (TensorRT's 128).
ENTROPY_FIRST_CANDIDATE_BINS = 128
# The probability KL divergence gives a bin quantization left empty (MXNet's and onnxruntime's smoothing).
ENTROPY_SMOOTHING = 1e-4
# MSE search: shrink factors of the min/max range, a geometric sweep then a linear refinement.
MSE_COARSE_FACTORS = np.geomspace(1 / 256, 1.0, 64)
MSE_FINE_STEPS = 32
# Bound on the temporaries of the vectorized searches: float64 elements per array, cache-sized (512 kB).
_CHUNK_ELEMENTS = 1 << 16


class Observer(ABC):
    """Collects one tensor's values batch by batch in bounded memory; gives the range to quantize.

    `bits` and `symmetric` name the grid the range is for (entropy and MSE measure its error):
    symmetric is [-(2^(b-1)-1), 2^(b-1)-1] with zero point 0, asymmetric is 2^b - 1 steps over
    [low, high]. `channel_axis` gives one range per channel along that axis (weights); None, one
    per tensor.
    """

    method: str

    def __init__(self, bits: int = 8, symmetric: bool = False, channel_axis: int | None = None):
        check_bits(bits, "observer")
        self.bits = bits
        self.symmetric = symmetric
        self.channel_axis = channel_axis
        self._min: np.ndarray | None = None  # (C,) smallest value seen per channel
        self._max: np.ndarray | None = None  # (C,) largest value seen per channel

    @property
    def qtype(self) -> QuantType:
        return QuantType(self.bits, self.symmetric)

    def collect(self, values: np.ndarray) -> None:
        """Take one batch of the tensor's values (any shape; the channel axis as configured)."""
        rows = self._channel_rows(values)
        if rows.shape[1] == 0:
            return
        if not np.isfinite(rows).all():
            raise OnnxSparseError("values contain NaN or Inf; calibration needs finite values (check the "
                                  "calibration data and the layers before this tensor)")
        if self._min is None:
            self._min = rows.min(axis=1)
            self._max = rows.max(axis=1)
            self._start(rows.shape[0])
        elif rows.shape[0] != self._min.shape[0]:
            raise OnnxSparseError(f"batch has {rows.shape[0]} channels along axis {self.channel_axis}, "
                                  f"earlier batches had {self._min.shape[0]}")
        else:
            np.minimum(self._min, rows.min(axis=1), out=self._min)
            np.maximum(self._max, rows.max(axis=1), out=self._max)
        self._observe(rows)

    def compute_range(self) -> tuple[np.ndarray, np.ndarray]:
        """(low, high) in float64, shape () per tensor or (C,) per channel; low <= 0 <= high.

        A tensor that was always zero gives (0, 0): callers turn that into a tiny scale.
        """
        if self._min is None:
            raise OnnxSparseError("no values collected: call collect() with at least one batch before "
                                  "compute_range()")
        low, high = self._channel_range()
        low = np.minimum(np.asarray(low, np.float64), 0.0)
        high = np.maximum(np.asarray(high, np.float64), 0.0)
        if self.symmetric:
            high = np.maximum(-low, high)
            low = -high
        if self.channel_axis is None:
            return low.reshape(()), high.reshape(())
        return low, high

    def _channel_rows(self, values: np.ndarray) -> np.ndarray:
        """The batch as float64 rows, one per channel (a single row per tensor)."""
        values = np.asarray(values, dtype=np.float64)
        if self.channel_axis is None:
            return values.reshape(1, -1)
        if not -values.ndim <= self.channel_axis < values.ndim:
            raise UsageError(f"channel axis {self.channel_axis} is out of range for values of shape "
                             f"{values.shape}")
        return np.moveaxis(values, self.channel_axis, 0).reshape(values.shape[self.channel_axis], -1)

    def _max_magnitude(self) -> np.ndarray:
        return np.maximum(-self._min, self._max)

    def _start(self, channels: int) -> None:
        """Allocate per-channel state on the first batch (nothing beyond min/max by default)."""

    def _observe(self, rows: np.ndarray) -> None:
        """Fold one batch (rows [C, N]) into the state beyond min/max (nothing by default)."""

    @abstractmethod
    def _channel_range(self) -> tuple[np.ndarray, np.ndarray]:
        """(low, high) per channel, shape (C,) each; the caller includes 0 and symmetrizes."""


class MinMaxObserver(Observer):
    """The exact extremes: nothing is clipped, so one outlier widens every step."""

    method = "minmax"

    def _channel_range(self) -> tuple[np.ndarray, np.ndarray]:
        return self._min.copy(), self._max.copy()


class HistogramObserver(Observer):
    """A base for methods that choose a range from the distribution: a fixed-size histogram per channel.

    Counts are [C, 2, bins]: [:, 0] negative values, [:, 1] the others, by magnitude bin j holding
    |x| in (jw, (j+1)w] (bin 0 also holds 0) with w = edge / bins. The edge starts at the first
    batch's max|x| and doubles when a batch exceeds it; merging bins in groups of 2^k keeps every
    count where a histogram built with the new edge would have put it.
    """

    def __init__(self, bits: int = 8, symmetric: bool = False, channel_axis: int | None = None, *,
                 bins: int = DEFAULT_BINS):
        super().__init__(bits, symmetric, channel_axis)
        if bins < MIN_BINS or bins & (bins - 1):
            raise UsageError(f"histogram bins must be a power of two >= {MIN_BINS}, not {bins}")
        self.bins = bins
        self._counts: np.ndarray | None = None  # int64 [C, 2, bins]
        self._edge: np.ndarray | None = None  # float64 [C]: the histogram covers |x| <= edge

    def _start(self, channels: int) -> None:
        self._counts = np.zeros((channels, 2, self.bins), dtype=np.int64)
        self._edge = np.zeros(channels, dtype=np.float64)

    def _observe(self, rows: np.ndarray) -> None:
        magnitudes = np.abs(rows)
        self._grow(magnitudes.max(axis=1))
        width = self._safe_bin_width()
        bin_index = np.clip(np.ceil(magnitudes / width[:, None]) - 1, 0, self.bins - 1).astype(np.int64)
        channel = np.arange(rows.shape[0], dtype=np.int64)[:, None]
        flat = (channel * 2 + (rows >= 0)) * self.bins + bin_index
        self._counts += np.bincount(flat.ravel(), minlength=self._counts.size).reshape(self._counts.shape)

    def _grow(self, needed: np.ndarray) -> None:
        """Widen each channel's edge to cover `needed` by doubling it, merging bins so counts stay exact."""
        growing = needed > self._edge
        # A channel that has seen only zeros has all its counts in bin 0, right for any edge.
        fresh = growing & (self._edge == 0)
        self._edge[fresh] = needed[fresh]
        doubling = np.flatnonzero(growing & ~fresh)
        if doubling.size == 0:
            return
        edge, target = self._edge[doubling], needed[doubling]
        doublings = np.ceil(np.log2(target / edge)).astype(np.int64)
        doublings += np.ldexp(edge, doublings) < target  # log2 rounding
        for count in np.unique(doublings):
            rows = doubling[doublings == count]
            group = 1 << min(int(count), self.bins.bit_length() - 1)
            merged = self._counts[rows].reshape(rows.size, 2, self.bins // group, group).sum(axis=-1)
            self._counts[rows] = 0
            self._counts[rows, :, : self.bins // group] = merged
            self._edge[rows] = np.ldexp(self._edge[rows], count)

    def _bin_width(self) -> np.ndarray:
        return self._edge / self.bins

    def _safe_bin_width(self) -> np.ndarray:
        """The bin width, 1 where the edge is 0 (then every value is 0 and lands in bin 0 anyway)."""
        width = self._bin_width()
        return np.where(width > 0, width, 1.0)

    def _magnitude_counts(self) -> np.ndarray:
        """Counts of |x| by bin, [C, bins], bin j covering (jw, (j+1)w]."""
        return self._counts.sum(axis=1)

    def _signed_counts(self) -> np.ndarray:
        """Counts of x over [-edge, edge], [C, 2 * bins] in ascending order of x."""
        return np.concatenate([self._counts[:, 0, ::-1], self._counts[:, 1]], axis=1)


class PercentileObserver(HistogramObserver):
    """Percentiles of the values (of |x| when symmetric): drops the rarest (100 - p)% at each end."""

    method = "percentile"

    def __init__(self, bits: int = 8, symmetric: bool = False, channel_axis: int | None = None, *,
                 percentile: float = 99.999, bins: int = DEFAULT_BINS):
        super().__init__(bits, symmetric, channel_axis, bins=bins)
        if not 50 <= percentile <= 100:
            raise UsageError(f"percentile must be between 50 and 100, not {percentile}")
        self.percentile = percentile

    def _channel_range(self) -> tuple[np.ndarray, np.ndarray]:
        fraction = self.percentile / 100
        width = self._bin_width()
        if self.symmetric:
            magnitude = _histogram_quantile(self._magnitude_counts(), np.zeros_like(width), width, fraction)
            magnitude = np.minimum(magnitude, self._max_magnitude())
            return -magnitude, magnitude
        counts = self._signed_counts()
        low = _histogram_quantile(counts, -self._edge, width, 1 - fraction)
        high = _histogram_quantile(counts, -self._edge, width, fraction)
        return np.clip(low, self._min, self._max), np.clip(high, self._min, self._max)


class EntropyObserver(HistogramObserver):
    """The clipping threshold t that loses least information (KL divergence), as TensorRT calibrates.

    For each candidate t from ENTROPY_FIRST_CANDIDATE_BINS bins of |x| up (at least one bin per
    level), the histogram clipped at t (the rest folded into its last bin) is compared with itself
    quantized to the levels in [0, t]: 2^(b-1) of them, or 2^b for one-signed data on an asymmetric
    grid (post-ReLU), where the range is (0, t). Signed data on an asymmetric grid gets
    (max(min, -t), min(max, t)).
    """

    method = "entropy"

    def _channel_range(self) -> tuple[np.ndarray, np.ndarray]:
        magnitude_counts = self._magnitude_counts().astype(np.float64)
        one_signed = (self._min >= 0) | (self._max <= 0)
        levels = np.where(one_signed & (not self.symmetric), 2**self.bits, 2 ** (self.bits - 1))
        threshold_bins = np.zeros(len(levels), dtype=np.int64)
        for level_count in np.unique(levels):
            rows = np.flatnonzero(levels == level_count)
            threshold_bins[rows] = _least_divergent_bins(magnitude_counts[rows], int(level_count))
        threshold = np.minimum(threshold_bins * self._bin_width(), self._max_magnitude())
        return np.maximum(self._min, -threshold), np.minimum(self._max, threshold)


class MseObserver(HistogramObserver):
    """The shrink factor of the min/max range with the least expected squared quantization error.

    Each candidate's error is exact for the histogram read as a piecewise-uniform density: rounding
    error inside the grid, clipping error outside, on the grid quant.params derives from the range.
    MSE_COARSE_FACTORS are tried, then MSE_FINE_STEPS between the best one's neighbours.
    """

    method = "mse"

    def _channel_range(self) -> tuple[np.ndarray, np.ndarray]:
        if self.symmetric:
            high = self._max_magnitude()
            low = -high
        else:
            low, high = np.minimum(self._min, 0.0), np.maximum(self._max, 0.0)
        coarse = np.broadcast_to(MSE_COARSE_FACTORS, (len(low), MSE_COARSE_FACTORS.size))
        best = self._least_error_factor_index(coarse, low, high)
        last = MSE_COARSE_FACTORS.size - 1
        fine = np.linspace(MSE_COARSE_FACTORS[np.maximum(best - 1, 0)], MSE_COARSE_FACTORS[np.minimum(best + 1, last)],
                           MSE_FINE_STEPS, axis=-1)
        best = self._least_error_factor_index(fine, low, high)
        factor = np.take_along_axis(fine, best[:, None], axis=1)[:, 0]
        return factor * low, factor * high

    def _least_error_factor_index(self, factors: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
        """Per channel, the index into factors [C, F] of the shrunk range that errs least."""
        width = self._safe_bin_width()[:, None]
        if self.symmetric:  # the grid is symmetric, so the error of x is the error of |x|
            counts = self._magnitude_counts()
            edges = np.arange(self.bins + 1) * width
        else:
            counts = self._signed_counts()
            edges = (np.arange(2 * self.bins + 1) - self.bins) * width
        padded_density = np.pad(counts / width, ((0, 0), (1, 1)))
        density_drop = padded_density[:, :-1] - padded_density[:, 1:]  # [C, edges]: density left minus right
        # Only edges where the density changes matter; gather them to the front of each row.
        changes = density_drop != 0
        used = max(int(changes.sum(axis=1).max()), 1)
        order = np.argsort(~changes, axis=1, kind="stable")[:, :used]
        edges = np.take_along_axis(edges, order, axis=1)
        density_drop = np.take_along_axis(density_drop, order, axis=1)
        best = np.zeros(len(low), dtype=np.int64)
        for rows in _row_chunks(len(low), factors.shape[1] * used):
            errors = _expected_squared_error(edges[rows], density_drop[rows], factors[rows] * low[rows, None],
                                             factors[rows] * high[rows, None], self.qtype)
            best[rows] = np.argmin(errors, axis=1)
        return best


OBSERVERS: dict[str, type[Observer]] = {
    observer.method: observer for observer in (MinMaxObserver, PercentileObserver, EntropyObserver, MseObserver)
}
METHODS = tuple(OBSERVERS)


def make_observer(method: str, *, bits: int = 8, symmetric: bool = False, channel_axis: int | None = None,
                  **options) -> Observer:
    """The observer for calibration method `method` (one of METHODS), with its own `options`."""
    if method not in OBSERVERS:
        raise UsageError(f"unknown calibration method {method!r}; use one of: {', '.join(METHODS)}")
    observer_class = OBSERVERS[method]
    accepted = set(inspect.signature(observer_class).parameters) - {"bits", "symmetric", "channel_axis"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise UsageError(f"calibration method {method!r} takes no option {', '.join(unknown)}; "
                         f"its options: {', '.join(sorted(accepted)) or 'none'}")
    return observer_class(bits, symmetric, channel_axis, **options)


def _row_chunks(row_count: int, elements_per_row: int) -> Iterator[slice]:
    """Slices of rows small enough that a [rows, elements_per_row] temporary stays bounded."""
    step = max(1, _CHUNK_ELEMENTS // max(elements_per_row, 1))
    return (slice(start, start + step) for start in range(0, row_count, step))


def _histogram_quantile(counts: np.ndarray, start: np.ndarray, width: np.ndarray, fraction: float) -> np.ndarray:
    """The value below which `fraction` of each row's counts lie, interpolating within bins."""
    cumulative = np.cumsum(counts, axis=1, dtype=np.float64)
    target = fraction * cumulative[:, -1]
    index = np.argmax(cumulative >= target[:, None], axis=1)
    rows = np.arange(len(counts))
    before = np.where(index > 0, cumulative[rows, index - 1], 0.0)
    in_bin = counts[rows, index].astype(np.float64)
    within = np.where(in_bin > 0, (target - before) / np.where(in_bin > 0, in_bin, 1.0), 0.0)
    return start + (index + within) * width


def _x_log_x(values: np.ndarray) -> np.ndarray:
    return np.where(values > 0, values * np.log(np.where(values > 0, values, 1.0)), 0.0)


def _least_divergent_bins(counts: np.ndarray, levels: int) -> np.ndarray:
    """Per row of |x| counts [R, bins], the clipping threshold in bins with the least KL divergence.

    Candidate i: P is counts[:i] with everything beyond added to its last bin; Q merges counts[:i]
    (without what lies beyond) into `levels` groups of i // levels bins (the last takes the rest)
    and spreads each group evenly over its bins where P is non-zero. Only one bin can have Q = 0 and
    P > 0 (the last, when its group is empty but values lie beyond): it gets Q = ENTROPY_SMOOTHING,
    elsewhere no smoothing is needed. Computed from prefix sums, so each candidate costs O(levels).
    """
    bins = counts.shape[1]
    candidates = np.arange(max(ENTROPY_FIRST_CANDIDATE_BINS, levels), bins + 1)
    bounds = np.arange(levels + 1)[None, :] * (candidates // levels)[:, None]  # [candidates, levels + 1]
    bounds[:, -1] = candidates
    best = np.zeros(len(counts), dtype=np.int64)
    for rows in _row_chunks(len(counts), bounds.size):
        chunk = counts[rows]
        zero = np.zeros((len(chunk), 1))
        prefix = np.concatenate([zero, np.cumsum(chunk, axis=1)], axis=1)
        prefix_nonzero = np.concatenate([zero, np.cumsum(chunk > 0, axis=1)], axis=1)
        prefix_x_log_x = np.concatenate([zero, np.cumsum(_x_log_x(chunk), axis=1)], axis=1)
        total = prefix[:, -1:]
        beyond = total - prefix[:, candidates]  # [R, candidates]
        last_bin = chunk[:, candidates - 1] + beyond
        groups = np.diff(prefix[:, bounds], axis=-1)  # [R, candidates, levels]
        group_nonzero = np.diff(prefix_nonzero[:, bounds], axis=-1)
        group_nonzero[..., -1] += (chunk[:, candidates - 1] == 0) & (beyond > 0)
        inside = prefix[:, candidates]
        # Where Q's last group is empty but values lie beyond, P's last bin gets Q = ENTROPY_SMOOTHING.
        smoothed_share = np.where((groups[..., -1] == 0) & (beyond > 0), last_bin / total, 0.0)
        spread = np.where(groups > 0, groups / np.maximum(group_nonzero, 1.0), 1.0)  # Q per non-zero bin
        p_log_q = (groups * np.log(spread)).sum(axis=-1) + beyond * np.log(spread[..., -1])
        entropy = prefix_x_log_x[:, candidates - 1] + _x_log_x(last_bin)
        divergence = ((entropy - p_log_q) / total - np.log(total)
                      + (1 - smoothed_share) * np.log(np.maximum(inside, 1.0))
                      - smoothed_share * np.log(ENTROPY_SMOOTHING))
        best[rows] = candidates[np.argmin(divergence, axis=1)]
    return best


def _expected_squared_error(edges: np.ndarray, density_drop: np.ndarray, low: np.ndarray, high: np.ndarray,
                            qtype: QuantType) -> np.ndarray:
    """Σ count × mean (x - dequant(quant(x)))² for a piecewise-uniform density, per candidate range.

    The density is given by its bin edges [R, E] and the drop across each (left minus right); the
    integral over the bins is then Σ_edges drop × F(edge), F an antiderivative of the squared error.
    low, high: candidate ranges [R, F]. Returns [R, F].
    """
    params = range_params(low, high, qtype)
    scale = params.scale.astype(np.float64)  # [R, F]
    zero_point = params.zero_point.astype(np.float64)
    # In units of the step, x = u·s: the grid is the integers in [qtype.low - z, qtype.high - z].
    steps = edges[:, None, :] / scale[..., None]  # [R, F, E]
    on_grid = np.minimum(np.maximum(steps, (qtype.low - zero_point)[..., None]), (qtype.high - zero_point)[..., None])
    beyond = np.subtract(steps, on_grid, out=steps)  # clipped distance outside the grid (0 inside)
    nearest = np.floor(on_grid + 0.5)
    rounding = np.subtract(on_grid, nearest, out=on_grid)
    # 12·F/s³ = m + 4(r³ + d³): s³/12 per whole step from 0 to the nearest level m, r³/3 for the
    # partial step r, d³/3 for the distance d clipped.
    antiderivative = nearest + 4 * (rounding * rounding * rounding + beyond * beyond * beyond)
    return np.matmul(antiderivative, density_drop[:, :, None])[..., 0] * scale**3 / 12
