"""One packed tensor (docs/FORMAT.md sections 1–3): the header, the section table, the CRCs, and
the writer and reader built on them. The byte layout of the header lives here and nowhere else;
what each encoding stores lives in encodings.py, bit packing in bits.py, Huffman in huffman.py.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass

import numpy as np

from onnxsparse.errors import UsageError
from onnxsparse.formats import huffman
from onnxsparse.formats.bits import pack_fields, packed_bytes, padding_is_zero, unpack_fields
from onnxsparse.formats.encodings import (
    ENCODINGS, Encoding, Geometry, SectionLayout, UnitCensus, decode, encode, format_error,
)
from onnxsparse.formats.errors import FormatError
from onnxsparse.model import WeightLayout
from onnxsparse.sparsity.patterns import MatrixShape

__all__ = [
    "ENCODINGS", "Encoding", "FormatError", "PackedInfo", "Quantization", "SectionInfo", "pack_tensor",
    "read_info", "unpack_tensor",
]

MAGIC = b"OSPK"
VERSION = 1
VALUE_TYPES = ("float32", "float16", "int8", "intN")  # header value_type 0..3
LAYOUTS = ("conv", "conv_transpose", "rows", "cols")  # header layout 0..3 (WeightLayout.kind)
SECTION_KINDS = {1: "values", 2: "row_pointers", 3: "indices"}
CODINGS = ("raw", "huffman")  # section coding 0, 1
HUFFMAN_MODES = ("auto", "on", "off")
FLAG_QUANTIZATION = 1
FLAG_ZERO_POINTS_OMITTED = 2  # with FLAG_QUANTIZATION: every zero point is 0 and the array is left out
MAX_RANK = 8
MAX_SECTIONS = 4
MAX_ELEMENTS = 2**31 - 1
MAX_U32 = 2**32 - 1
MAX_HUFFMAN_FIELD_BITS = 16
HUFFMAN_BLOCK_SIZE = 4096  # fields per Huffman block (section 5)

_FIXED = struct.Struct("<4s8B5I")  # magic .. param_d
_QUANTIZATION = struct.Struct("<iI")  # axis, param_count
_SECTION = struct.Struct("<4B4I")  # kind, coding, field_bits, reserved, field_count, offset, length, crc
_CRC = struct.Struct("<I")
MIN_BYTES = _FIXED.size + _CRC.size

# The candidates encoding="auto" weighs, in tie-break order (ENCODINGS order, then as listed).
AUTO_NM_GROUPS = (4, 8, 16)
AUTO_BLOCK_ROWS = (4, 8, 16, 32)
AUTO_BANK_SIZES = (8, 16, 32, 64)
AUTO_MCBBS = ((1, 4), (2, 4), (2, 8), (4, 4))


# ---------------------------------------------------------------------------------------------
# What a packed tensor describes
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Quantization:
    """Scales and zero points of integer values along `axis` of the ONNX shape (None: per tensor,
    one scale): real = scale * (q - zero_point)."""

    axis: int | None
    scales: np.ndarray
    zero_points: np.ndarray

    def __post_init__(self):
        object.__setattr__(self, "scales", np.asarray(self.scales, dtype=np.float32).reshape(-1))
        object.__setattr__(self, "zero_points", np.asarray(self.zero_points, dtype=np.int32).reshape(-1))

    def __eq__(self, other) -> bool:
        return (isinstance(other, Quantization) and self.axis == other.axis
                and self.scales.tobytes() == other.scales.tobytes()
                and self.zero_points.tobytes() == other.zero_points.tobytes())

    def __hash__(self) -> int:
        return hash((self.axis, self.scales.tobytes(), self.zero_points.tobytes()))

    def to_json(self) -> dict:
        return {"axis": self.axis, "scales": [float(s) for s in self.scales],
                "zero_points": [int(z) for z in self.zero_points]}


@dataclass(frozen=True)
class SectionInfo:
    """One section as stored: its table entry and sizes. raw_bytes is what raw coding would take;
    entropy_bound_bytes (the order-0 entropy of its fields) is None unless read_info(entropy=True)."""

    kind: str
    coding: str
    field_bits: int
    field_count: int
    stored_bytes: int
    raw_bytes: int
    table_bytes: int
    entropy_bound_bytes: float | None = None

    def to_json(self) -> dict:
        return {"kind": self.kind, "coding": self.coding, "field_bits": self.field_bits,
                "field_count": self.field_count, "stored_bytes": self.stored_bytes, "raw_bytes": self.raw_bytes,
                "table_bytes": self.table_bytes, "entropy_bound_bytes": self.entropy_bound_bytes}


@dataclass(frozen=True)
class PackedInfo:
    """A packed tensor's validated header and section table (schemas/packed-tensor.schema.json)."""

    encoding: Encoding
    value_type: str
    value_bits: int
    layout: WeightLayout
    quantization: Quantization | None
    sections: tuple[SectionInfo, ...]
    total_bytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """The ONNX shape of the weight."""
        return tuple(self.layout.onnx_shape)

    @property
    def header_bytes(self) -> int:
        return self.total_bytes - sum(section.stored_bytes for section in self.sections)

    @property
    def dtype(self) -> np.dtype:
        """The dtype unpack_tensor returns."""
        return np.dtype(_NUMPY_TYPES[self.value_type])

    def to_json(self) -> dict:
        encoding = self.encoding
        return {
            "format_version": VERSION,
            "encoding": {"name": encoding.name, "spec": encoding.spec, "param_a": encoding.a,
                         "param_b": encoding.b, "param_c": encoding.kept, "param_d": encoding.window},
            "value_type": self.value_type,
            "value_bits": self.value_bits,
            "layout": self.layout.kind,
            "shape": list(self.shape),
            "groups": self.layout.groups,
            "matrix_shape": list(self.layout.matrix_shape),
            "quantization": None if self.quantization is None else self.quantization.to_json(),
            "sections": [section.to_json() for section in self.sections],
            "header_bytes": self.header_bytes,
            "total_bytes": self.total_bytes,
        }


_NUMPY_TYPES = {"float32": np.float32, "float16": np.float16, "int8": np.int8, "intN": np.int8}
_FIELD_TYPES = {"float32": np.uint32, "float16": np.uint16, "int8": np.uint8, "intN": np.uint8}


def _value_bits_problem(value_type: str, value_bits: int) -> str | None:
    expected = {"float32": (32,), "float16": (16,), "int8": (8,), "intN": tuple(range(2, 8))}[value_type]
    if value_bits not in expected:
        return f"value_bits {value_bits} does not match value type {value_type} ({'/'.join(map(str, expected))})"
    return None


def _integer_range(value_bits: int) -> tuple[int, int]:
    return -(1 << (value_bits - 1)), (1 << (value_bits - 1)) - 1


def _layout_problem(kind: str, dims: tuple[int, ...], groups: int) -> str | None:
    """Why an ONNX shape and groups do not make a weight of this layout (section 3), or None."""
    if kind in ("rows", "cols") and len(dims) != 2 or kind in ("conv", "conv_transpose") and len(dims) < 3:
        return f"rank {len(dims)} does not match layout {kind} (2 for rows/cols, 3 or more for convolutions)"
    if not 1 <= len(dims) <= MAX_RANK:
        return f"rank {len(dims)} is outside 1..{MAX_RANK}"
    if any(dim < 1 for dim in dims):
        return f"shape {list(dims)} has a dim of 0"
    if math.prod(dims) > MAX_ELEMENTS:
        return f"shape {list(dims)} has {math.prod(dims)} elements, more than 2^31 - 1"
    if kind in ("rows", "cols"):
        return None if groups == 1 else f"groups {groups} on a {kind} weight (must be 1)"
    if groups < 1 or dims[0] % groups:
        return f"groups {groups} does not divide the {dims[0]} channels of dim 0"
    return None


def _quantization_problem(quantization: Quantization, value_type: str, value_bits: int,
                          dims: tuple[int, ...]) -> str | None:
    """Why a quantization block is invalid for these values (section 3), or None."""
    if value_type in ("float32", "float16"):
        return f"a quantization block on {value_type} values"
    axis = quantization.axis
    if axis is not None and not 0 <= axis < len(dims):
        return f"quantization axis {axis} is outside the {len(dims)} dims (None or -1 for per tensor)"
    expected = 1 if axis is None else dims[axis]
    if quantization.scales.size != expected or quantization.zero_points.size != expected:
        return (f"quantization has {quantization.scales.size} scales and {quantization.zero_points.size} zero "
                f"points, not {expected} ({'per tensor' if axis is None else f'dim {axis}'})")
    bad = np.flatnonzero(~(np.isfinite(quantization.scales) & (quantization.scales > 0)))
    if bad.size:
        return f"quantization scale {int(bad[0])} is {quantization.scales[bad[0]]}, not finite and positive"
    low, high = _integer_range(value_bits)
    bad = np.flatnonzero((quantization.zero_points < low) | (quantization.zero_points > high))
    if bad.size:
        return f"zero point {int(bad[0])} is {int(quantization.zero_points[bad[0]])}, outside {low}..{high}"
    return None


def _matrix_shape(layout: WeightLayout) -> MatrixShape:
    return MatrixShape(layout.out_channels, layout.kernel_positions, layout.strip_length)


# ---------------------------------------------------------------------------------------------
# Writer
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Stored:
    """A section ready to write."""

    kind: str
    coding: str
    field_bits: int
    field_count: int
    payload: bytes


def pack_tensor(weight: np.ndarray, layout: WeightLayout, *, encoding: str | Encoding = "auto",
                value_bits: int | None = None, quantization: Quantization | None = None, huffman: str = "auto",
                mcbbs_window: int = 4) -> bytes:
    """The packed tensor (docs/FORMAT.md) of `weight`, given in ONNX layout.

    weight: float32, float16, or int8 holding value_bits-bit integers (2..8, default 8).
    encoding: "auto" (the fewest bytes among the encodings the weight fits), a family ("nm", "block",
    ...: its member that packs smallest), a spec such as "nm:2:4",
    "block:16", "bank:16", "mcbbs:c2r4p4", or an Encoding (kept = 0: the fewest the weight needs).
    huffman: "auto" codes a section when that makes it smaller, "on" every section of <= 16-bit fields.
    """
    weight = np.asarray(weight)
    if huffman not in HUFFMAN_MODES:
        raise UsageError(f"huffman {huffman!r} is not one of {', '.join(HUFFMAN_MODES)}")
    dims = tuple(int(dim) for dim in layout.onnx_shape)
    if layout.kind not in LAYOUTS:
        raise UsageError(f"layout {layout.kind!r} is not one of {', '.join(LAYOUTS)}")
    problem = _layout_problem(layout.kind, dims, layout.groups)
    if problem:
        raise UsageError(problem)
    if tuple(weight.shape) != dims:
        raise UsageError(f"weight shape {list(weight.shape)} is not the layout's {list(dims)}")
    value_type, value_bits = _value_type(weight.dtype, value_bits)
    if quantization is not None:
        problem = _quantization_problem(quantization, value_type, value_bits, dims)
        if problem:
            raise UsageError(problem)
    fields = _to_fields(layout.to_matrix(weight), value_type, value_bits)
    shape = _matrix_shape(layout)
    header_base = _header_bytes(len(dims), quantization, 0)
    requested_name = encoding.strip().lower() if isinstance(encoding, str) else None
    if requested_name == "auto" or requested_name in ENCODINGS:
        family = None if requested_name == "auto" else requested_name
        chosen, stored = _choose(shape, fields, value_bits, huffman, mcbbs_window, header_base, family)
    else:
        requested = encoding if isinstance(encoding, Encoding) else Encoding.parse(encoding, mcbbs_window=mcbbs_window)
        chosen, section_fields = encode(requested, shape, fields)
        stored = _store_all(chosen, shape, value_bits, section_fields, huffman)
    return _assemble(chosen, value_type, value_bits, layout, quantization, stored)


def _value_type(dtype: np.dtype, value_bits: int | None) -> tuple[str, int]:
    if dtype == np.float32 or dtype == np.float16:
        name = "float32" if dtype == np.float32 else "float16"
        if value_bits not in (None, dtype.itemsize * 8):
            raise UsageError(f"value_bits {value_bits} does not apply to {name} weights (leave it out)")
        return name, dtype.itemsize * 8
    if dtype == np.int8:
        bits = 8 if value_bits is None else value_bits
        if not 2 <= bits <= 8:
            raise UsageError(f"value_bits {value_bits} is outside 2..8 for int8 weights")
        return ("int8" if bits == 8 else "intN"), bits
    raise UsageError(f"weights of dtype {dtype} cannot be packed; use float32, float16 or int8")


def _to_fields(matrix: np.ndarray, value_type: str, value_bits: int) -> np.ndarray:
    """W[O, K] as unsigned fields: raw IEEE bits, or two's complement of value_bits bits."""
    if value_type != "intN":
        return matrix.view(_FIELD_TYPES[value_type])
    low, high = _integer_range(value_bits)
    if matrix.size and (int(matrix.min()) < low or int(matrix.max()) > high):
        raise UsageError(f"int8 values {int(matrix.min())}..{int(matrix.max())} do not fit {value_bits} bits "
                         f"({low}..{high}); quantize to {value_bits} bits or raise value_bits")
    return (matrix.view(np.uint8) & np.uint8((1 << value_bits) - 1))


def _from_fields(fields: np.ndarray, value_type: str, value_bits: int) -> np.ndarray:
    if value_type != "intN":
        return fields.astype(_FIELD_TYPES[value_type], copy=False).view(_NUMPY_TYPES[value_type])
    sign = np.int16(1 << (value_bits - 1))
    return ((fields.astype(np.int16) ^ sign) - sign).astype(np.int8)


def _zero_points_omitted(quantization: Quantization | None) -> bool:
    return quantization is not None and not np.any(quantization.zero_points)


def _header_bytes(rank: int, quantization: Quantization | None, section_count: int) -> int:
    per_param = 4 if _zero_points_omitted(quantization) else 8
    quantization_bytes = 0 if quantization is None else _QUANTIZATION.size + per_param * quantization.scales.size
    return _FIXED.size + 4 * rank + quantization_bytes + _SECTION.size * section_count + _CRC.size


def _store(kind: str, field_bits: int, fields: np.ndarray, huffman_mode: str,
           coded_sizes: dict[bytes, int] | None = None) -> _Stored:
    """One section's stored bytes: raw, or Huffman-coded as huffman_mode asks. coded_sizes, when
    given, learns the coded size of these fields' histogram (see _choose)."""
    raw = _Stored(kind, "raw", field_bits, fields.size, pack_fields(fields, field_bits))
    if huffman_mode == "off" or field_bits > MAX_HUFFMAN_FIELD_BITS:
        return raw
    counts = np.bincount(fields.astype(np.int64))
    if huffman_mode == "auto" and _coded_floor_bytes(counts) >= len(raw.payload):
        return raw  # no code can beat raw: skip the encoder
    coded = _Stored(kind, "huffman", field_bits, fields.size,
                    huffman.encode_section(fields, field_bits, HUFFMAN_BLOCK_SIZE))
    if coded_sizes is not None:
        coded_sizes[_histogram_key(counts)] = len(coded.payload)
    return coded if huffman_mode == "on" or len(coded.payload) < len(raw.payload) else raw


def _store_all(encoding: Encoding, shape: MatrixShape, value_bits: int, section_fields: list[np.ndarray],
               huffman_mode: str, coded_sizes: dict[bytes, int] | None = None) -> list[_Stored]:
    layouts = encoding.section_layout(shape, value_bits, section_fields[-1].size)
    return [_store(layout.kind, layout.field_bits, fields, huffman_mode, coded_sizes)
            for layout, fields in zip(layouts, section_fields)]


def _assemble(encoding: Encoding, value_type: str, value_bits: int, layout: WeightLayout,
              quantization: Quantization | None, stored: list[_Stored]) -> bytes:
    dims = tuple(int(dim) for dim in layout.onnx_shape)
    header = bytearray(_FIXED.pack(
        MAGIC, VERSION, encoding.code, VALUE_TYPES.index(value_type), value_bits, LAYOUTS.index(layout.kind),
        len(dims), len(stored), (FLAG_QUANTIZATION if quantization is not None else 0)
        | (FLAG_ZERO_POINTS_OMITTED if _zero_points_omitted(quantization) else 0), layout.groups,
        encoding.a, encoding.b, encoding.kept, encoding.window))
    header += struct.pack(f"<{len(dims)}I", *dims)
    if quantization is not None:
        header += _QUANTIZATION.pack(-1 if quantization.axis is None else quantization.axis,
                                     quantization.scales.size)
        header += quantization.scales.astype("<f4").tobytes()
        if not _zero_points_omitted(quantization):
            header += quantization.zero_points.astype("<i4").tobytes()
    kind_codes = {kind: code for code, kind in SECTION_KINDS.items()}
    offset = len(header) + _SECTION.size * len(stored) + _CRC.size
    for section in stored:
        header += _SECTION.pack(kind_codes[section.kind], CODINGS.index(section.coding), section.field_bits, 0,
                                section.field_count, offset, len(section.payload), zlib.crc32(section.payload))
        offset += len(section.payload)
    if offset > MAX_U32:
        raise UsageError(f"the packed tensor would take {offset} bytes, more than the format's 4 GiB")
    header += _CRC.pack(zlib.crc32(header))
    return b"".join([bytes(header), *(section.payload for section in stored)])


# ---------------------------------------------------------------------------------------------
# encoding="auto": the fewest bytes, by branch and bound on entropy lower bounds
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Candidate:
    order: int  # tie-break rank
    encoding: Encoding  # kept resolved
    index_counts: np.ndarray | None  # how often each index value is stored (None: not needed)


def _choose(shape: MatrixShape, fields: np.ndarray, value_bits: int, huffman_mode: str, mcbbs_window: int,
            header_base: int, family: str | None = None) -> tuple[Encoding, list[_Stored]]:
    """The smallest packing among the auto candidates (ties: the earlier candidate), or among those
    of one encoding family (`family`, e.g. "block": the block size that packs smallest).

    Branch and bound: each candidate's size has a floor computable from field histograms alone (raw
    sections are exact; a Huffman section is no smaller than its fields' order-0 entropy plus the
    smallest table, or exactly what an earlier encoding of the same histogram took). Candidates are
    encoded, lowest floor first, until no floor can beat the best size found.
    """
    nonzero = fields != 0
    nonzeros = int(np.count_nonzero(nonzero))
    codable = huffman_mode != "off"
    value_counts = None
    if codable and value_bits <= MAX_HUFFMAN_FIELD_BITS:
        value_counts = np.bincount(fields[nonzero].astype(np.int64))
    coded_sizes: dict[bytes, int] = {}

    def floor(candidate: _Candidate) -> int:
        layouts = candidate.encoding.section_layout(shape, value_bits, nonzeros)
        total = header_base + _SECTION.size * len(layouts)
        for layout in layouts:
            counts = candidate.index_counts if layout.kind == "indices" else None
            if layout.kind == "values" and value_counts is not None:
                counts = np.append(value_counts, layout.field_count - nonzeros)
            total += _section_floor(layout, counts, huffman_mode, coded_sizes)
        return total

    candidates = [_Candidate(0, Encoding.dense(), None),
                  _Candidate(1, Encoding.csr(), np.count_nonzero(nonzero, axis=0) if codable else None)]
    structured = ([Encoding.nm(1, group) for group in AUTO_NM_GROUPS]
                  + [Encoding.block(rows) for rows in AUTO_BLOCK_ROWS]
                  + [Encoding.bank(size) for size in AUTO_BANK_SIZES]
                  + [Encoding.mcbbs(cluster, prune_range, window=mcbbs_window) for cluster, prune_range in AUTO_MCBBS])
    flat_nonzero = nonzero.reshape(-1)
    for order, encoding in enumerate(structured, start=2):
        if encoding.pattern.too_small(shape):
            continue
        census = UnitCensus.of(Geometry.of(encoding.pattern, shape).gather(flat_nonzero))
        kept = census.needed
        if encoding.name == "nm":
            if kept >= encoding.b:
                continue
            encoding = Encoding.nm(kept, encoding.b)
        else:
            encoding = encoding.with_kept(kept)
        candidates.append(_Candidate(order, encoding, census.position_histogram(kept) if codable else None))
    if family is not None:
        candidates = [candidate for candidate in candidates if candidate.encoding.name == family]
        if not candidates:
            raise UsageError(f"no {family} encoding fits this weight (its zeros follow no {family} structure "
                             "the shape allows)")

    best: tuple[int, int, Encoding, list[_Stored]] | None = None
    while candidates:
        lowest, order, candidate = min(((floor(c), c.order, c) for c in candidates), key=lambda f: f[:2])
        if best is not None and (lowest, order) > best[:2]:
            break
        candidates.remove(candidate)
        encoding, section_fields = encode(candidate.encoding, shape, fields)
        stored = _store_all(encoding, shape, value_bits, section_fields, huffman_mode, coded_sizes)
        size = header_base + sum(_SECTION.size + len(section.payload) for section in stored)
        if best is None or (size, order) < best[:2]:
            best = (size, order, encoding, stored)
    return best[2], best[3]


def _histogram_key(counts: np.ndarray) -> bytes:
    """What a Huffman section's size depends on: its symbol counts, in order of size."""
    return np.sort(counts[counts > 0]).astype(np.int64).tobytes()


def _coded_floor_bytes(counts: np.ndarray) -> int:
    """A floor on the bytes of a Huffman section of fields with these symbol counts: the order-0
    entropy (and at least one bit a field) plus the smallest table section 5 allows for that many
    symbols and blocks. Rounded down a hair, so float error never lifts it above the truth."""
    counts = counts[counts > 0].astype(np.float64)
    total = counts.sum()
    entropy_bits = float(np.sum(counts * np.log2(total / counts))) if total else 0.0
    symbols = max(counts.size, 1)
    shortest_max_length = max(1, math.ceil(math.log2(symbols)))
    table = 14 + 2 * symbols + 4 * shortest_max_length + 4 * math.ceil(total / HUFFMAN_BLOCK_SIZE)
    return table + max(0, math.ceil(max(entropy_bits, total) / 8 * (1 - 1e-12) - 1e-6))


def _section_floor(layout: SectionLayout, counts: np.ndarray | None, huffman_mode: str,
                   coded_sizes: dict[bytes, int]) -> int:
    raw = packed_bytes(layout.field_count, layout.field_bits)
    if huffman_mode == "off" or layout.field_bits > MAX_HUFFMAN_FIELD_BITS or counts is None:
        return raw
    coded = coded_sizes.get(_histogram_key(counts)) or _coded_floor_bytes(counts)
    return coded if huffman_mode == "on" else min(raw, coded)


# ---------------------------------------------------------------------------------------------
# Reader
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    """A section table entry, checked against the header."""

    number: int  # 1-based, as errors name it
    kind: str
    coding: str
    field_bits: int
    field_count: int
    offset: int
    length: int

    @property
    def label(self) -> str:
        return f"section {self.number} ({self.kind})"


@dataclass(frozen=True)
class _Header:
    info: PackedInfo  # without entropy bounds
    shape: MatrixShape
    entries: tuple[_Entry, ...]


def read_info(data: bytes | memoryview, *, entropy: bool = False) -> PackedInfo:
    """The validated header and section table (every check of section 3 short of decoding, CRCs included).

    entropy=True also decodes every section to fill SectionInfo.entropy_bound_bytes (the order-0
    entropy of its fields, in bytes); otherwise those are None and nothing is decoded.
    """
    buffer = _bytes_view(data)
    header = _read_header(buffer)
    sections = []
    for entry, section in zip(header.entries, header.info.sections):
        table = 0
        if entry.coding == "huffman":
            try:
                table = huffman.table_bytes(buffer[entry.offset: entry.offset + entry.length])
            except FormatError as exc:
                format_error(f"{entry.label}: {exc}")
        bound = huffman.entropy_bound_bytes(_section_fields(buffer, entry)) if entropy else None
        sections.append(SectionInfo(section.kind, section.coding, section.field_bits, section.field_count,
                                    section.stored_bytes, section.raw_bytes, table, bound))
    info = header.info
    return PackedInfo(info.encoding, info.value_type, info.value_bits, info.layout, info.quantization,
                      tuple(sections), info.total_bytes)


def unpack_tensor(data: bytes | memoryview, *, max_elements: int | None = None) -> np.ndarray:
    """The weight in ONNX layout (float32, float16 or int8), bit for bit what pack_tensor was given.

    Everything is checked first; FormatError names what is wrong. A sparse tensor may decode to far
    more bytes than it stores: max_elements caps the elements a caller is willing to allocate.
    """
    buffer = _bytes_view(data)
    header = _read_header(buffer)
    info = header.info
    if max_elements is not None and header.shape.size > max_elements:
        format_error(f"shape {list(info.shape)} has {header.shape.size} elements, more than the "
                     f"{max_elements} allowed here")
    sections = [_section_fields(buffer, entry) for entry in header.entries]
    flat = decode(info.encoding, header.shape, sections)
    matrix = _from_fields(flat, info.value_type, info.value_bits).reshape(header.shape.out_channels,
                                                                           header.shape.columns)
    return info.layout.from_matrix(matrix)


def _bytes_view(data: bytes | memoryview) -> memoryview:
    view = memoryview(data)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _read_header(buffer: memoryview) -> _Header:
    """Parse and check the header and section table (section 3), before anything is allocated."""
    total = len(buffer)
    if total < MIN_BYTES:
        format_error(f"{total} bytes, fewer than the {MIN_BYTES} of the smallest header (truncated?)")
    (magic, version, encoding_code, type_code, value_bits, layout_code, rank, section_count, flags, groups,
     param_a, param_b, param_c, param_d) = _FIXED.unpack_from(buffer)
    if magic != MAGIC:
        format_error(f"magic is {magic.hex(' ')}, not 4f 53 50 4b (\"OSPK\"): not a packed tensor")
    if version != VERSION:
        format_error(f"format version {version}, this reader reads version {VERSION}")
    if not 1 <= rank <= MAX_RANK:
        format_error(f"rank {rank} is outside 1..{MAX_RANK}")
    if not 1 <= section_count <= MAX_SECTIONS:
        format_error(f"section_count {section_count} is outside 1..{MAX_SECTIONS}")
    if flags & ~(FLAG_QUANTIZATION | FLAG_ZERO_POINTS_OMITTED):
        format_error(f"flags 0x{flags:02x} has unknown bits (only bits 0 and 1 are defined)")
    if flags & FLAG_ZERO_POINTS_OMITTED and not flags & FLAG_QUANTIZATION:
        format_error("flags bit 1 (zero points omitted) without bit 0 (quantization block)")
    zero_point_bytes = 0 if flags & FLAG_ZERO_POINTS_OMITTED else 4

    cursor = _FIXED.size + 4 * rank
    param_count = 0
    if flags & FLAG_QUANTIZATION:
        if cursor + _QUANTIZATION.size + _CRC.size > total:
            format_error(f"the header needs more than {total} bytes (truncated?)")
        param_count = _QUANTIZATION.unpack_from(buffer, cursor)[1]
        cursor += _QUANTIZATION.size + (4 + zero_point_bytes) * param_count
    table_start = cursor
    header_size = table_start + _SECTION.size * section_count + _CRC.size
    if header_size > total:
        format_error(f"the header needs {header_size} bytes, the packed tensor has {total} (truncated?)")
    stored_crc = _CRC.unpack_from(buffer, header_size - _CRC.size)[0]
    if zlib.crc32(buffer[: header_size - _CRC.size]) != stored_crc:
        format_error("header crc mismatch (the header is corrupt)")

    if encoding_code >= len(ENCODINGS):
        format_error(f"unknown encoding {encoding_code}")
    if type_code >= len(VALUE_TYPES):
        format_error(f"unknown value type {type_code}")
    if layout_code >= len(LAYOUTS):
        format_error(f"unknown layout {layout_code}")
    value_type, kind = VALUE_TYPES[type_code], LAYOUTS[layout_code]
    problem = _value_bits_problem(value_type, value_bits)
    dims = struct.unpack_from(f"<{rank}I", buffer, _FIXED.size)
    problem = problem or _layout_problem(kind, dims, groups)
    if problem:
        format_error(problem)
    layout = WeightLayout(kind, dims, groups)
    shape = _matrix_shape(layout)
    encoding = Encoding(ENCODINGS[encoding_code], param_a, param_b, param_c, param_d)
    problem = encoding.problem(shape)
    if problem:
        format_error(problem)

    quantization = None
    if flags & FLAG_QUANTIZATION:
        axis = _QUANTIZATION.unpack_from(buffer, _FIXED.size + 4 * rank)[0]
        arrays = _FIXED.size + 4 * rank + _QUANTIZATION.size
        if axis != -1 and not 0 <= axis < rank:
            format_error(f"quantization axis {axis} is outside the {rank} dims (-1 for per tensor)")
        expected = 1 if axis == -1 else dims[axis]
        if param_count != expected:
            format_error(f"quantization param_count {param_count} is not {expected} "
                         f"({'per tensor' if axis == -1 else f'dims[{axis}]'})")
        zero_points = (np.zeros(param_count, np.int32) if not zero_point_bytes
                       else np.frombuffer(buffer, "<i4", param_count, arrays + 4 * param_count).copy())
        quantization = Quantization(None if axis == -1 else axis,
                                    np.frombuffer(buffer, "<f4", param_count, arrays).copy(), zero_points)
        problem = _quantization_problem(quantization, value_type, value_bits, dims)
        if problem:
            format_error(problem)

    entries = _read_section_table(buffer, table_start, section_count, encoding, shape, value_bits, header_size)
    sections = tuple(SectionInfo(entry.kind, entry.coding, entry.field_bits, entry.field_count, entry.length,
                                 packed_bytes(entry.field_count, entry.field_bits), 0) for entry in entries)
    info = PackedInfo(encoding, value_type, value_bits, layout, quantization, sections, total)
    return _Header(info, shape, entries)


def _read_section_table(buffer: memoryview, start: int, count: int, encoding: Encoding, shape: MatrixShape,
                        value_bits: int, header_size: int) -> tuple[_Entry, ...]:
    raw_entries = [_SECTION.unpack_from(buffer, start + _SECTION.size * i) for i in range(count)]
    kinds = []
    for number, (kind_code, *_rest) in enumerate(raw_entries, start=1):
        if kind_code not in SECTION_KINDS:
            format_error(f"section {number}: unknown kind {kind_code}")
        kinds.append(SECTION_KINDS[kind_code])
    if tuple(kinds) != encoding.section_kinds:
        format_error(f"sections are ({', '.join(kinds)}); {encoding.name} stores "
                     f"({', '.join(encoding.section_kinds)}) in that order")
    nonzeros = raw_entries[-1][4] if encoding.name == "csr" else 0
    if encoding.name == "csr" and nonzeros > shape.size:
        format_error(f"section 3 (values): {nonzeros} values, more than the {shape.size} elements")
    layouts = encoding.section_layout(shape, value_bits, nonzeros)
    entries, offset = [], header_size
    total = len(buffer)
    for number, ((_, coding, field_bits, reserved, field_count, start_at, length, crc), layout) in enumerate(
            zip(raw_entries, layouts), start=1):
        label = f"section {number} ({layout.kind})"
        if reserved:
            format_error(f"{label}: reserved byte is {reserved}, not 0")
        if coding >= len(CODINGS):
            format_error(f"{label}: unknown coding {coding}")
        if field_bits != layout.field_bits:
            format_error(f"{label}: field_bits {field_bits}, {encoding.name} needs {layout.field_bits}")
        if coding == 1 and field_bits > MAX_HUFFMAN_FIELD_BITS:
            format_error(f"{label}: Huffman coding of {field_bits}-bit fields (at most {MAX_HUFFMAN_FIELD_BITS})")
        if field_count != layout.field_count:
            format_error(f"{label}: field_count {field_count}, the shape and parameters imply {layout.field_count}")
        if start_at != offset:
            format_error(f"{label}: starts at byte {start_at}, not {offset} where the previous part ends")
        if start_at + length > total:
            format_error(f"{label}: ends at byte {start_at + length}, past the {total} bytes (truncated?)")
        if coding == 0 and length != packed_bytes(field_count, field_bits):
            format_error(f"{label}: {length} bytes, raw {field_count} x {field_bits}-bit fields take "
                         f"{packed_bytes(field_count, field_bits)}")
        if coding == 0 and not padding_is_zero(buffer[start_at: start_at + length], field_bits, field_count):
            format_error(f"{label}: padding bits after the last field are not 0")
        if coding == 1 and field_count > 8 * length:
            format_error(f"{label}: {length} bytes cannot hold {field_count} Huffman codes")
        if zlib.crc32(buffer[start_at: start_at + length]) != crc:
            format_error(f"{label}: crc mismatch")
        entries.append(_Entry(number, layout.kind, CODINGS[coding], field_bits, field_count, start_at, length))
        offset = start_at + length
    if offset != total:
        format_error(f"sections end at byte {offset}, but the packed tensor has {total} bytes")
    return tuple(entries)


def _section_fields(buffer: memoryview, entry: _Entry) -> np.ndarray:
    """A checked section's decoded fields."""
    payload = buffer[entry.offset: entry.offset + entry.length]
    if entry.coding == "huffman":
        try:
            return huffman.decode_section(payload, entry.field_bits, entry.field_count)
        except FormatError as exc:
            format_error(f"{entry.label}: {exc}")
    return unpack_fields(payload, entry.field_bits, entry.field_count)
