"""Calibration observers: the ranges each method gives, in bounded memory, and their errors."""

from __future__ import annotations

import numpy as np
import pytest

from onnxsparse.errors import OnnxSparseError, UsageError
from onnxsparse.quant.arithmetic import dequantize, quantize
from onnxsparse.quant.observers import (
    METHODS,
    EntropyObserver,
    MinMaxObserver,
    MseObserver,
    PercentileObserver,
    make_observer,
)
from onnxsparse.quant.params import QuantType, range_params

HISTOGRAM_METHODS = ("percentile", "entropy", "mse")
LAPLACE_OUTLIERS = (40.0, -50.0, 60.0)


def observe(method: str, batches, **options):
    observer = make_observer(method, **options)
    for batch in batches:
        observer.collect(batch)
    return observer.compute_range()


def quantization_mse(data: np.ndarray, low, high, bits: int, symmetric: bool) -> float:
    """Mean squared error of quantizing `data` on the grid quant.params derives from [low, high]."""
    qtype = QuantType(bits, symmetric)
    params = range_params(low, high, qtype)
    quantized = quantize(data, params.scale, params.zero_point, qtype.low, qtype.high, qtype.container)
    restored = dequantize(quantized, params.scale, params.zero_point).astype(np.float64)
    return float(np.mean((restored - data) ** 2))


@pytest.fixture(scope="module")
def laplace_batches() -> list[np.ndarray]:
    """10 batches of 1e5 Laplace(0, 1) values (max |x| about 14) with three far outliers."""
    rng = np.random.default_rng(7)
    data = rng.laplace(size=1_000_000).astype(np.float32)
    data[rng.choice(data.size, len(LAPLACE_OUTLIERS), replace=False)] = LAPLACE_OUTLIERS
    return np.split(data, 10)


@pytest.fixture(scope="module")
def laplace_results(laplace_batches):
    """{(method, bits, symmetric): (high threshold, quantization MSE)} on the Laplace data."""
    data = np.concatenate(laplace_batches)
    results = {}
    for method in METHODS:
        for bits in (8, 4):
            for symmetric in (False, True):
                low, high = observe(method, laplace_batches, bits=bits, symmetric=symmetric)
                results[method, bits, symmetric] = (float(max(-low, high)),
                                                    quantization_mse(data, low, high, bits, symmetric))
    return results


def test_minmax_gives_exact_extremes_across_batches():
    batches = [np.array([[0.5, -1.25], [3.0, 0.0]]), np.array([2.0, -0.75]), np.array([[-2.5]])]
    low, high = observe("minmax", batches)
    assert low.shape == () and high.shape == ()
    assert (low, high) == (-2.5, 3.0)
    assert observe("minmax", batches, symmetric=True) == (-3.0, 3.0)


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_minmax_per_channel_gives_each_channels_extremes(axis):
    rng = np.random.default_rng(0)
    batches = [rng.normal(size=(3, 4, 5)) * np.arange(1, 5)[:, None] for _ in range(3)]
    low, high = observe("minmax", batches, channel_axis=axis)
    everything = np.moveaxis(np.stack(batches), axis if axis < 0 else axis + 1, 0)
    channels = everything.reshape(everything.shape[0], -1)
    np.testing.assert_array_equal(low, np.minimum(channels.min(axis=1), 0))
    np.testing.assert_array_equal(high, np.maximum(channels.max(axis=1), 0))
    assert low.shape == (everything.shape[0],) and low.dtype == np.float64


@pytest.mark.parametrize("method", METHODS)
def test_every_range_includes_zero(method):
    rng = np.random.default_rng(1)
    positive = [rng.uniform(2, 5, size=1000) for _ in range(2)]
    negative = [-batch for batch in positive]
    low, high = observe(method, positive)
    assert low == 0 and 2 < high <= 5
    low, high = observe(method, negative)
    assert -5 <= low < -2 and high == 0
    low, high = observe(method, [np.stack(positive)], channel_axis=0)
    np.testing.assert_array_equal(low, [0, 0])


@pytest.mark.parametrize("method", METHODS)
def test_symmetric_ranges_are_minus_t_to_t(method):
    rng = np.random.default_rng(2)
    batches = [rng.normal(1.0, 1.0, size=(4, 1000)) for _ in range(3)]
    low, high = observe(method, batches, symmetric=True, channel_axis=0)
    np.testing.assert_array_equal(low, -high)
    assert np.all(high > 0)


@pytest.mark.parametrize("method", METHODS)
def test_all_zero_tensor_gives_zero_range(method):
    batches = [np.zeros((2, 8), np.float32), np.zeros((2, 8), np.float32)]
    assert observe(method, batches) == (0.0, 0.0)
    low, high = observe(method, batches, symmetric=True, channel_axis=0)
    np.testing.assert_array_equal(high, [0.0, 0.0])


def test_percentile_of_a_normal_distribution_matches_its_quantile():
    rng = np.random.default_rng(3)
    batches = [rng.standard_normal(100_000) for _ in range(10)]
    low, high = observe("percentile", batches, percentile=99.9)
    assert high == pytest.approx(3.090, rel=0.02) and low == pytest.approx(-3.090, rel=0.02)
    low, high = observe("percentile", batches, percentile=99.9, symmetric=True)
    assert high == pytest.approx(3.291, rel=0.02)  # the 99.9th percentile of |x|


def test_percentile_ignores_a_few_huge_outliers_that_minmax_keeps():
    rng = np.random.default_rng(4)
    batches = [rng.standard_normal(100_000) for _ in range(10)]
    batches[3][:3] = [1000.0, -800.0, 900.0]
    assert observe("minmax", batches) == (-800.0, 1000.0)
    low, high = observe("percentile", batches)  # 99.999: the 10 most extreme values of 1e6 at each end
    assert -6 < low < -3.5 and 3.5 < high < 6


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("method", ["entropy", "mse"])
def test_entropy_and_mse_clip_heavy_tails_and_beat_minmax(laplace_results, method, symmetric):
    for bits in (8, 4):
        threshold, error = laplace_results[method, bits, symmetric]
        assert threshold < max(np.abs(LAPLACE_OUTLIERS)) / 2
        assert error < 0.5 * laplace_results["minmax", bits, symmetric][1]


@pytest.mark.parametrize("symmetric", [False, True])
def test_mse_observer_has_the_least_quantization_error_at_4_bits(laplace_results, symmetric):
    least = laplace_results["mse", 4, symmetric][1]
    for method in METHODS:
        assert least <= laplace_results[method, 4, symmetric][1] * 1.01, method


def test_entropy_gives_zero_to_t_for_non_negative_data():
    rng = np.random.default_rng(5)
    batches = [np.maximum(rng.laplace(size=50_000), 0) for _ in range(4)]
    batches[2][:2] = [40.0, 50.0]
    low, high = observe("entropy", batches)
    assert low == 0 and 5 < high < 25


@pytest.mark.parametrize("method", METHODS)
def test_memory_does_not_grow_with_the_number_of_batches(method):
    rng = np.random.default_rng(6)
    observer = make_observer(method, channel_axis=1)

    def array_bytes() -> int:
        return sum(value.nbytes for value in vars(observer).values() if isinstance(value, np.ndarray))

    for index in range(200):
        observer.collect(rng.normal(size=(2, 3, 50)) * (1 + index))  # the range keeps growing
        if index == 1:
            after_two = array_bytes()
    assert array_bytes() == after_two > 0


def test_range_growth_keeps_counting_earlier_batches():
    rng = np.random.default_rng(8)
    first = rng.uniform(0, 1, size=10_000)
    second = np.full(50, 100.0)
    assert observe("minmax", [first, second]) == (0.0, 100.0)
    # 99% of 10050 values lie in the first batch; 99.9% reach into the second.
    assert observe("percentile", [first, second], percentile=99)[1] == pytest.approx(0.995, abs=0.07)
    assert observe("percentile", [first, second], percentile=99.9)[1] == 100.0


@pytest.mark.parametrize("seed", range(4))
def test_histogram_growth_keeps_counts_exact(seed):
    rng = np.random.default_rng(seed)
    scales = [1.0, 3.0, 10.0, 2.5, 700.0]
    batches = [rng.uniform(-scale, scale, size=(2, 500)) for scale in scales]
    for batch, scale in zip(batches, scales):
        batch[:, 0] = scale  # each channel reaches the batch's scale exactly
    observer = PercentileObserver(channel_axis=0, bins=256)
    for batch in batches:
        observer.collect(batch)
    edge = 1024.0  # 1.0 doubled until it covers 700
    for channel in range(2):
        magnitudes = np.abs(np.concatenate([batch[channel] for batch in batches]))
        # Bins hold (jw, (j+1)w]: np.histogram's [a, b) bins over -|x|, reversed.
        expected = np.histogram(-magnitudes, bins=256, range=(-edge, 0))[0][::-1]
        np.testing.assert_array_equal(observer._magnitude_counts()[channel], expected)


@pytest.mark.parametrize("method", HISTOGRAM_METHODS)
def test_per_channel_ranges_equal_ranges_of_each_channel_alone(method):
    rng = np.random.default_rng(9)
    batches = [rng.laplace(size=(3, 5, 400)) * np.array([0.1, 1, 10, 0, 3])[:, None] for _ in range(3)]
    for symmetric in (False, True):
        low, high = observe(method, batches, channel_axis=1, bits=4, symmetric=symmetric)
        for channel in range(5):
            alone = observe(method, [batch[:, channel] for batch in batches], bits=4, symmetric=symmetric)
            np.testing.assert_allclose((low[channel], high[channel]), alone, rtol=1e-9)


@pytest.mark.parametrize("method", METHODS)
def test_same_batches_give_bit_identical_ranges(method):
    rng = np.random.default_rng(10)
    batches = [rng.normal(size=(4, 300)).astype(np.float32) * (index + 1) for index in range(5)]
    first = observe(method, batches, channel_axis=0)
    second = observe(method, [batch.copy() for batch in batches], channel_axis=0)
    assert all(np.array_equal(a, b) and a.tobytes() == b.tobytes() for a, b in zip(first, second))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_values_are_refused(method, bad):
    observer = make_observer(method)
    with pytest.raises(OnnxSparseError, match="NaN or Inf"):
        observer.collect(np.array([1.0, bad, 2.0]))


@pytest.mark.parametrize("method", METHODS)
def test_compute_range_before_collect_is_refused(method):
    with pytest.raises(OnnxSparseError, match="no values collected"):
        make_observer(method).compute_range()


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(UsageError, match="minmax, percentile, entropy, mse"):
        make_observer("kl")


@pytest.mark.parametrize("observer_class", [MinMaxObserver, PercentileObserver, EntropyObserver, MseObserver])
@pytest.mark.parametrize("bits", [1, 9, 16])
def test_bits_outside_2_to_8_are_refused(observer_class, bits):
    with pytest.raises(UsageError, match="bits must be 2-8"):
        observer_class(bits=bits)
    with pytest.raises(UsageError, match="bits must be 2-8"):
        make_observer(observer_class.method, bits=bits)


def test_make_observer_passes_each_methods_own_options_and_refuses_others():
    assert METHODS == ("minmax", "percentile", "entropy", "mse")
    observer = make_observer("percentile", bits=4, symmetric=True, channel_axis=0, percentile=99.0, bins=512)
    assert isinstance(observer, PercentileObserver)
    assert (observer.bits, observer.symmetric, observer.channel_axis, observer.percentile, observer.bins) == \
        (4, True, 0, 99.0, 512)
    with pytest.raises(UsageError, match="takes no option percentile"):
        make_observer("mse", percentile=99.0)
    with pytest.raises(UsageError, match="between 50 and 100"):
        make_observer("percentile", percentile=101)
    with pytest.raises(UsageError, match="power of two"):
        make_observer("entropy", bins=1000)


def test_changing_channel_count_or_bad_axis_is_refused():
    observer = make_observer("mse", channel_axis=0)
    observer.collect(np.ones((3, 4)))
    with pytest.raises(OnnxSparseError, match="4 channels along axis 0, earlier batches had 3"):
        observer.collect(np.ones((4, 4)))
    with pytest.raises(UsageError, match="channel axis 2 is out of range"):
        make_observer("minmax", channel_axis=2).collect(np.ones((3, 4)))
