"""Canonical Huffman sections (coding = 1, docs/FORMAT.md section 5): encode, decode, measure.

The encoder is vectorized over fields; the decoder over blocks, one code per block per step
through a 2^max_length lookup table, so a section decodes in block_size numpy steps.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from onnxsparse.formats.errors import FormatError

MAX_CODE_LENGTH = 16
MAX_FIELD_BITS = 16
MAX_BLOCK_SIZE = 1 << 16
# The decoder checks every block's bit position this often, so between checks a block can run at
# most this many codes (16 bits each) past the stream: that many bytes of zero padding keep every
# window read inside the buffer.
_BOUNDS_CHECK_STEPS = 64
_STREAM_PADDING_BYTES = _BOUNDS_CHECK_STEPS * MAX_CODE_LENGTH // 8 + 4
# Lookup-table entries pack (symbol << _LENGTH_BITS) | code length.
_LENGTH_BITS = 5


class HuffmanError(FormatError):
    """A Huffman section (docs/FORMAT.md section 5) that is truncated or malformed."""


def code_lengths(frequencies: np.ndarray, max_length: int = MAX_CODE_LENGTH) -> np.ndarray:
    """Optimal prefix-code lengths no longer than max_length (package-merge); 0 for unused symbols.

    One used symbol gets length 1. Ties are broken by symbol, so the result is deterministic.
    """
    frequencies = np.asarray(frequencies, dtype=np.int64)
    used = np.flatnonzero(frequencies)
    if used.size == 0 or used.size > 1 << max_length:
        raise ValueError(f"{used.size} used symbols cannot get codes of at most {max_length} bits")
    lengths = np.zeros(frequencies.size, dtype=np.uint8)
    if used.size == 1:
        lengths[used] = 1
        return lengths
    by_weight = used[np.lexsort((used, frequencies[used]))]
    leaf_weights = frequencies[by_weight]
    leaf_count = leaf_weights.size
    # Level max_length holds the leaves; each level above merges the leaves with the pairs
    # ("packages") of the level below. Keep, per level, which merged items are leaves.
    items = leaf_weights
    leaf_flags_by_level = []
    for _ in range(max_length - 1):
        pair_count = items.size // 2
        packages = items[0:2 * pair_count:2] + items[1:2 * pair_count:2]
        merged = np.concatenate([leaf_weights, packages])
        merged_order = np.argsort(merged, kind="stable")
        items = merged[merged_order]
        leaf_flags_by_level.append(merged_order < leaf_count)
    # The cheapest 2n - 2 items of the top level are the solution; a package taken at one level
    # takes its two items at the level below. A leaf's length is the number of levels taking it.
    depth_changes = np.zeros(leaf_count + 1, dtype=np.int64)
    take = 2 * leaf_count - 2
    for leaf_flags in reversed(leaf_flags_by_level):
        leaves_taken = int(np.count_nonzero(leaf_flags[:take]))
        depth_changes[0] += 1
        depth_changes[leaves_taken] -= 1
        take = 2 * (take - leaves_taken)
    depth_changes[0] += 1
    depth_changes[take] -= 1
    lengths[by_weight] = np.cumsum(depth_changes[:-1])
    return lengths


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """DEFLATE's canonical codes for per-symbol code lengths (0 = no code): shorter first, ties by symbol."""
    lengths = np.asarray(lengths, dtype=np.int64)
    codes = np.zeros(lengths.size, dtype=np.int64)
    ordered = canonical_order(lengths)
    ordered_lengths = lengths[ordered]
    spans = _window_spans(ordered_lengths, MAX_CODE_LENGTH)
    codes[ordered] = (np.cumsum(spans) - spans) >> (MAX_CODE_LENGTH - ordered_lengths)
    return codes


def canonical_order(lengths: np.ndarray) -> np.ndarray:
    """The symbols that have a code, by (code length, symbol): the order codes are assigned and stored in."""
    used = np.flatnonzero(lengths)
    return used[np.lexsort((used, lengths[used]))]


def _window_spans(ordered_lengths: np.ndarray, window_bits: int) -> np.ndarray:
    """How many window_bits-bit windows start with each code, codes in (length, symbol) order.

    Canonical codes cover consecutive window ranges from 0 in this order: the encoder's codes are
    the ranges' starts, the decoder's lookup table repeats each symbol over its range.
    """
    return np.int64(1) << (window_bits - ordered_lengths)


def encode_section(fields: np.ndarray, field_bits: int, block_size: int = 4096) -> bytes:
    """The stored bytes of a coding=1 section holding fields (1-D unsigned ints < 2**field_bits).

    An empty input is coded as the single symbol 0 with no blocks and no stream. Raises
    HuffmanError if a block offset would not fit in u32 (a stream of 2^32 bits or more): use raw coding.
    """
    if not 1 <= field_bits <= MAX_FIELD_BITS:
        raise ValueError(f"field_bits must be 1..{MAX_FIELD_BITS} for Huffman coding, got {field_bits}")
    if not 1 <= block_size <= MAX_BLOCK_SIZE:
        raise ValueError(f"block_size must be 1..{MAX_BLOCK_SIZE}, got {block_size}")
    fields = np.asarray(fields)
    if fields.ndim != 1 or not (fields.dtype.kind in "ui" or fields.size == 0):
        raise ValueError(f"fields must be a 1-D integer array, got {fields.dtype} with shape {fields.shape}")
    fields = fields.astype(np.int64)
    if fields.size and (fields.min() < 0 or fields.max() >= 1 << field_bits):
        raise ValueError(f"fields must be in 0..{(1 << field_bits) - 1} for field_bits {field_bits}")

    frequencies = np.bincount(fields, minlength=1) if fields.size else np.ones(1, dtype=np.int64)
    lengths = code_lengths(frequencies).astype(np.int64)
    codes = canonical_codes(lengths)
    ordered = canonical_order(lengths)
    max_length = int(lengths.max())
    length_counts = np.bincount(lengths[ordered], minlength=max_length + 1)[1:]

    field_lengths = lengths[fields]
    bit_ends = np.cumsum(field_lengths)
    bit_starts = bit_ends - field_lengths
    block_offsets = bit_starts[::block_size]
    if block_offsets.size and block_offsets[-1] >= 1 << 32:
        raise HuffmanError(f"a Huffman stream of {int(bit_ends[-1])} bits needs block offsets beyond u32; "
                           "use raw coding")
    stream_bits = int(bit_ends[-1]) if fields.size else 0

    table = b"".join([
        np.array([ordered.size], dtype="<u4").tobytes(),
        bytes([max_length, 0]),
        ordered.astype("<u2").tobytes(),
        length_counts.astype("<u4").tobytes(),
        np.array([block_size, block_offsets.size], dtype="<u4").tobytes(),
        block_offsets.astype("<u4").tobytes(),
    ])
    return table + _pack_codes(codes[fields], field_lengths, bit_starts, stream_bits)


def _pack_codes(field_codes: np.ndarray, field_lengths: np.ndarray, bit_starts: np.ndarray,
                stream_bits: int) -> bytes:
    """Codes at their bit offsets, MSB first, into ceil(stream_bits / 8) bytes."""
    stream_bytes = -(-stream_bits // 8)
    if stream_bytes == 0:
        return b""
    # A code of <= 16 bits at bit offset 0..7 in its first byte lies within 3 bytes; codes do not
    # overlap, so adding each byte's parts ORs them (np.add.at is numpy's fast scatter).
    aligned = field_codes << (24 - field_lengths - (bit_starts & 7))
    first_byte = bit_starts >> 3
    stream = np.zeros(stream_bytes + 2, dtype=np.int64)
    for byte_shift, part in enumerate((aligned >> 16, (aligned >> 8) & 0xFF, aligned & 0xFF)):
        np.add.at(stream, first_byte + byte_shift, part)
    return stream[:stream_bytes].astype(np.uint8).tobytes()


class _Section(NamedTuple):
    """The parts of a stored section, as views of its bytes (nothing decoded or checked yet)."""

    symbol_count: int
    max_length: int
    reserved: int
    symbols: np.ndarray  # u16, in (code length, symbol) order
    length_counts: np.ndarray  # u32, for lengths 1..max_length
    block_size: int
    block_count: int
    block_offsets: np.ndarray  # u32 bit offsets
    stream: np.ndarray  # u8


def _split_section(data: bytes | memoryview) -> _Section:
    """Cut a stored section into its parts, checking only that each part is within the bytes."""
    raw = np.frombuffer(data, dtype=np.uint8)
    cursor = 0

    def take(size: int, dtype: str, what: str) -> np.ndarray:
        nonlocal cursor
        nbytes = size * np.dtype(dtype).itemsize
        if cursor + nbytes > raw.size:
            raise HuffmanError(f"Huffman section truncated: {what} needs bytes {cursor}..{cursor + nbytes - 1}, "
                               f"the section has {raw.size}")
        part = raw[cursor:cursor + nbytes].view(dtype)
        cursor += nbytes
        return part

    symbol_count = int(take(1, "<u4", "symbol_count")[0])
    max_length, reserved = (int(value) for value in take(2, "u1", "max_length and reserved"))
    symbols = take(symbol_count, "<u2", f"{symbol_count} symbols")
    length_counts = take(max_length, "<u4", f"{max_length} length counts")
    block_size, block_count = (int(value) for value in take(2, "<u4", "block_size and block_count"))
    block_offsets = take(block_count, "<u4", f"{block_count} block offsets")
    return _Section(symbol_count, max_length, reserved, symbols, length_counts, block_size, block_count,
                    block_offsets, raw[cursor:])


def table_bytes(data: bytes | memoryview) -> int:
    """Size of the table part (everything before the stream) of a stored section."""
    section = _split_section(data)
    return len(np.frombuffer(data, dtype=np.uint8)) - section.stream.size


def entropy_bound_bytes(fields: np.ndarray) -> float:
    """Order-0 entropy of the field sequence in bytes: the floor for any code of one field at a time."""
    fields = np.asarray(fields)
    if fields.size == 0:
        return 0.0
    _, counts = np.unique(fields, return_counts=True)
    return float(np.sum(counts * np.log2(fields.size / counts)) / 8)


def decode_section(data: bytes | memoryview, field_bits: int, field_count: int) -> np.ndarray:
    """The field_count fields of a stored coding=1 section (uint8 or uint16, by field_bits).

    Raises HuffmanError, one line saying what is wrong, for anything docs/FORMAT.md section 5 rejects;
    checks all sizes before allocating, so hostile bytes cost at most a small multiple of their length.
    """
    if field_count < 0:
        raise ValueError(f"field_count must be >= 0, got {field_count}")
    if not 1 <= field_bits <= MAX_FIELD_BITS:
        raise HuffmanError(f"Huffman sections hold fields of 1..{MAX_FIELD_BITS} bits, not {field_bits}")
    section = _split_section(data)
    ordered_lengths = _check_table(section, field_bits, field_count)
    _check_block_offsets(section, field_count, int(ordered_lengths[0]))
    dtype = np.uint8 if field_bits <= 8 else np.uint16
    if section.symbol_count == 1:
        _check_single_symbol_stream(section, field_count)
        return np.full(field_count, section.symbols[0], dtype=dtype)
    return _decode_blocks(section, ordered_lengths, field_count, dtype)


def _check_table(section: _Section, field_bits: int, field_count: int) -> np.ndarray:
    """Check the code table and block layout; return the code length of each stored symbol, in stored order."""
    symbol_count, max_length = section.symbol_count, section.max_length
    if not 1 <= symbol_count <= 1 << field_bits:
        raise HuffmanError(f"Huffman table: symbol_count {symbol_count} is not in 1..{1 << field_bits}")
    if not 1 <= max_length <= MAX_CODE_LENGTH:
        raise HuffmanError(f"Huffman table: max_length {max_length} is not in 1..{MAX_CODE_LENGTH}")
    if section.reserved != 0:
        raise HuffmanError(f"Huffman table: reserved byte is {section.reserved}, not 0")
    counts = section.length_counts.astype(np.int64)
    if int(counts.sum()) != symbol_count:
        raise HuffmanError(f"Huffman table: length counts sum to {int(counts.sum())}, not symbol_count {symbol_count}")
    if counts[-1] == 0:
        raise HuffmanError(f"Huffman table: no code has max_length {max_length}")
    kraft_sum = int(np.sum(counts << (max_length - np.arange(1, max_length + 1))))
    if symbol_count == 1 and max_length != 1:
        raise HuffmanError(f"Huffman table: a single symbol has a 1-bit code, not max_length {max_length}")
    if symbol_count > 1 and kraft_sum != 1 << max_length:
        state = "over-subscribed" if kraft_sum > 1 << max_length else "under-subscribed (incomplete)"
        raise HuffmanError(f"Huffman table: length counts are {state}: Kraft sum "
                           f"{kraft_sum}/{1 << max_length}")
    symbols = section.symbols.astype(np.int64)
    if symbols.max() >= 1 << field_bits:
        raise HuffmanError(f"Huffman table: symbol {int(symbols.max())} does not fit {field_bits} bits")
    ordered_lengths = np.repeat(np.arange(1, max_length + 1), counts)
    out_of_order = np.flatnonzero((np.diff(ordered_lengths) == 0) & (np.diff(symbols) <= 0))
    if out_of_order.size:
        index = int(out_of_order[0]) + 1
        raise HuffmanError(f"Huffman table: symbol {int(symbols[index])} at index {index} is repeated or out of "
                           "(length, symbol) order")
    if np.unique(symbols).size != symbol_count:
        raise HuffmanError("Huffman table: a symbol is repeated")
    if not 1 <= section.block_size <= MAX_BLOCK_SIZE:
        raise HuffmanError(f"Huffman table: block_size {section.block_size} is not in 1..{MAX_BLOCK_SIZE}")
    expected_blocks = -(-field_count // section.block_size)
    if section.block_count != expected_blocks:
        raise HuffmanError(f"Huffman table: block_count {section.block_count} does not match {field_count} "
                           f"fields in blocks of {section.block_size} ({expected_blocks})")
    return ordered_lengths


def _check_block_offsets(section: _Section, field_count: int, shortest_length: int) -> None:
    """Check block offsets are ordered and within the stream, and the stream can hold field_count codes."""
    stream_bits = 8 * section.stream.size
    if field_count * shortest_length > stream_bits:
        raise HuffmanError(f"Huffman stream of {stream_bits} bits is too short for {field_count} codes "
                           f"of at least {shortest_length} bits")
    offsets = section.block_offsets.astype(np.int64)
    if offsets.size == 0:
        return
    if offsets[0] != 0:
        raise HuffmanError(f"Huffman block 0 starts at bit {int(offsets[0])}, not 0")
    decreasing = np.flatnonzero(np.diff(offsets) < 0)
    if decreasing.size:
        block = int(decreasing[0]) + 1
        raise HuffmanError(f"Huffman block {block} starts at bit {int(offsets[block])}, before block {block - 1} "
                           f"(bit {int(offsets[block - 1])})")
    if offsets[-1] >= stream_bits:
        raise HuffmanError(f"Huffman block {offsets.size - 1} starts at bit {int(offsets[-1])}, past the "
                           f"{stream_bits}-bit stream")


def _check_single_symbol_stream(section: _Section, field_count: int) -> None:
    """A single-symbol stream is field_count 0 bits, blocks every block_size bits, zero padded."""
    expected_offsets = np.arange(section.block_count, dtype=np.int64) * section.block_size
    wrong = np.flatnonzero(section.block_offsets != expected_offsets)
    if wrong.size:
        block = int(wrong[0])
        raise HuffmanError(f"Huffman block {block} starts at bit {int(section.block_offsets[block])}, not "
                           f"{int(expected_offsets[block])} (single-symbol codes are 1 bit)")
    _check_stream_end(section.stream, field_count)
    ones = np.flatnonzero(section.stream)
    if ones.size:
        raise HuffmanError(f"Huffman stream byte {int(ones[0])} holds a code not in the table "
                           "(the single symbol's code is 0)")


def _check_stream_end(stream: np.ndarray, end_bit: int) -> None:
    """The last code ends at end_bit in the stream's last byte, and the bits after it are 0."""
    if -(-end_bit // 8) != stream.size:
        raise HuffmanError(f"Huffman stream has {stream.size} bytes but its codes end at bit {end_bit}")
    if end_bit % 8 and stream[-1] & ((1 << (8 - end_bit % 8)) - 1):
        raise HuffmanError("Huffman stream: padding bits after the last code are not 0")


def _decode_blocks(section: _Section, ordered_lengths: np.ndarray, field_count: int, dtype: type) -> np.ndarray:
    """Decode every block in lockstep, one code per block per step, and check where each block ends."""
    max_length, block_size, block_count = section.max_length, section.block_size, section.block_count
    if field_count == 0:
        _check_stream_end(section.stream, 0)
        return np.zeros(0, dtype=dtype)
    lookup = np.repeat((section.symbols.astype(np.int32) << _LENGTH_BITS) | ordered_lengths.astype(np.int32),
                       _window_spans(ordered_lengths, max_length))
    # Big-endian 32-bit word starting at every byte, over the stream and its zero padding.
    padded = np.concatenate([section.stream, np.zeros(_STREAM_PADDING_BYTES, dtype=np.uint8)]).astype(np.uint32)
    words = (padded[:-3] << 24) | (padded[1:-2] << 16) | (padded[2:-1] << 8) | padded[3:]
    window_mask = (1 << max_length) - 1
    stream_bits = 8 * section.stream.size

    steps = min(block_size, field_count)
    last_block_fields = field_count - (block_count - 1) * block_size
    entries = np.empty((steps, block_count), dtype=np.int32)
    positions = section.block_offsets.astype(np.int64)
    active = positions
    for step in range(steps):
        if step == last_block_fields:
            active = positions[:block_count - 1]
        if step % _BOUNDS_CHECK_STEPS == 0 and active.max() > stream_bits:
            block = int(np.argmax(active > stream_bits))
            raise HuffmanError(f"Huffman block {block} runs past the end of the {stream_bits}-bit stream")
        windows = (words[active >> 3] >> (32 - max_length - (active & 7))) & window_mask
        step_entries = lookup[windows]
        entries[step, :active.size] = step_entries
        active += step_entries & ((1 << _LENGTH_BITS) - 1)

    ends, next_starts = positions[:-1], section.block_offsets[1:]
    wrong = np.flatnonzero(ends != next_starts)
    if wrong.size:
        block = int(wrong[0])
        raise HuffmanError(f"Huffman block {block} ends at bit {int(ends[block])}, not where block {block + 1} "
                           f"starts (bit {int(next_starts[block])})")
    _check_stream_end(section.stream, int(positions[-1]))
    entries >>= _LENGTH_BITS
    return entries.astype(dtype).T.reshape(-1)[:field_count]
