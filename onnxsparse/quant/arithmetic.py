"""The integer arithmetic of quantized models: the one home of every rounding rule.

docs/ARITHMETIC.md states these rules; the numpy reference executor, the native kernels and the
systolic executor all call (or mirror, bit for bit) the functions here.

Everything is exact integer arithmetic in int64 numpy arrays; floats appear only where a scale
becomes a fixed-point multiplier (once per tensor or channel, at conversion time).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
# Requantization multipliers are Q31: M = multiplier * 2**-shift, multiplier in [2**30, 2**31).
MULTIPLIER_BITS = 31
MAX_SHIFT = 62


def round_half_even(values: np.ndarray) -> np.ndarray:
    """Round floats to the nearest integer, ties to even (as ONNX QuantizeLinear does)."""
    return np.rint(values)


def shift_round_half_even(values: np.ndarray, shift: np.ndarray | int) -> np.ndarray:
    """values / 2**shift rounded to nearest, ties to even; int64 in, int64 out; shift >= 0."""
    values = np.asarray(values, dtype=np.int64)
    shift = np.asarray(shift, dtype=np.int64)
    if np.any(shift < 0) or np.any(shift > MAX_SHIFT):
        raise ValueError("shift must be in [0, 62]")
    if shift.ndim == 0:  # one shift for all: Python-int operands, a third of the time on small arrays
        shift = int(shift)
        half, shifted = (1 << (shift - 1) if shift else 1), shift > 0
    else:
        half, shifted = np.where(shift > 0, np.left_shift(np.int64(1), np.maximum(shift - 1, 0)), 1), shift > 0
    floor = values >> shift
    remainder = values - (floor << shift)
    round_up = (remainder > half) | ((remainder == half) & shifted & ((floor & 1) == 1))
    return floor + round_up


@dataclass(frozen=True)
class FixedPointMultiplier:
    """A positive real multiplier M as multiplier * 2**-shift (arrays for per-channel)."""

    multiplier: np.ndarray  # int64 values in [2**30, 2**31), or 0 for M == 0
    shift: np.ndarray  # int64 values in [0, 62]

    def apply(self, accumulator: np.ndarray) -> np.ndarray:
        """round_half_even(accumulator * M) exactly, for |accumulator| < 2**31."""
        accumulator = np.asarray(accumulator, dtype=np.int64)
        return shift_round_half_even(accumulator * self.multiplier, self.shift)


def fixed_point_multiplier(real_multiplier: np.ndarray | float) -> FixedPointMultiplier:
    """Represent M (float64, 0 <= M < 2**31) as a Q31 multiplier and a right shift.

    M = m * 2**e with m in [0.5, 1); multiplier = round_half_even(m * 2**31) (2**31 becomes 2**30
    with e + 1); shift = 31 - e, clamped to [0, 62] (M below 2**-31 rounds every |acc| < 2**30 to 0
    anyway).
    """
    real = np.asarray(real_multiplier, dtype=np.float64)
    if np.any(real < 0) or np.any(real >= 2.0**31) or not np.all(np.isfinite(real)):
        raise ValueError("requantization multiplier must be finite and in [0, 2**31)")
    mantissa, exponent = np.frexp(real)
    multiplier = np.rint(mantissa * 2.0**MULTIPLIER_BITS).astype(np.int64)
    overflow = multiplier == 2**MULTIPLIER_BITS
    multiplier = np.where(overflow, 2 ** (MULTIPLIER_BITS - 1), multiplier)
    exponent = np.where(overflow, exponent + 1, exponent).astype(np.int64)
    shift = MULTIPLIER_BITS - exponent
    too_small = shift > MAX_SHIFT
    multiplier = np.where(too_small, 0, multiplier)
    shift = np.clip(shift, 0, MAX_SHIFT)
    return FixedPointMultiplier(multiplier.astype(np.int64), shift.astype(np.int64))


def requantize_multiplier(input_scale: np.ndarray | float, weight_scale: np.ndarray | float,
                          output_scale: np.ndarray | float) -> FixedPointMultiplier:
    """M = s_in * s_w / s_out, computed in float64 from the stored float32 scales."""
    real = (np.float64(input_scale) * np.asarray(weight_scale, dtype=np.float64)) / np.float64(output_scale)
    return fixed_point_multiplier(real)


def rescale_multiplier(input_scale: np.ndarray | float, output_scale: np.ndarray | float) -> FixedPointMultiplier:
    """M = s_in / s_out (a Concat input on another grid), in float64 from the float32 scales."""
    return fixed_point_multiplier(np.float64(input_scale) / np.float64(output_scale))


def average_multiplier(input_scale: np.ndarray | float, output_scale: np.ndarray | float,
                       counts: np.ndarray | int) -> FixedPointMultiplier:
    """M = s_x / (s_y * n) for an average over n elements, in float64 in exactly this order."""
    return fixed_point_multiplier(np.float64(input_scale) /
                                  (np.float64(output_scale) * np.asarray(counts, dtype=np.float64)))


def saturate(values: np.ndarray, low: int, high: int, dtype) -> np.ndarray:
    return np.clip(values, low, high).astype(dtype)


def quantize(values: np.ndarray, scale: np.ndarray | float, zero_point: np.ndarray | int, low: int, high: int,
             dtype) -> np.ndarray:
    """ONNX QuantizeLinear: saturate(round_half_even(x / scale) + zero_point), in float32."""
    scaled = np.asarray(values, dtype=np.float32) / np.asarray(scale, dtype=np.float32)
    return saturate(round_half_even(scaled) + np.asarray(zero_point, dtype=np.float32), low, high, dtype)


def dequantize(values: np.ndarray, scale: np.ndarray | float, zero_point: np.ndarray | int) -> np.ndarray:
    """ONNX DequantizeLinear: (x - zero_point) * scale, in float32."""
    return ((np.asarray(values, dtype=np.int32) - np.asarray(zero_point, dtype=np.int32))
            * np.asarray(scale, dtype=np.float32)).astype(np.float32)


def quantize_bias(bias: np.ndarray, input_scale: float, weight_scale: np.ndarray) -> np.ndarray:
    """Bias as int32 at scale s_in * s_w (per channel): round_half_even, saturated to int32."""
    scale = np.float64(input_scale) * np.asarray(weight_scale, dtype=np.float64)
    safe = np.where(scale > 0, scale, 1.0)
    quantized = np.where(scale > 0, round_half_even(np.asarray(bias, np.float64) / safe), 0)
    return saturate(quantized, INT32_MIN, INT32_MAX, np.int32)


@dataclass(frozen=True)
class AddRescale:
    """QLinearAdd's integer rule: q_y = sat(z_y + rhe(((q_a - z_a) * factor_a + (q_b - z_b) * factor_b) / 2**shift))."""

    factor_a: int
    factor_b: int
    shift: int

    def apply(self, centered_a: np.ndarray, centered_b: np.ndarray) -> np.ndarray:
        total = (np.asarray(centered_a, np.int64) * self.factor_a + np.asarray(centered_b, np.int64) * self.factor_b)
        return shift_round_half_even(total, self.shift)


def add_rescale(scale_a: float, scale_b: float, scale_y: float) -> AddRescale:
    """Both inputs on a common 2**-shift grid of the output scale, factors below 2**31.

    shift = 30 - ceil(log2(max(s_a, s_b) / s_y)), clamped to [0, 62]; factor = rhe(s / s_y * 2**shift).
    """
    ratio_a = np.float64(scale_a) / np.float64(scale_y)
    ratio_b = np.float64(scale_b) / np.float64(scale_y)
    largest = max(ratio_a, ratio_b)
    shift = int(np.clip(30 - int(np.ceil(np.log2(largest))), 0, MAX_SHIFT)) if largest > 0 else MAX_SHIFT
    factor_a = int(round_half_even(ratio_a * 2.0**shift))
    factor_b = int(round_half_even(ratio_b * 2.0**shift))
    return AddRescale(factor_a, factor_b, shift)
