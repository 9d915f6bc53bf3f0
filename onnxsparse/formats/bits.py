"""Raw sections (docs/FORMAT.md section 2): fields of 1..32 bits packed LSB first, vectorized.

Fields are packed in chunks of `8 / gcd(field_bits, 8)` fields, which fill a whole number of bytes,
so each step below is one numpy operation over every chunk at once: at most 8 fields x 5 bytes.
"""

from __future__ import annotations

import math

import numpy as np

MAX_FIELD_BITS = 32


def bits_for(count: int) -> int:
    """bits(n) of docs/FORMAT.md: the width of an index field with n possible values, at least 1."""
    return max(1, (count - 1).bit_length())


def packed_bytes(field_count: int, field_bits: int) -> int:
    """Length of a raw section: ceil(field_count * field_bits / 8)."""
    return -(-field_count * field_bits // 8)


def field_dtype(field_bits: int) -> np.dtype:
    """The smallest unsigned dtype holding fields of this width (what decoders return)."""
    return np.dtype(np.uint8 if field_bits <= 8 else np.uint16 if field_bits <= 16 else np.uint32)


def _chunk(field_bits: int) -> tuple[int, int]:
    """(fields, bytes) of the smallest run of fields that ends on a byte boundary."""
    fields = 8 // math.gcd(field_bits, 8)
    return fields, fields * field_bits // 8


def _byte_parts(field_bits: int):
    """For each field j of a chunk, each byte it touches: (j, byte, left shift of the field's bits)."""
    fields, _ = _chunk(field_bits)
    for j in range(fields):
        start = j * field_bits
        for byte in range(start // 8, (start + field_bits - 1) // 8 + 1):
            yield j, byte, start - 8 * byte


def pack_fields(fields: np.ndarray, field_bits: int) -> bytes:
    """The raw section bytes of `fields` (unsigned, each < 2**field_bits), zero padded to a byte."""
    if not 1 <= field_bits <= MAX_FIELD_BITS:
        raise ValueError(f"field_bits must be 1..{MAX_FIELD_BITS}, got {field_bits}")
    fields = np.asarray(fields).reshape(-1)
    if field_bits in (8, 16, 32):
        return fields.astype(f"<u{field_bits // 8}", copy=False).tobytes()
    per_chunk, chunk_bytes = _chunk(field_bits)
    chunks = -(-fields.size // per_chunk)
    grid = np.zeros(chunks * per_chunk, dtype=np.uint64)
    grid[: fields.size] = fields
    grid = grid.reshape(chunks, per_chunk)
    out = np.zeros((chunks, chunk_bytes), dtype=np.uint8)
    for j, byte, shift in _byte_parts(field_bits):
        part = grid[:, j] << np.uint64(shift) if shift >= 0 else grid[:, j] >> np.uint64(-shift)
        out[:, byte] |= (part & np.uint64(0xFF)).astype(np.uint8)
    return out.reshape(-1)[: packed_bytes(fields.size, field_bits)].tobytes()


def unpack_fields(data: bytes | memoryview | np.ndarray, field_bits: int, field_count: int) -> np.ndarray:
    """The `field_count` fields of a raw section (field_dtype(field_bits)).

    The caller has checked len(data) == packed_bytes(field_count, field_bits).
    """
    raw = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data
    dtype = field_dtype(field_bits)
    if field_bits in (8, 16, 32):
        return raw.view(f"<u{field_bits // 8}").astype(dtype)
    per_chunk, chunk_bytes = _chunk(field_bits)
    chunks = -(-field_count // per_chunk)
    grid = np.zeros(chunks * chunk_bytes, dtype=np.uint8)
    grid[: raw.size] = raw
    grid = grid.reshape(chunks, chunk_bytes)
    out = np.zeros((chunks, per_chunk), dtype=np.uint64)
    for j, byte, shift in _byte_parts(field_bits):
        part = grid[:, byte].astype(np.uint64)
        out[:, j] |= part >> np.uint64(shift) if shift >= 0 else part << np.uint64(-shift)
    out &= np.uint64((1 << field_bits) - 1)
    return out.reshape(-1)[:field_count].astype(dtype)


def padding_is_zero(data: bytes | memoryview | np.ndarray, field_bits: int, field_count: int) -> bool:
    """True when the bits after the last field of a raw section are all zero."""
    used = field_count * field_bits % 8
    if used == 0:
        return True
    raw = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data
    return int(raw[-1]) >> used == 0
