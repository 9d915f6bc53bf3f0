"""The packed tensor container (docs/FORMAT.md sections 1–4, 7): exact round trips, the auto choice,
every reader rejection rule, and the worked example.

The helpers at the top read and write the header from the spec's tables with struct and Python
integers, independently of onnxsparse.formats, so that tests can build hostile tensors with valid
CRCs; test_format_fuzz.py uses them too.
"""

from __future__ import annotations

import json
import math
import re
import struct
import tracemalloc
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from onnxsparse.errors import UsageError
from onnxsparse.formats.bits import pack_fields, unpack_fields
from onnxsparse.formats.container import (
    ENCODINGS, Encoding, FormatError, PackedInfo, Quantization, pack_tensor, read_info, unpack_tensor,
)
from onnxsparse.formats.encodings import Geometry
from onnxsparse.model import WeightLayout
from onnxsparse.sparsity.criteria import L1
from onnxsparse.sparsity.patterns import MatrixShape, parse_pattern

REPO = Path(__file__).resolve().parent.parent
FORMAT_DOC = REPO / "docs" / "FORMAT.md"
SCHEMA = REPO / "schemas" / "packed-tensor.schema.json"

# ---------------------------------------------------------------------------------------------
# Spec-side reader/writer of the header (docs/FORMAT.md sections 1 and 2)
# ---------------------------------------------------------------------------------------------

FIXED_FIELDS = ("magic", "version", "encoding", "value_type", "value_bits", "layout", "rank", "section_count",
                "flags", "groups", "param_a", "param_b", "param_c", "param_d")
FIXED = struct.Struct("<4s8B5I")
SECTION_FIELDS = ("kind", "coding", "field_bits", "reserved", "field_count", "offset", "length", "crc")
SECTION = struct.Struct("<4B4I")


@dataclass
class Packed:
    """A packed tensor taken apart into its fields; build() writes it back with fresh CRCs."""

    fixed: dict
    dims: list
    quantization: dict | None
    sections: list = field(default_factory=list)  # dicts of SECTION_FIELDS
    payloads: list = field(default_factory=list)

    def build(self, *, fix_offsets: bool = True, fix_crcs: bool = True) -> bytes:
        head = FIXED.pack(*(self.fixed[name] for name in FIXED_FIELDS))
        head += struct.pack(f"<{len(self.dims)}I", *self.dims)
        if self.quantization is not None:
            q = self.quantization
            head += struct.pack("<iI", q["axis"], q["param_count"])
            head += struct.pack(f"<{len(q['scales'])}f", *q["scales"])
            if not self.fixed["flags"] & 2:  # bit 1: zero points all 0, left out
                head += struct.pack(f"<{len(q['zero_points'])}i", *q["zero_points"])
        offset = len(head) + SECTION.size * len(self.sections) + 4
        for entry, payload in zip(self.sections, self.payloads):
            if fix_offsets:
                entry["offset"], entry["length"] = offset, len(payload)
            if fix_crcs:
                entry["crc"] = zlib.crc32(payload)
            head += SECTION.pack(*(entry[name] for name in SECTION_FIELDS))
            offset += len(payload)
        return head + struct.pack("<I", zlib.crc32(head)) + b"".join(self.payloads)


def parse_packed(data: bytes) -> Packed:
    fixed = dict(zip(FIXED_FIELDS, FIXED.unpack_from(data)))
    cursor = FIXED.size
    dims = list(struct.unpack_from(f"<{fixed['rank']}I", data, cursor))
    cursor += 4 * fixed["rank"]
    quantization = None
    if fixed["flags"] & 1:
        axis, count = struct.unpack_from("<iI", data, cursor)
        cursor += 8
        scales = list(struct.unpack_from(f"<{count}f", data, cursor))
        omitted = fixed["flags"] & 2
        zero_points = [0] * count if omitted else list(struct.unpack_from(f"<{count}i", data, cursor + 4 * count))
        cursor += (4 if omitted else 8) * count
        quantization = {"axis": axis, "param_count": count, "scales": scales, "zero_points": zero_points}
    sections = [dict(zip(SECTION_FIELDS, SECTION.unpack_from(data, cursor + SECTION.size * i)))
                for i in range(fixed["section_count"])]
    payloads = [data[s["offset"]: s["offset"] + s["length"]] for s in sections]
    return Packed(fixed, dims, quantization, sections, payloads)


def repair_crcs(data: bytes) -> bytes:
    """Recompute the header CRC and every section CRC a damaged tensor still locates (fuzzing)."""
    data = bytearray(data)
    if len(data) < 36:
        return bytes(data)
    rank, section_count, flags = data[9], data[10], data[11]
    cursor = FIXED.size + 4 * rank
    if flags & 1:
        if cursor + 8 > len(data):
            return bytes(data)
        cursor += 8 + (4 if flags & 2 else 8) * struct.unpack_from("<I", data, cursor + 4)[0]
    header_end = cursor + SECTION.size * section_count
    if header_end + 4 > len(data):
        return bytes(data)
    for i in range(section_count):
        at = cursor + SECTION.size * i
        offset, length = struct.unpack_from("<II", data, at + 8)
        if offset + length <= len(data):
            struct.pack_into("<I", data, at + 16, zlib.crc32(data[offset: offset + length]))
    struct.pack_into("<I", data, header_end, zlib.crc32(data[:header_end]))
    return bytes(data)


def raw_fields(payload: bytes, field_bits: int, count: int) -> list[int]:
    """Fields of a raw section, LSB first, with Python integers (the spec's bit stream)."""
    stream = int.from_bytes(payload, "little")
    return [(stream >> (i * field_bits)) & ((1 << field_bits) - 1) for i in range(count)]


def raw_payload(fields: list[int], field_bits: int) -> bytes:
    stream = 0
    for i, value in enumerate(fields):
        stream |= int(value) << (i * field_bits)
    return stream.to_bytes(-(-len(fields) * field_bits // 8), "little")


def edit_fields(packed: Packed, number: int, change) -> Packed:
    """Apply change(list of fields) to raw section `number` (1-based) and store it back."""
    entry = packed.sections[number - 1]
    fields = raw_fields(packed.payloads[number - 1], entry["field_bits"], entry["field_count"])
    change(fields)
    packed.payloads[number - 1] = raw_payload(fields, entry["field_bits"])
    return packed


# ---------------------------------------------------------------------------------------------
# Weights that meet a pattern exactly
# ---------------------------------------------------------------------------------------------

VALUE_TYPES = ["float32", "float16", "int8", "int2", "int3", "int4", "int5", "int6", "int7"]
PATTERN_SPECS = ["zeros", "dense", "unstructured", "2:4", "1:4", "3:8", "1:2", "1x4", "1x8", "bank:4", "bank:8",
                 "mcbbs:c1r4", "mcbbs:c2r4", "mcbbs:c4r4", "mcbbs:c2r3"]


def matrix_shape(layout: WeightLayout) -> MatrixShape:
    return MatrixShape(layout.out_channels, layout.kernel_positions, layout.strip_length)


def value_bits_of(value_type: str) -> int | None:
    return int(value_type[3:]) if value_type.startswith("int") else None


def random_values(rng: np.random.Generator, shape: tuple[int, ...], value_type: str) -> np.ndarray:
    if value_type in ("float32", "float16"):
        return rng.standard_normal(shape).astype(value_type)
    bits = value_bits_of(value_type)
    return rng.integers(-(1 << (bits - 1)), 1 << (bits - 1), shape).astype(np.int8)


def nonzero_values(rng, shape, value_type) -> np.ndarray:
    values = random_values(rng, shape, value_type)
    values[values == 0] = 1
    return values


def patterned_weight(layout: WeightLayout, value_type: str, spec: str, sparsity: float, seed: int) -> np.ndarray:
    """A weight in ONNX layout whose zeros follow `spec` (a pattern spec, 'zeros' or 'dense')."""
    rng = np.random.default_rng(seed)
    shape = matrix_shape(layout)
    values = nonzero_values(rng, layout.matrix_shape, value_type)
    if spec == "zeros":
        values[:] = 0
    elif spec != "dense":
        pattern = parse_pattern(spec)
        scores = rng.standard_normal(layout.matrix_shape).astype(np.float32)
        values = np.where(pattern.mask(scores, shape, sparsity, L1()), values, 0).astype(values.dtype)
    return layout.from_matrix(values)


def encoding_for(spec: str, window: int) -> str | None:
    """The encoding that stores a `spec`-pruned weight by its structure."""
    if re.fullmatch(r"\d+:\d+", spec):
        return f"nm:{spec}"
    if spec.startswith("1x"):
        return f"block:{spec[2:]}"
    if spec.startswith("bank:"):
        return spec
    if spec.startswith("mcbbs:"):
        return f"{spec}p{window}"
    return None


@st.composite
def layouts(draw) -> WeightLayout:
    kind = draw(st.sampled_from(["conv1d", "conv2d", "conv_transpose", "rows", "cols"]))
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    strip = draw(st.one_of(st.integers(1, 8), st.integers(8, 40)))  # short strips, and ones most patterns fit
    out_channels = draw(st.one_of(st.integers(1, 8), st.integers(8, 24)))
    if kind == "rows":
        return WeightLayout("rows", (out_channels, strip))
    if kind == "cols":
        return WeightLayout("cols", (strip, out_channels))
    kernel = (draw(st.integers(1, 3)),) if kind == "conv1d" else (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    per_group = -(-out_channels // groups)
    if kind == "conv_transpose":
        return WeightLayout("conv_transpose", (groups * strip, per_group, *kernel), groups)
    return WeightLayout("conv", (groups * per_group, strip, *kernel), groups)


@st.composite
def sparsities(draw, spec: str) -> float:
    if spec.startswith("mcbbs:"):
        prune_range = parse_pattern(spec).prune_range
        return draw(st.integers(0, prune_range - 1)) / prune_range
    if spec == "unstructured":
        return draw(st.floats(0.0, 0.95))
    return draw(st.sampled_from([0.0, 0.25, 0.5, 0.75, 0.9]))


@st.composite
def quantizations(draw, layout: WeightLayout, value_type: str) -> Quantization | None:
    if value_type.startswith("float") or draw(st.booleans()):
        return None
    bits = value_bits_of(value_type)
    axis = draw(st.sampled_from([None, *range(len(layout.onnx_shape))]))
    count = 1 if axis is None else layout.onnx_shape[axis]
    scales = draw(st.lists(st.floats(0.0009765625, 1024.0, width=32), min_size=count, max_size=count))
    zero_points = draw(st.lists(st.integers(-(1 << (bits - 1)), (1 << (bits - 1)) - 1), min_size=count,
                                max_size=count))
    return Quantization(axis, np.array(scales, np.float32), np.array(zero_points, np.int32))


def assert_exact(weight: np.ndarray, data: bytes) -> None:
    back = unpack_tensor(data)
    assert back.dtype == weight.dtype and back.shape == weight.shape
    assert back.tobytes() == weight.tobytes()


# ---------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), layout=layouts(), value_type=st.sampled_from(VALUE_TYPES),
       spec=st.sampled_from(PATTERN_SPECS), huffman=st.sampled_from(["off", "on", "auto"]),
       window=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_pack_unpack_is_exact_for_every_encoding_value_type_and_huffman_mode(data, layout, value_type, spec,
                                                                              huffman, window, seed):
    shape = matrix_shape(layout)
    structured = spec not in ("zeros", "dense", "unstructured")
    if structured and parse_pattern(spec).too_small(shape):
        spec = "unstructured"
    sparsity = data.draw(sparsities(spec)) if spec not in ("zeros", "dense") else 0.0
    weight = patterned_weight(layout, value_type, spec, sparsity, seed)
    quantization = data.draw(quantizations(layout, value_type))
    requests = ["auto", "dense", "csr"] + ([encoding_for(spec, window)] if encoding_for(spec, window) else [])
    for request in requests:
        packed = pack_tensor(weight, layout, encoding=request, value_bits=value_bits_of(value_type),
                             quantization=quantization, huffman=huffman)
        assert_exact(weight, packed)
        info = read_info(packed, entropy=True)
        event(f"{request} -> {info.encoding.name}")
        if request != "auto":
            assert info.encoding.spec == Encoding.parse(request).spec
        assert info.layout == layout and info.shape == weight.shape and info.quantization == quantization
        assert info.value_bits == (value_bits_of(value_type) or np.dtype(value_type).itemsize * 8)
        assert info.total_bytes == len(packed) == info.header_bytes + sum(s.stored_bytes for s in info.sections)
        assert tuple(s.kind for s in info.sections) == info.encoding.section_kinds
        for section in info.sections:
            assert 0 <= section.entropy_bound_bytes <= section.raw_bytes + 1e-6
            if section.coding == "huffman":
                assert section.stored_bytes >= section.entropy_bound_bytes
                assert section.field_bits <= 16 and section.table_bytes > 0
            else:
                assert section.stored_bytes == section.raw_bytes and section.table_bytes == 0
            if huffman == "off" or section.field_bits > 16:
                assert section.coding == "raw"
            elif huffman == "on":
                assert section.coding == "huffman"


@settings(max_examples=150, deadline=None)
@given(layout=layouts(), value_type=st.sampled_from(["float32", "float16", "int8", "int4"]),
       spec=st.sampled_from(PATTERN_SPECS), huffman=st.sampled_from(["off", "on", "auto"]),
       seed=st.integers(0, 2**16))
def test_auto_is_the_smallest_candidate_and_the_earliest_on_ties(layout, value_type, spec, huffman, seed):
    shape = matrix_shape(layout)
    if spec not in ("zeros", "dense", "unstructured") and parse_pattern(spec).too_small(shape):
        spec = "unstructured"
    weight = patterned_weight(layout, value_type, spec, 0.5 if "mcbbs" not in spec else 0.5, seed)
    bits = value_bits_of(value_type)
    sizes = []  # (size, candidate rank) of every auto candidate the weight fits
    candidates = (["dense", "csr"] + [f"nm:{{}}:{group}" for group in (4, 8, 16)]
                  + [f"block:{rows}" for rows in (4, 8, 16, 32)] + [f"bank:{size}" for size in (8, 16, 32, 64)]
                  + ["mcbbs:c1r4p4", "mcbbs:c2r4p4", "mcbbs:c2r8p4", "mcbbs:c4r4p4"])
    for rank, candidate in enumerate(candidates):
        tries = [candidate.format(n) for n in range(1, int(candidate.split(":")[2]))] if "{}" in candidate \
            else [candidate]
        for request in tries:  # nm: the smallest N the weight fits
            try:
                sizes.append((len(pack_tensor(weight, layout, encoding=request, value_bits=bits, huffman=huffman)),
                              rank, Encoding.parse(request).spec))
                break
            except UsageError:
                continue
    packed = pack_tensor(weight, layout, value_bits=bits, huffman=huffman)
    smallest = min(sizes)
    assert len(packed) == smallest[0]
    assert read_info(packed).encoding.spec == smallest[2]


@pytest.mark.parametrize("spec,sparsity,expected", [
    ("1x16", 0.75, "block:16"), ("2:4", 0.5, "nm:2:4"), ("mcbbs:c2r4", 0.75, "mcbbs:c2r4p4"),
    ("1:8", 0.875, "nm:1:8"), ("dense", 0.0, "dense"), ("unstructured", 0.9, "csr"),
])
def test_auto_picks_the_encoding_of_a_clearly_patterned_conv(spec, sparsity, expected):
    layout = WeightLayout("conv", (64, 64, 3, 3))
    weight = patterned_weight(layout, "float32", spec, sparsity, seed=1)
    packed = pack_tensor(weight, layout)
    assert read_info(packed).encoding.spec == expected
    assert_exact(weight, packed)


def test_float_zero_means_all_bits_zero_so_negative_zero_and_nan_survive():
    layout = WeightLayout("rows", (4, 16))
    weight = patterned_weight(layout, "float32", "2:4", 0.5, seed=2)
    weight[0, 0], weight[1, 1], weight[2, 5] = -0.0, np.nan, np.inf
    for request in ("auto", "dense", "csr", "bank:8"):
        assert_exact(weight, pack_tensor(weight, layout, encoding=request))
    with pytest.raises(UsageError, match="does not fit nm:2:4"):
        weight[0, :4] = [-0.0, 1.0, 2.0, 0.0]  # -0.0 is a third value in the first run
        pack_tensor(weight, layout, encoding="nm:2:4")


def test_ragged_tails_and_groups_round_trip_for_every_structured_encoding():
    layout = WeightLayout("conv", (6, 7, 3, 1), groups=3)  # strips of 7, O = 6
    for spec, request in [("2:4", "nm:2:4"), ("bank:4", "bank:4"), ("mcbbs:c2r3", "mcbbs:c2r3p2"),
                          ("1x4", "block:4")]:
        weight = patterned_weight(layout, "int8", spec, 0.5 if spec != "mcbbs:c2r3" else 1 / 3, seed=3)
        packed = pack_tensor(weight, layout, encoding=request)
        assert_exact(weight, packed)


def test_a_domain_with_fewer_nonzeros_than_kept_fills_its_lowest_free_positions():
    layout = WeightLayout("rows", (1, 8))
    weight = np.array([[0, 0, 5, 0, 1, 2, 0, 0]], np.int8)
    info_data = pack_tensor(weight, layout, encoding="nm:2:4", huffman="off")
    packed = parse_packed(info_data)
    assert raw_fields(packed.payloads[0], 2, 4) == [0, 2, 0, 1]  # run 1: 2 plus filler 0; run 2: 0, 1
    assert raw_fields(packed.payloads[1], 8, 4) == [0, 5, 1, 2]


def test_mcbbs_stores_window_rank_range_order():
    # one strip of 16 channels, c1r4 (ranges of 4), two kept per range, windows of 2 ranges
    layout = WeightLayout("rows", (1, 16))
    weight = np.array([[1, 0, 2, 0, 0, 3, 0, 4, 5, 6, 0, 0, 0, 0, 7, 8]], np.int8)
    packed = parse_packed(pack_tensor(weight, layout, encoding="mcbbs:c1r4p2", huffman="off"))
    # window 1 = ranges 0, 1: rank 0 (0, 1), rank 1 (2, 3); window 2 = ranges 2, 3: rank 0 (0, 2), rank 1 (1, 3)
    assert raw_fields(packed.payloads[0], 2, 8) == [0, 1, 2, 3, 0, 2, 1, 3]
    assert raw_fields(packed.payloads[1], 8, 8) == [1, 3, 2, 4, 5, 7, 6, 8]


def test_block_values_run_per_block_row_kept_channel_row_and_kernel_position():
    layout = WeightLayout("conv", (2, 3, 2))  # O = 2, I = 3, kernel 2: W[o, i, k]
    weight = np.zeros((2, 3, 2), np.int8)
    weight[:, 1, :] = [[1, 2], [3, 4]]  # only input channel 1 is kept
    packed = parse_packed(pack_tensor(weight, layout, encoding="block:2", huffman="off"))
    assert raw_fields(packed.payloads[0], 2, 1) == [1]
    assert raw_fields(packed.payloads[1], 8, 4) == [1, 2, 3, 4]  # row 0 (k0, k1), row 1 (k0, k1)


def test_an_all_zero_tensor_packs_to_one_kept_slot_a_strip():
    layout = WeightLayout("rows", (3, 50))
    weight = np.zeros((3, 50), np.float32)
    packed = pack_tensor(weight, layout)
    assert read_info(packed).encoding == Encoding.bank(32, kept=1)  # 6 slots (strips of 50) beat csr
    assert_exact(weight, packed)
    assert_exact(weight, pack_tensor(weight, layout, encoding="csr"))


@settings(max_examples=200, deadline=None)
@given(field_bits=st.integers(1, 32), values=st.lists(st.integers(0, 2**32 - 1), max_size=40))
def test_bit_packing_is_the_spec_lsb_first_stream(field_bits, values):
    fields = [value & ((1 << field_bits) - 1) for value in values]
    packed = pack_fields(np.array(fields, np.uint64), field_bits)
    assert packed == raw_payload(fields, field_bits)
    assert unpack_fields(packed, field_bits, len(fields)).tolist() == fields


@settings(max_examples=200, deadline=None)
@given(out_channels=st.integers(1, 20), positions=st.sampled_from([1, 2, 9]), strip=st.integers(1, 30),
       spec=st.sampled_from(["2:4", "1:8", "bank:5", "bank:16", "mcbbs:c2r4", "mcbbs:c3r2", "1x4", "1x3"]))
def test_tiled_geometry_is_the_patterns_units_and_domain_counts_match(out_channels, positions, strip, spec):
    shape = MatrixShape(out_channels, positions, strip)
    pattern = parse_pattern(spec)
    units = pattern.units(shape)
    encoding = Encoding.parse({"1x": f"block:{spec[2:]}", "ba": spec, "mc": spec}.get(spec[:2], f"nm:{spec}"))
    assert encoding.domains(shape) == units.index.shape
    geometry = Geometry.of(pattern, shape)
    all_positions = np.broadcast_to(np.arange(units.index.shape[1]), units.index.shape[:2])
    assert np.array_equal(geometry.element_index(all_positions), units.index)
    matrix = np.arange(1, shape.size + 1, dtype=np.int64).reshape(out_channels, -1)
    assert np.array_equal(geometry.gather(matrix.reshape(-1)), units.gather(matrix))


# ---------------------------------------------------------------------------------------------
# The API
# ---------------------------------------------------------------------------------------------


def test_encoding_specs_parse_and_print_back():
    assert Encoding.parse("nm:2:4") == Encoding.nm(2, 4) == Encoding("nm", 2, 4, 2)
    assert Encoding.parse("block:16") == Encoding.block(16)
    assert Encoding.parse("bank:16") == Encoding.bank(16)
    assert Encoding.parse("mcbbs:c2r4p4") == Encoding.mcbbs(2, 4, window=4)
    assert Encoding.parse("mcbbs:c2r4", mcbbs_window=3).spec == "mcbbs:c2r4p3"
    assert [Encoding(name).code for name in ENCODINGS] == list(range(6))
    for spec in ("dense", "csr", "nm:2:4", "block:16", "bank:16", "mcbbs:c2r4p4"):
        assert Encoding.parse(spec).spec == spec
    with pytest.raises(UsageError, match="unknown encoding"):
        Encoding.parse("2:4x")


@pytest.mark.parametrize("kwargs,message", [
    (dict(encoding="nm:2:4"), "does not fit nm:2:4"),
    (dict(encoding="nm:4:4"), "1 <= N < M"),
    (dict(encoding="nm:2:32"), "shorter than M=32"),
    (dict(encoding="block:64"), "fewer than N=64"),
    (dict(encoding="bank:8", value_bits=None), None),
    (dict(value_bits=7), "value_bits 7 does not apply"),
    (dict(huffman="maybe"), "huffman"),
    (dict(quantization=Quantization(None, [1.0], [0])), "quantization block on float32"),
    (dict(encoding=Encoding.bank(8, kept=1)), "domain"),
])
def test_pack_rejects_requests_that_do_not_fit(kwargs, message):
    layout = WeightLayout("rows", (8, 16))
    weight = patterned_weight(layout, "float32", "unstructured", 0.3, seed=5)
    if message is None:
        assert_exact(weight, pack_tensor(weight, layout, **kwargs))
        return
    with pytest.raises(UsageError, match=message):
        pack_tensor(weight, layout, **kwargs)


def test_pack_rejects_integers_outside_value_bits_and_bad_quantization():
    layout = WeightLayout("rows", (2, 4))
    weight = np.array([[0, 1, -8, 7], [3, 0, 0, -1]], np.int8)
    assert_exact(weight, pack_tensor(weight, layout, value_bits=4))
    with pytest.raises(UsageError, match="do not fit 3 bits"):
        pack_tensor(weight, layout, value_bits=3)
    with pytest.raises(UsageError, match="zero point 0 is 8"):
        pack_tensor(weight, layout, value_bits=4, quantization=Quantization(None, [1.0], [8]))
    with pytest.raises(UsageError, match="not finite and positive"):
        pack_tensor(weight, layout, quantization=Quantization(0, [1.0, 0.0], [0, 0]))
    with pytest.raises(UsageError, match="not 2"):
        pack_tensor(weight, layout, quantization=Quantization(0, [1.0], [0]))
    with pytest.raises(UsageError, match="cannot be packed"):
        pack_tensor(weight.astype(np.int32), layout)
    with pytest.raises(UsageError, match="not the layout's"):
        pack_tensor(weight.T, layout)


def test_read_info_describes_the_tensor_and_its_json_meets_the_schema():
    layout = WeightLayout("conv", (32, 16, 3, 3))
    weight = patterned_weight(layout, "int8", "2:4", 0.5, seed=6)
    quantization = Quantization(0, np.linspace(0.01, 0.1, 32, dtype=np.float32), np.zeros(32, np.int32))
    packed = pack_tensor(weight, layout, encoding="nm:2:4", quantization=quantization, huffman="on")
    info = read_info(packed)
    assert isinstance(info, PackedInfo)
    assert (info.encoding, info.value_type, info.value_bits, info.shape) == (Encoding.nm(2, 4), "int8", 8,
                                                                             (32, 16, 3, 3))
    assert info.quantization == quantization and info.dtype == np.int8
    indices, values = info.sections
    assert (indices.kind, indices.coding, indices.field_bits, indices.field_count) == ("indices", "huffman", 2,
                                                                                      32 * 9 * 4 * 2)
    assert (values.kind, values.field_bits, values.field_count) == ("values", 8, 32 * 9 * 16 // 2)
    assert indices.entropy_bound_bytes is None and indices.raw_bytes == 32 * 9 * 4 * 2 * 2 // 8
    assert info.header_bytes == 32 + 16 + 8 + 4 * 32 + 40 + 4  # zero points all 0: omitted
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    for document in (info.to_json(), read_info(packed, entropy=True).to_json(),
                     read_info(pack_tensor(weight.astype(np.float32), layout)).to_json()):
        jsonschema.validate(json.loads(json.dumps(document)), schema, cls=jsonschema.Draft202012Validator)


# ---------------------------------------------------------------------------------------------
# CRCs and every rejection rule of section 3
# ---------------------------------------------------------------------------------------------


def example_tensor(name: str) -> bytes:
    """Small valid tensors the rejection tests start from."""
    if name == "nm":  # the worked example
        weight = np.array([[0, 3, 0, -2, 5, 0, 0, 1], [-7, 0, 4, 0, 0, 0, 6, 0]], np.int8)
        return pack_tensor(weight, WeightLayout("rows", (2, 8)), encoding="nm:2:4",
                           quantization=Quantization(0, [0.5, 0.25], [0, 0]), huffman="off")
    if name == "nm_ragged":  # strips of 6 with M = 4: positions 2, 3 of every second run are virtual
        weight = np.array([[1, 0, 2, 0, 3, 0], [0, 4, 0, 5, 0, 6]], np.int8)
        return pack_tensor(weight, WeightLayout("rows", (2, 6)), encoding="nm:2:4", huffman="off")
    if name == "nm5":  # M = 5: 3-bit positions can say 5..7
        weight = np.array([[1, 0, 2, 0, 0, 3, 0, 0, 0, 4]], np.float32)
        return pack_tensor(weight, WeightLayout("rows", (1, 10)), encoding="nm:2:5", huffman="off")
    if name == "bank6":
        weight = np.array([[1, 0, 2, 0, 0, 0, 3, 0, 0, 4, 0, 0]], np.int8)
        return pack_tensor(weight, WeightLayout("rows", (1, 12)), encoding="bank:6", huffman="off")
    if name == "mcbbs3":  # c1r3: 2-bit positions can say 3
        weight = np.array([[1, 0, 0, 0, 2, 0]], np.int8)
        return pack_tensor(weight, WeightLayout("rows", (1, 6)), encoding="mcbbs:c1r3p1", huffman="off")
    if name == "block5":  # 5 input channels: 3-bit indices can say 5..7
        weight = np.zeros((2, 5, 1), np.int8)
        weight[:, 3] = [[1], [2]]
        return pack_tensor(weight, WeightLayout("conv", (2, 5, 1)), encoding="block:2", huffman="off")
    if name == "csr":
        weight = np.array([[0, 1.5, 0, 2.5, 0], [0, 0, 0, 0, 0], [3.5, 0, 0, 4.5, 0]], np.float32)
        return pack_tensor(weight, WeightLayout("rows", (3, 5)), encoding="csr", huffman="off")
    if name == "dense":
        weight = np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2)
        return pack_tensor(weight, WeightLayout("conv", (2, 3, 2, 2)), encoding="dense")
    if name == "int4":
        weight = np.array([[1, -2, 3, 0], [0, 7, -8, 1]], np.int8)
        return pack_tensor(weight, WeightLayout("rows", (2, 4)), encoding="dense", value_bits=4,
                           quantization=Quantization(None, [0.1], [0]), huffman="off")
    if name == "huffman":
        weight = np.tile(np.array([1, 1, 1, 2, 0, 0, 0, 0], np.int8), (8, 4))
        return pack_tensor(weight, WeightLayout("rows", (8, 32)), encoding="dense", huffman="on")
    raise KeyError(name)


def mutated(name: str, change) -> bytes:
    packed = parse_packed(example_tensor(name))
    change(packed)
    return packed.build()


def set_fixed(**values):
    return lambda packed: packed.fixed.update(values)


def set_section(number: int, **values):
    return lambda packed: packed.sections[number - 1].update(values)


def set_quantization(**values):
    """Change the quantization block; explicit zero points are written out (flags bit 1 cleared)."""
    def change(packed):
        packed.quantization.update(values)
        if "zero_points" in values:
            packed.fixed["flags"] &= ~2
    return change


def both(*changes):
    def change(packed):
        for each in changes:
            each(packed)
    return change


def swap_sections(packed):
    packed.sections.reverse()
    packed.payloads.reverse()


def add_dim(packed):
    packed.dims.append(1)
    packed.fixed["rank"] += 1


def set_payload(number: int, payload: bytes):
    def change(packed):
        packed.payloads[number - 1] = payload
    return change


def fields_change(number: int, function):
    return lambda packed: edit_fields(packed, number, function)


def assign(index: int, value: int):
    return assign_many(index, [value])


def assign_many(start: int, values: list[int]):
    def change(fields):
        fields[start: start + len(values)] = values
    return change


REJECTIONS = [
    # fixed header
    ("short", lambda: example_tensor("nm")[:35], "fewer than the 36"),
    ("magic", lambda: mutated("nm", set_fixed(magic=b"OSPX")), "magic is 4f 53 50 58"),
    ("version", lambda: mutated("nm", set_fixed(version=2)), "format version 2"),
    ("encoding", lambda: mutated("nm", set_fixed(encoding=6)), "unknown encoding 6"),
    ("value type", lambda: mutated("nm", set_fixed(value_type=4)), "unknown value type 4"),
    ("layout", lambda: mutated("nm", set_fixed(layout=4)), "unknown layout 4"),
    ("value_bits", lambda: mutated("nm", set_fixed(value_bits=7)), "value_bits 7 does not match value type int8"),
    ("intN bits", lambda: mutated("int4", set_fixed(value_bits=8)), "value_bits 8 does not match value type intN"),
    ("rank 0", lambda: mutated("nm", set_fixed(rank=0)), "rank 0 is outside 1..8"),
    ("rank 9", lambda: mutated("nm", set_fixed(rank=9)), "rank 9 is outside 1..8"),
    ("rank vs layout", lambda: mutated("nm", add_dim), "rank 3 does not match layout rows"),
    ("conv rank", lambda: mutated("nm", set_fixed(layout=0)), "rank 2 does not match layout conv"),
    ("sections 0", lambda: mutated("nm", set_fixed(section_count=0)), "section_count 0 is outside 1..4"),
    ("sections 5", lambda: mutated("nm", set_fixed(section_count=5)), "section_count 5 is outside 1..4"),
    ("flags", lambda: mutated("nm", set_fixed(flags=7)), "flags 0x07 has unknown bits"),
    ("flags bit 1 alone", lambda: mutated("dense", set_fixed(flags=2)), "bit 1 .zero points omitted. without bit 0"),
    ("dim 0", lambda: mutated("dense", lambda p: p.dims.__setitem__(2, 0)), "has a dim of 0"),
    ("huge", lambda: mutated("dense", lambda p: p.dims.__setitem__(0, 2**30)), "more than 2\\^31 - 1"),
    ("groups 0", lambda: mutated("dense", set_fixed(groups=0)), "groups 0 does not divide"),
    ("groups divide", lambda: mutated("dense", set_fixed(groups=3)), "groups 3 does not divide the 2 channels"),
    ("groups rows", lambda: mutated("nm", set_fixed(groups=2)), "groups 2 on a rows weight"),
    # encoding parameters
    ("N >= M", lambda: mutated("nm", set_fixed(param_a=4, param_c=4)), "nm needs 1 <= N < M <= 256"),
    ("M > 256", lambda: mutated("nm", set_fixed(param_b=257)), "nm needs 1 <= N < M <= 256"),
    ("nm kept", lambda: mutated("nm", set_fixed(param_c=1)), "param_c = N"),
    ("nm param_d", lambda: mutated("nm", set_fixed(param_d=1)), "param_d = 0"),
    ("nm too small", lambda: mutated("nm", set_fixed(param_b=16)), "shorter than M=16"),
    ("block N 0", lambda: mutated("block5", set_fixed(param_a=0)), "block needs param_a >= 1"),
    ("block too small", lambda: mutated("block5", set_fixed(param_a=3)), "fewer than N=3"),
    ("block kept", lambda: mutated("block5", set_fixed(param_c=6)), "not within 1..5"),
    ("bank B 1", lambda: mutated("bank6", set_fixed(param_a=1)), "bank needs param_a >= 2"),
    ("bank kept 0", lambda: mutated("bank6", set_fixed(param_c=0)), "not within 1..6"),
    ("bank param_b", lambda: mutated("bank6", set_fixed(param_b=1)), "param_b = param_d = 0"),
    ("mcbbs C 0", lambda: mutated("mcbbs3", set_fixed(param_a=0)), "mcbbs needs C >= 1"),
    ("mcbbs R 1", lambda: mutated("mcbbs3", set_fixed(param_b=1)), "2 <= R <= 256"),
    ("mcbbs R 257", lambda: mutated("mcbbs3", set_fixed(param_b=257)), "2 <= R <= 256"),
    ("mcbbs P 0", lambda: mutated("mcbbs3", set_fixed(param_d=0)), "P >= 1"),
    ("mcbbs kept", lambda: mutated("mcbbs3", set_fixed(param_c=4)), "not within 1..3"),
    ("dense params", lambda: mutated("dense", set_fixed(param_a=1)), "dense takes no parameters"),
    # quantization block
    ("axis", lambda: mutated("nm", set_quantization(axis=2)), "quantization axis 2 is outside"),
    ("axis -2", lambda: mutated("nm", set_quantization(axis=-2)), "quantization axis -2 is outside"),
    ("param_count", lambda: mutated("nm", set_quantization(param_count=1, scales=[0.5], zero_points=[0])),
     "param_count 1 is not 2"),
    ("scale nan", lambda: mutated("nm", set_quantization(scales=[math.nan, 0.25])), "not finite and positive"),
    ("scale inf", lambda: mutated("nm", set_quantization(scales=[0.5, math.inf])), "not finite and positive"),
    ("scale 0", lambda: mutated("nm", set_quantization(scales=[0.0, 0.25])), "not finite and positive"),
    ("scale < 0", lambda: mutated("nm", set_quantization(scales=[-1.0, 0.25])), "not finite and positive"),
    ("zero point int8", lambda: mutated("nm", set_quantization(zero_points=[0, 128])), "outside -128..127"),
    ("zero point int4", lambda: mutated("int4", set_quantization(zero_points=[-9])), "outside -8..7"),
    ("float quantization", lambda: mutated("dense", lambda p: (
        p.fixed.update(flags=1), setattr(p, "quantization", {"axis": -1, "param_count": 1, "scales": [1.0],
                                                              "zero_points": [0]}))),
     "quantization block on float32"),
    # CRCs and the section table
    ("header crc", lambda: flip(example_tensor("nm"), 0x60), "header crc mismatch"),
    ("header byte", lambda: flip(example_tensor("nm"), 0x0C), "header crc mismatch"),
    ("truncated header", lambda: example_tensor("nm")[:92], "header needs 100 bytes"),
    ("trailing bytes", lambda: example_tensor("nm") + b"\0", "sections end at byte 110, but the packed tensor"),
    ("truncated section", lambda: example_tensor("nm")[:109], "ends at byte 110, past the 109 bytes"),
    ("gap", lambda: gap_before_section_2(), "starts at byte 103, not 102"),
    ("missing kind", lambda: mutated("nm", both(set_fixed(section_count=1), lambda p: (p.sections.pop(),
                                                                                        p.payloads.pop()))),
     "sections are \\(indices\\); nm stores \\(indices, values\\)"),
    ("repeated kind", lambda: mutated("nm", set_section(1, kind=1)), "sections are \\(values, values\\)"),
    ("order", lambda: mutated("nm", swap_sections), "sections are \\(values, indices\\)"),
    ("unknown kind", lambda: mutated("nm", set_section(2, kind=4)), "section 2: unknown kind 4"),
    ("reserved", lambda: mutated("nm", set_section(1, reserved=1)), "section 1 \\(indices\\): reserved byte is 1"),
    ("coding", lambda: mutated("nm", set_section(2, coding=2)), "section 2 \\(values\\): unknown coding 2"),
    ("huffman 32-bit", lambda: mutated("dense", set_section(1, coding=1)),
     "section 1 \\(values\\): Huffman coding of 32-bit fields"),
    ("field_bits", lambda: mutated("nm", set_section(1, field_bits=3)), "field_bits 3, nm needs 2"),
    ("field_count", lambda: mutated("nm", set_section(2, field_count=9)), "field_count 9, the shape and"),
    ("csr nnz", lambda: mutated("csr", both(set_section(2, field_count=16), set_section(3, field_count=16))),
     "16 values, more than the 15 elements"),
    ("csr counts", lambda: mutated("csr", set_section(2, field_count=3)),
     "section 2 \\(indices\\): field_count 3, the shape and parameters imply 4"),
    ("raw length", lambda: mutated("nm", set_payload(1, b"\xcd\x88\x00")), "3 bytes, raw 8 x 2-bit fields take 2"),
    ("padding bits", lambda: mutated("nm5", lambda p: p.payloads.__setitem__(0, p.payloads[0][:1] + bytes(
        [p.payloads[0][1] | 0x80]))), "section 1 \\(indices\\): padding bits after the last field are not 0"),
    ("section 1 crc", lambda: flip(example_tensor("nm"), 0x64), "section 1 \\(indices\\): crc mismatch"),
    ("section 2 crc", lambda: flip(example_tensor("nm"), 0x6D), "section 2 \\(values\\): crc mismatch"),
    ("csr crcs", lambda: flip(example_tensor("csr"), len(example_tensor("csr")) - 1),
     "section 3 \\(values\\): crc mismatch"),
    # decoding
    ("csr index >= K", lambda: mutated("csr", fields_change(2, assign(0, 5))), "column index 5 is not below K = 5"),
    ("csr unordered", lambda: mutated("csr", fields_change(2, assign(2, 3))),
     "column indices of row 2 are not strictly increasing"),
    ("csr first pointer", lambda: mutated("csr", fields_change(1, assign(0, 1))), "first row pointer is 1"),
    ("csr decreasing", lambda: mutated("csr", fields_change(1, assign(1, 3))), "row pointers decrease after row 1"),
    ("csr last pointer", lambda: mutated("csr", fields_change(1, assign(3, 3))), "last row pointer is 3, not the 4"),
    ("position >= M", lambda: mutated("nm5", fields_change(1, assign(1, 5))), "has position 5, not below M = 5"),
    ("position >= B", lambda: mutated("bank6", fields_change(1, assign(1, 7))), "has position 7, not below B = 6"),
    ("position >= R", lambda: mutated("mcbbs3", fields_change(1, assign(0, 3))), "has position 3, not below R = 3"),
    ("channel >= I/g", lambda: mutated("block5", fields_change(1, assign(0, 5))),
     "has position 5, not below the input channels per group = 5"),
    ("not increasing", lambda: mutated("nm", fields_change(1, assign(1, 1))),
     "positions of domain 0 are not strictly increasing \\(1, 1\\)"),
    ("decreasing", lambda: mutated("nm", fields_change(1, assign(0, 3))),
     "positions of domain 0 are not strictly increasing"),
    ("virtual zero is fine", lambda: mutated("nm_ragged", fields_change(1, assign_many(2, [0, 3]))), None),
    ("virtual nonzero", lambda: mutated("nm_ragged", both(fields_change(1, assign_many(2, [0, 2])),
                                                          fields_change(2, assign(3, 9)))),
     "section 2 \\(values\\): domain 1 holds a nonzero value at a virtual"),
    ("huffman table", lambda: mutated("huffman", lambda p: p.payloads.__setitem__(
        0, struct.pack("<I", 999) + p.payloads[0][4:])), "section 1 \\(values\\): Huffman"),
]


def flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:]


def gap_before_section_2() -> bytes:
    packed = parse_packed(example_tensor("nm"))
    packed.payloads[0] += b"\0"
    data = packed.build()
    packed = parse_packed(data)
    packed.sections[0]["length"] = 2
    packed.payloads[0] = packed.payloads[0][:2]
    return packed.build(fix_offsets=False)


@pytest.mark.parametrize("case,make,message", REJECTIONS, ids=[case for case, _, _ in REJECTIONS])
def test_reader_rejects(case, make, message):
    data = make()
    if message is None:  # a valid variation: the tensor still decodes
        unpack_tensor(data)
        return
    with pytest.raises(FormatError, match=message) as caught:
        unpack_tensor(data)
    text = str(caught.value)
    assert text.startswith("packed tensor: ") and "\n" not in text
    decode_time = case.startswith(("csr index", "csr unordered", "csr first", "csr decreasing", "csr last",
                                   "position", "channel", "not increasing", "decreasing", "virtual"))
    if decode_time:
        read_info(data)  # a header-only read accepts what only decoding can find
    else:
        with pytest.raises(FormatError, match=message):
            read_info(data)


def test_every_byte_of_the_header_and_sections_is_covered_by_a_crc():
    data = example_tensor("nm")
    packed = parse_packed(data)
    for at in range(len(data)):
        with pytest.raises(FormatError):
            unpack_tensor(flip(data, at))
    assert packed.sections[0]["crc"] == zlib.crc32(data[100:102])


def test_a_header_claiming_a_huge_shape_fails_before_allocating():
    packed = parse_packed(example_tensor("dense"))
    packed.dims = [46340, 46340, 1, 1]  # 2^31 - 1 > 46340^2 elements: a valid shape, unbacked by bytes
    hostile = packed.build()
    tracemalloc.start()
    try:
        with pytest.raises(FormatError, match="field_count 24, the shape and parameters imply 2147395600"):
            unpack_tensor(hostile)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_a_huge_but_valid_sparse_tensor_is_refused_by_the_callers_limit_before_allocating():
    weight = np.zeros((1, 40), np.float32)
    packed = parse_packed(pack_tensor(weight, WeightLayout("rows", (1, 40)), encoding="csr"))
    packed.dims = [1, 2**31 - 1]
    packed.sections[1]["field_bits"] = 31  # bits(K)
    hostile = packed.build()
    tracemalloc.start()
    try:
        info = read_info(hostile)
        with pytest.raises(FormatError, match="2147483647 elements, more than the 1000000 allowed"):
            unpack_tensor(hostile, max_elements=1_000_000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.shape == (1, 2**31 - 1) and peak < 1 << 20


# ---------------------------------------------------------------------------------------------
# The worked example of docs/FORMAT.md section 7
# ---------------------------------------------------------------------------------------------


def worked_example() -> tuple[bytes, dict]:
    """The hex bytes and the documented values of section 7, read from the markdown."""
    text = FORMAT_DOC.read_text()
    section = text[text.index("## 7. Worked example"):]
    hex_block = re.search(r"```hex\n(.*?)```", section, re.S)[1]
    data, expected_offset = bytearray(), 0
    for line in hex_block.splitlines()[1:]:
        match = re.match(r"0x([0-9A-F]{4})  ((?:[0-9A-F]{2} )*[0-9A-F]{2})(?:  |$)", line)
        assert match, f"unreadable line in the worked example: {line!r}"
        assert int(match[1], 16) == expected_offset, f"offset of {line!r}"
        chunk = bytes.fromhex(match[2])
        data += chunk
        expected_offset += len(chunk)
    values_block = re.search(r"```text\n(.*?)```", section, re.S)[1]
    documented = {}
    for line in values_block.splitlines():
        name, value = line.split(" = ")
        documented[name.strip()] = json.loads(value)
    return bytes(data), documented


def test_the_worked_example_decodes_to_the_documented_values_and_is_what_pack_writes():
    data, documented = worked_example()
    weight = np.array(documented["W"], np.int8)
    assert np.array_equal(unpack_tensor(data), weight)
    info = read_info(data)
    assert info.quantization == Quantization(0, documented["scales"], documented["zero_points"])
    assert (info.encoding, info.layout, info.total_bytes) == (Encoding.nm(2, 4), WeightLayout("rows", (2, 8)), 110)
    assert [(s.kind, s.coding, s.field_bits, s.field_count, s.stored_bytes) for s in info.sections] == [
        ("indices", "raw", 2, 8, 2), ("values", "raw", 8, 8, 8)]
    packed = pack_tensor(weight, WeightLayout("rows", (2, 8)), encoding="nm:2:4",
                         quantization=Quantization(0, documented["scales"], documented["zero_points"]),
                         huffman="off")
    assert packed == data
