"""Fuzzing the reader: damaged packed tensors either decode to their declared shape or raise
FormatError — never another exception, never a hang, never a large allocation.

Mutations (byte flips and overwrites, insertions, deletions, truncation) hit a varied corpus of
valid tensors; half the time the CRCs are recomputed afterwards so that damage reaches the checks
behind them. ONNXSPARSE_FUZZ_EXAMPLES sets the number of examples (a benchmark run can ask for
1,000,000).
"""

from __future__ import annotations

import os
import tracemalloc
from datetime import timedelta
from functools import cache

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onnxsparse.formats.container import FormatError, Quantization, pack_tensor, read_info, unpack_tensor
from onnxsparse.model import WeightLayout
from test_container import patterned_weight, repair_crcs

PEAK_BYTES_LIMIT = 64 << 20

# (layout, value type, pattern, sparsity, encoding, huffman, quantized)
CORPUS_SPECS = [
    (WeightLayout("conv", (8, 8, 3, 3)), "float32", "2:4", 0.5, "nm:2:4", "off", False),
    (WeightLayout("conv", (8, 8, 3, 3)), "int8", "2:4", 0.5, "nm:2:4", "on", True),
    (WeightLayout("conv", (6, 6, 3), groups=2), "int4", "1:4", 0.75, "nm:1:4", "on", True),
    (WeightLayout("rows", (5, 10)), "float16", "2:4", 0.5, "nm:2:4", "auto", False),
    (WeightLayout("conv", (16, 6, 2, 2)), "float32", "1x8", 0.5, "block:8", "off", False),
    (WeightLayout("conv", (10, 5, 3, 3)), "int8", "1x4", 0.6, "block:4", "on", True),
    (WeightLayout("cols", (20, 6)), "int3", "bank:8", 0.5, "bank:8", "on", False),
    (WeightLayout("rows", (4, 30)), "float32", "bank:8", 0.75, "bank:8", "off", False),
    (WeightLayout("conv", (4, 16, 3, 3)), "float16", "mcbbs:c2r4", 0.75, "mcbbs:c2r4p3", "on", False),
    (WeightLayout("conv_transpose", (12, 4, 2, 2), groups=2), "int8", "mcbbs:c1r3", 2 / 3, "mcbbs:c1r3p2", "off",
     True),
    (WeightLayout("rows", (6, 40)), "int8", "unstructured", 0.8, "csr", "on", True),
    (WeightLayout("rows", (6, 40)), "float32", "unstructured", 0.7, "csr", "off", False),
    (WeightLayout("conv", (3, 4, 2)), "float32", "dense", 0.0, "dense", "off", False),
    (WeightLayout("rows", (8, 12)), "int8", "dense", 0.0, "dense", "on", True),
    (WeightLayout("rows", (4, 9)), "int2", "unstructured", 0.5, "auto", "auto", True),
    (WeightLayout("conv", (4, 4, 3, 3)), "float32", "zeros", 0.0, "auto", "auto", False),
]


@cache
def corpus() -> tuple[bytes, ...]:
    tensors = []
    for seed, (layout, value_type, spec, sparsity, encoding, huffman, quantized) in enumerate(CORPUS_SPECS):
        weight = patterned_weight(layout, value_type, spec, sparsity, seed)
        value_bits = int(value_type[3:]) if value_type.startswith("int") else None
        quantization = None
        if quantized:
            channels = layout.onnx_shape[0]
            quantization = Quantization(0, np.linspace(0.01, 1.0, channels, dtype=np.float32),
                                        np.zeros(channels, np.int32))
        tensors.append(pack_tensor(weight, layout, encoding=encoding, value_bits=value_bits,
                                   quantization=quantization, huffman=huffman))
    return tuple(tensors)


# A position biased to the header (where most checks live), or anywhere.
positions = st.one_of(st.integers(0, 160), st.integers(0, 1 << 16))
mutations = st.one_of(
    st.tuples(st.just("flip"), positions, st.integers(1, 255)),
    st.tuples(st.just("set"), positions, st.sampled_from([0, 1, 2, 3, 4, 7, 8, 16, 31, 32, 0x7F, 0x80, 0xFF])),
    st.tuples(st.just("insert"), positions, st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("delete"), positions, st.integers(1, 8)),
    st.tuples(st.just("truncate"), positions, st.just(0)),
)


def mutate(data: bytes, edits) -> bytes:
    data = bytearray(data)
    for kind, position, argument in edits:
        at = position % (len(data) + 1)
        if kind == "insert":
            data[at:at] = argument
        elif kind == "delete":
            del data[at: at + argument]
        elif kind == "truncate":
            del data[at:]
        elif at < len(data):
            data[at] = data[at] ^ argument if kind == "flip" else argument
    return bytes(data)


@settings(max_examples=int(os.environ.get("ONNXSPARSE_FUZZ_EXAMPLES", 10000)), deadline=timedelta(seconds=2),
          suppress_health_check=[HealthCheck.too_slow])
@given(base=st.integers(0, len(CORPUS_SPECS) - 1), edits=st.lists(mutations, min_size=1, max_size=4),
       repair=st.booleans())
def test_damaged_tensors_decode_to_their_shape_or_raise_format_error(base, edits, repair):
    data = mutate(corpus()[base], edits)
    if repair:
        data = repair_crcs(data)
    tracemalloc.start()
    try:
        try:
            values = unpack_tensor(data)
        except FormatError as error:
            assert str(error).startswith("packed tensor: ") and "\n" not in str(error)
            values = None
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < PEAK_BYTES_LIMIT
    if values is not None:
        info = read_info(data)
        assert values.shape == info.shape and values.dtype == info.dtype


def test_the_corpus_is_valid_and_covers_every_encoding_and_coding():
    infos = [read_info(data) for data in corpus()]
    assert {info.encoding.name for info in infos} >= {"dense", "csr", "nm", "block", "bank", "mcbbs"}
    assert {section.coding for info in infos for section in info.sections} == {"raw", "huffman"}
    assert {info.value_type for info in infos} == {"float32", "float16", "int8", "intN"}
    for data in corpus():
        unpack_tensor(data)
