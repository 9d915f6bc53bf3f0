"""Canonical Huffman sections (docs/FORMAT.md section 5): round trips, codes, limits, size, hostile bytes."""

from __future__ import annotations

import heapq
import itertools
import struct
import time
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onnxsparse.formats.huffman import (
    HuffmanError,
    canonical_codes,
    code_lengths,
    decode_section,
    encode_section,
    entropy_bound_bytes,
    table_bytes,
)


def sample_fields(field_bits: int, count: int, distribution: str, seed: int) -> np.ndarray:
    """count fields < 2**field_bits: uniform, skewed (two-sided geometric around a random centre), or one value."""
    rng = np.random.default_rng(seed)
    top = 1 << field_bits
    if distribution == "uniform":
        return rng.integers(0, top, count)
    if distribution == "single":
        return np.full(count, rng.integers(0, top))
    steps = rng.geometric(rng.uniform(0.05, 0.9), count) * rng.choice([-1, 1], count)
    return (rng.integers(0, top) + steps) % top


def int8_like_weights(distribution: str, scale: float, count: int) -> np.ndarray:
    """Quantized weights as unsigned 8-bit fields (two's complement), from a Gaussian or Laplace."""
    rng = np.random.default_rng(7)
    draw = rng.normal(0, scale, count) if distribution == "gaussian" else rng.laplace(0, scale, count)
    return np.clip(np.round(draw), -128, 127).astype(np.int64) & 0xFF


def section_bytes(symbols, length_counts, block_offsets=(), stream=b"", *, block_size=4, symbol_count=None,
                  max_length=None, reserved=0, block_count=None) -> bytes:
    """A hand-built coding=1 section; each header field defaults to what the parts imply."""
    symbol_count = len(symbols) if symbol_count is None else symbol_count
    max_length = len(length_counts) if max_length is None else max_length
    block_count = len(block_offsets) if block_count is None else block_count
    return b"".join([
        struct.pack("<IBB", symbol_count, max_length, reserved),
        struct.pack(f"<{len(symbols)}H", *symbols),
        struct.pack(f"<{len(length_counts)}I", *length_counts),
        struct.pack("<II", block_size, block_count),
        struct.pack(f"<{len(block_offsets)}I", *block_offsets),
        bytes(stream),
    ])


# Fields 0 1 2 3 0 0 1 0 with frequencies 4:2:1:1 get the only optimal lengths 1, 2, 3, 3, so codes
# 0, 10, 110, 111; in blocks of 4 the second block starts at bit 1 + 2 + 3 + 3 = 9.
WORKED_FIELDS = np.array([0, 1, 2, 3, 0, 0, 1, 0])
WORKED_SECTION = bytes.fromhex(
    "04000000" "03" "00"              # symbol_count 4, max_length 3, reserved
    "0000" "0100" "0200" "0300"       # symbols in (length, symbol) order
    "01000000" "01000000" "02000000"  # one code of length 1, one of 2, two of 3
    "04000000" "02000000"             # block_size 4, block_count 2
    "00000000" "09000000"             # block offsets (bits)
    "5b90"                            # 0 10 110 111 | 0 0 10 0, MSB first, 2 zero padding bits
)


def test_worked_example_encodes_to_its_bytes_and_back():
    assert encode_section(WORKED_FIELDS, field_bits=2, block_size=4) == WORKED_SECTION
    assert table_bytes(WORKED_SECTION) == len(WORKED_SECTION) - 2
    np.testing.assert_array_equal(decode_section(WORKED_SECTION, 2, 8), WORKED_FIELDS)


def test_canonical_codes_match_rfc1951_example():
    lengths = np.array([3, 3, 3, 3, 3, 2, 4, 4])  # symbols A..H
    codes = canonical_codes(lengths)
    assert [format(int(code), f"0{length}b") for code, length in zip(codes, lengths)] == [
        "010", "011", "100", "101", "110", "00", "1110", "1111"]


def test_canonical_codes_skip_symbols_without_a_code():
    np.testing.assert_array_equal(canonical_codes(np.array([0, 2, 1, 0, 2])), [0, 0b10, 0b0, 0, 0b11])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(field_bits=st.integers(1, 16), count=st.integers(0, 5000),
       distribution=st.sampled_from(["uniform", "skewed", "single"]), block_size=st.integers(1, 5000),
       seed=st.integers(0, 2**32 - 1))
def test_decode_restores_encoded_fields_exactly(field_bits, count, distribution, block_size, seed):
    fields = sample_fields(field_bits, count, distribution, seed)
    encoded = encode_section(fields, field_bits, block_size)
    decoded = decode_section(memoryview(encoded), field_bits, count)
    assert decoded.dtype == (np.uint8 if field_bits <= 8 else np.uint16)
    np.testing.assert_array_equal(decoded, fields)
    assert encode_section(fields, field_bits, block_size) == encoded


def test_empty_section_is_single_symbol_zero_without_blocks_or_stream():
    encoded = encode_section(np.zeros(0, dtype=np.uint8), field_bits=8)
    assert encoded == section_bytes([0], [1], block_size=4096)
    assert table_bytes(encoded) == len(encoded)
    assert decode_section(encoded, 8, 0).shape == (0,)


def test_single_symbol_gets_a_one_bit_zero_code():
    encoded = encode_section(np.full(12, 5), field_bits=3, block_size=5)
    assert encoded == section_bytes([5], [1], [0, 5, 10], b"\0\0", block_size=5)
    np.testing.assert_array_equal(decode_section(encoded, 3, 12), np.full(12, 5))


def test_full_16_bit_alphabet_gets_16_bit_codes_and_round_trips():
    fields = np.random.default_rng(3).permutation(np.repeat(np.arange(1 << 16), 2))
    encoded = encode_section(fields, field_bits=16)
    assert struct.unpack_from("<IB", encoded) == (1 << 16, 16)
    np.testing.assert_array_equal(decode_section(encoded, 16, fields.size), fields)


def fibonacci(count: int) -> np.ndarray:
    values = [1, 1]
    while len(values) < count:
        values.append(values[-1] + values[-2])
    return np.array(values[:count])


def huffman_cost(frequencies) -> int:
    """Total coded bits of an unlimited Huffman code: the sum of all merged weights."""
    heap = [int(weight) for weight in frequencies if weight]
    heapq.heapify(heap)
    cost = 0
    while len(heap) > 1:
        merged = heapq.heappop(heap) + heapq.heappop(heap)
        cost += merged
        heapq.heappush(heap, merged)
    return cost


def test_length_limit_caps_fibonacci_frequencies_at_16_bits_and_round_trips():
    frequencies = fibonacci(24)  # unlimited Huffman would need 23-bit codes
    lengths = code_lengths(frequencies).astype(np.int64)
    assert lengths.max() == 16
    assert np.sum(2.0 ** -lengths) == 1.0
    assert np.all(np.diff(lengths) <= 0)  # heavier symbols never get longer codes
    fields = np.random.default_rng(0).permutation(np.repeat(np.arange(24), frequencies))
    encoded = encode_section(fields, field_bits=5)
    assert encoded[4] == 16  # max_length
    np.testing.assert_array_equal(decode_section(encoded, 5, fields.size), fields)


@settings(max_examples=100, deadline=None)
@given(frequencies=st.lists(st.integers(0, 1000), min_size=1, max_size=300).filter(any))
def test_code_lengths_cost_as_little_as_unlimited_huffman_when_16_bits_suffice(frequencies):
    lengths = code_lengths(np.array(frequencies)).astype(np.int64)
    used = np.array(frequencies) > 0
    assert np.all((lengths > 0) == used)
    if used.sum() > 1:
        assert np.sum(2.0 ** -lengths[used]) == 1.0
        assert int(np.dot(lengths, frequencies)) == huffman_cost(frequencies)


@settings(max_examples=60, deadline=None)
@given(frequencies=st.lists(st.integers(1, 500), min_size=2, max_size=6), max_length=st.integers(1, 4))
def test_code_lengths_are_optimal_under_a_tight_limit(frequencies, max_length):
    if len(frequencies) > 1 << max_length:
        with pytest.raises(ValueError):
            code_lengths(np.array(frequencies), max_length)
        return
    lengths = code_lengths(np.array(frequencies), max_length).astype(np.int64)
    assert lengths.max() <= max_length and np.sum(2.0 ** -lengths) == 1.0
    best = min(np.dot(candidate, frequencies)
               for candidate in itertools.product(range(1, max_length + 1), repeat=len(frequencies))
               if sum(2.0 ** -length for length in candidate) <= 1.0)
    assert np.dot(lengths, frequencies) == best


@pytest.mark.parametrize("distribution, scale", [("gaussian", 3), ("gaussian", 10), ("gaussian", 28),
                                                  ("laplace", 2), ("laplace", 4), ("laplace", 12)])
def test_stream_of_int8_like_weights_is_within_2_percent_of_entropy(distribution, scale):
    fields = int8_like_weights(distribution, scale, 1_000_000)
    encoded = encode_section(fields, field_bits=8)
    stream_size_bytes = len(encoded) - table_bytes(encoded)
    ratio = stream_size_bytes / entropy_bound_bytes(fields)
    print(f"{distribution} scale {scale}: stream / entropy bound = {ratio:.4f}, table {table_bytes(encoded)} bytes")
    assert ratio <= 1.02


def test_entropy_bound_of_two_equally_likely_symbols_is_one_bit_per_field():
    assert entropy_bound_bytes(np.array([3, 7] * 8)) == 2.0
    assert entropy_bound_bytes(np.zeros(0)) == 0.0


def test_five_million_fields_decode_in_lockstep_blocks():
    fields = int8_like_weights("laplace", 4, 5_000_000)
    encoded = encode_section(fields, field_bits=8)
    started = time.perf_counter()
    decoded = decode_section(encoded, 8, fields.size)
    print(f"decoded {fields.size} fields in {time.perf_counter() - started:.3f} s")
    np.testing.assert_array_equal(decoded, fields)


# Hostile input: every malformed section raises HuffmanError naming what is wrong.

# Symbols 0..3 with lengths 1, 2, 3, 3 (as WORKED_SECTION), one block of 2 fields: 0 then 3 = bits 0111.
VALID_TABLE = dict(symbols=[0, 1, 2, 3], length_counts=[1, 1, 2], block_offsets=[0], stream=b"\x70")


def test_hand_built_valid_section_decodes():
    np.testing.assert_array_equal(decode_section(section_bytes(**VALID_TABLE), 2, 2), [0, 3])


@pytest.mark.parametrize("change, field_bits, field_count, message", [
    (dict(length_counts=[1, 2, 2]), 2, 2, "length counts sum to 5"),
    (dict(symbols=[0, 1, 2, 3], length_counts=[2, 1, 1]), 2, 2, "over-subscribed"),
    (dict(symbols=[0, 1, 2, 3], length_counts=[0, 3, 1]), 2, 2, "under-subscribed"),
    (dict(symbols=[0, 1, 2, 3], length_counts=[1, 1, 2, 0]), 2, 2, "no code has max_length 4"),
    (dict(symbols=[0], length_counts=[1, 0]), 2, 2, "no code has max_length 2"),
    (dict(symbols=[1], length_counts=[0, 0, 1]), 2, 2, "single symbol has a 1-bit code"),
    (dict(symbol_count=0, symbols=[], length_counts=[]), 2, 0, "symbol_count 0"),
    (dict(symbols=[0, 1, 2, 3, 4], length_counts=[1, 1, 2, 1]), 2, 2, "symbol_count 5 is not in 1..4"),
    (dict(symbols=[0, 1, 2, 9]), 3, 2, "symbol 9 does not fit 3 bits"),
    (dict(symbols=[0, 1, 3, 3]), 2, 2, "repeated or out of"),
    (dict(symbols=[0, 1, 3, 2]), 2, 2, "out of \\(length, symbol\\) order"),
    (dict(symbols=[1, 1, 2, 3]), 2, 2, "symbol is repeated"),
    (dict(max_length=0, length_counts=[]), 2, 2, "max_length 0"),
    (dict(symbols=[0, 1], length_counts=[1] + [0] * 15 + [1], max_length=17), 2, 2, "max_length 17"),
    (dict(reserved=1), 2, 2, "reserved byte is 1"),
    (dict(block_size=0), 2, 2, "block_size 0"),
    (dict(block_size=65537), 2, 2, "block_size 65537"),
    (dict(block_count=2, block_offsets=[0, 4]), 2, 2, "block_count 2 does not match"),
    (dict(block_size=1, block_offsets=[0, 0]), 2, 2, "block 1 ends at bit 0|block 0 ends at bit 1"),
    (dict(block_size=1, block_offsets=[0, 5]), 2, 2, "block 0 ends at bit 1, not where block 1 starts"),
    (dict(block_size=1, block_offsets=[4, 1]), 2, 2, "block 0 starts at bit 4"),
    (dict(block_size=1, block_offsets=[0, 3, 1], stream=b"\x70\x00"), 2, 3, "block 2 starts at bit 1, before"),
    (dict(block_size=1, block_offsets=[0, 8]), 2, 2, "block 1 starts at bit 8, past the 8-bit stream"),
    (dict(stream=b"\x7f"), 2, 2, "stream has 1 bytes but its codes end at bit 4|padding bits"),
    (dict(stream=b"\x70\x00"), 2, 2, "stream has 2 bytes but its codes end at bit 4"),
    (dict(stream=b"\xff"), 2, 3, "stream has 1 bytes but its codes end at bit 9"),
    (dict(stream=b""), 2, 2, "too short for 2 codes"),
    (dict(symbols=[2], length_counts=[1], stream=b"\x40"), 2, 2, "code not in the table"),
    (dict(symbols=[2], length_counts=[1], block_offsets=[1], stream=b"\x00"), 2, 2, "block 0 starts at bit 1"),
    (dict(), 0, 2, "not 0"),
    (dict(), 17, 2, "not 17"),
])
def test_malformed_section_raises_huffman_error(change, field_bits, field_count, message):
    with pytest.raises(HuffmanError, match=message):
        decode_section(section_bytes(**{**VALID_TABLE, **change}), field_bits, field_count)


def test_block_running_past_the_stream_is_caught_before_reading_beyond_its_padding():
    # One block of 4000 3-bit codes claimed over a 2-byte stream: the code is complete, so every
    # window decodes; the bounds check must stop the block, not an IndexError.
    section = section_bytes([0, 1, 2, 3, 4, 5, 6, 7], [0, 0, 8], [0], b"\xff\xff", block_size=4000)
    with pytest.raises(HuffmanError, match="too short"):
        decode_section(section, 3, 4000)
    section = section_bytes([0, 1, 2], [1, 2], [0], b"\xff" * 600, block_size=4800)
    with pytest.raises(HuffmanError, match="block 0 runs past the end of the 4800-bit stream"):
        decode_section(section, 2, 4800)


def test_every_truncation_of_a_valid_section_is_rejected():
    fields = sample_fields(6, 300, "skewed", seed=5)
    encoded = encode_section(fields, field_bits=6, block_size=32)
    for length in range(len(encoded)):
        with pytest.raises(HuffmanError):
            decode_section(encoded[:length], 6, fields.size)


@pytest.mark.parametrize("block_size, block_count", [(4096, 3), (65536, 1 << 15)])
def test_huge_field_count_over_tiny_stream_fails_fast_without_allocating(block_size, block_count):
    section = section_bytes([0, 1], [2], [0] * block_count, b"\x00" * 16, block_size=block_size)
    tracemalloc.start()
    started = time.perf_counter()
    with pytest.raises(HuffmanError):
        decode_section(section, 1, 1 << 31)
    elapsed = time.perf_counter() - started
    _, peak_bytes = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak_bytes < 64 << 20
    assert elapsed < 1.0


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200), field_bits=st.integers(1, 16), field_count=st.integers(0, 2**32 - 1))
def test_random_bytes_raise_huffman_error_or_decode_to_field_count(data, field_bits, field_count):
    try:
        decoded = decode_section(data, field_bits, field_count)
    except HuffmanError:
        return
    assert decoded.shape == (field_count,)


MUTATION_SOURCES = [
    (bits, count, encode_section(sample_fields(bits, count, distribution, seed=count), bits, block_size))
    for bits, count, distribution, block_size in [
        (8, 400, "skewed", 64), (3, 200, "uniform", 7), (12, 150, "skewed", 1), (5, 60, "single", 16),
        (1, 90, "skewed", 30), (16, 120, "uniform", 50), (4, 0, "skewed", 4), (8, 100, "skewed", 4096)]
]


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(source=st.sampled_from(MUTATION_SOURCES), edits=st.binary(min_size=3, max_size=12),
       length_change=st.integers(-2, 4), count_change=st.sampled_from([0, 0, 0, 0, -1, 1, 1 << 20]))
def test_mutated_encodings_raise_huffman_error_or_decode_to_field_count(source, edits, length_change,
                                                                        count_change):
    field_bits, field_count, encoded = source
    mutated = bytearray(encoded)
    for position_high, position_low, value in zip(edits[0::3], edits[1::3], edits[2::3]):
        mutated[(position_high << 8 | position_low) % len(mutated)] = value
    mutated = mutated[:len(mutated) + length_change] if length_change < 0 else mutated + bytes(length_change)
    field_count = max(0, field_count + count_change)
    try:
        decoded = decode_section(bytes(mutated), field_bits, field_count)
    except HuffmanError:
        return
    assert decoded.shape == (field_count,)
    assert decoded.max(initial=0) < 1 << field_bits
