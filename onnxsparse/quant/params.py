"""Quantization parameters: from a real range (or a weight) to scale, zero point and integer type.

Pure functions; docs/ARITHMETIC.md ("Quantization parameters") is the table they implement.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxsparse.errors import UsageError
from onnxsparse.quant.arithmetic import round_half_even

# A range of width 0 (a tensor that is always zero) still needs a positive scale.
MIN_SCALE = np.float32(1e-8)


@dataclass(frozen=True)
class QuantType:
    """An integer grid: how many bits, signed or not, and whether zero sits in the middle."""

    bits: int
    symmetric: bool

    @property
    def signed(self) -> bool:
        return self.symmetric

    @property
    def low(self) -> int:
        return -(2 ** (self.bits - 1) - 1) if self.symmetric else 0

    @property
    def high(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    @property
    def container(self) -> np.dtype:
        """The 8-bit type the values are stored in (low-bit values use part of its range)."""
        return np.dtype(np.int8) if self.symmetric else np.dtype(np.uint8)


@dataclass(frozen=True)
class QParams:
    """scale and zero point of a tensor (arrays of one value per channel along `axis`)."""

    scale: np.ndarray  # float32
    zero_point: np.ndarray  # container dtype
    qtype: QuantType
    axis: int | None = None  # None: per tensor

    def same_grid(self, other: QParams) -> bool:
        return (self.qtype == other.qtype and np.array_equal(self.scale, other.scale)
                and np.array_equal(self.zero_point, other.zero_point))


def check_bits(bits: int, what: str, allowed: range | tuple = range(2, 9)) -> None:
    if bits not in allowed:
        choices = f"{allowed.start}-{allowed.stop - 1}" if isinstance(allowed, range) else \
            " or ".join(map(str, allowed))
        raise UsageError(f"{what} bits must be {choices}, not {bits}")


def power_of_two_at_least(scale: np.ndarray) -> np.ndarray:
    """The smallest power of two >= scale (the fixed-point scheme's scales)."""
    return np.exp2(np.ceil(np.log2(np.maximum(scale, MIN_SCALE)))).astype(np.float32)


def range_params(low: np.ndarray | float, high: np.ndarray | float, qtype: QuantType, *,
                 axis: int | None = None, power_of_two: bool = False) -> QParams:
    """Scale and zero point covering [low, high] (extended to include 0) on the grid `qtype`."""
    low = np.minimum(np.asarray(low, np.float64), 0.0)
    high = np.maximum(np.asarray(high, np.float64), 0.0)
    if qtype.symmetric:
        scale = np.maximum(np.abs(low), high) / qtype.high
    else:
        scale = (high - low) / (qtype.high - qtype.low)
    scale = np.maximum(scale.astype(np.float32), MIN_SCALE)
    if power_of_two:
        scale = power_of_two_at_least(scale)
    if qtype.symmetric:
        zero_point = np.zeros_like(scale, dtype=qtype.container)
    else:
        zero_point = np.clip(round_half_even(qtype.low - low / scale), qtype.low, qtype.high).astype(qtype.container)
    return QParams(scale, zero_point, qtype, axis)


def weight_params(weight: np.ndarray, bits: int, *, axis: int | None, low: np.ndarray | None = None,
                  high: np.ndarray | None = None, power_of_two: bool = False) -> QParams:
    """Symmetric weight parameters (zero point 0), per channel along `axis` or per tensor.

    The range defaults to max|w| (of each channel); an observer may pass a clipped one.
    """
    qtype = QuantType(bits, symmetric=True)
    if low is None or high is None:
        magnitude = np.abs(weight)
        if axis is None:
            high = magnitude.max(initial=0.0)
        else:
            high = np.moveaxis(magnitude, axis, 0).reshape(weight.shape[axis], -1).max(axis=1, initial=0.0)
        low = -high
    return range_params(low, high, qtype, axis=axis, power_of_two=power_of_two)


def quantize_weight(weight: np.ndarray, params: QParams, keep_pattern: bool = False) -> np.ndarray:
    """Weights on their grid, int8 container; zero stays zero. With keep_pattern (a pruned model)
    the nonzero pattern is kept exactly: a nonzero weight that would round to zero becomes +-1."""
    scale = _broadcast(params.scale, weight.ndim, params.axis)
    quantized = round_half_even(weight.astype(np.float64) / scale)
    if keep_pattern:
        quantized = np.where((quantized == 0) & (weight != 0), np.sign(weight), quantized)
    return np.clip(quantized, params.qtype.low, params.qtype.high).astype(np.int8)


def _broadcast(values: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    if axis is None:
        return values
    shape = [1] * ndim
    shape[axis] = -1
    return values.reshape(shape)
