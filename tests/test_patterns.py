"""Patterns are pure functions W[O, K] -> mask; every one meets its definition exactly."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxsparse.errors import UsageError
from onnxsparse.sparsity.criteria import L1, L2, Random, make_criterion
from onnxsparse.sparsity.patterns import MCBBS, NM, MatrixShape, detect_pattern, parse_pattern, top_per_row
from pattern_invariants import check_pattern

PATTERN_SPARSITIES = [
    ("unstructured", 0.7), ("2:4", 0.5), ("1:4", 0.75), ("3:8", 0.625), ("1x4", 0.5), ("1x16", 0.8),
    ("bank:4", 0.5), ("bank:16", 0.75), ("bank:8", 0.3), ("mcbbs:c2r4", 0.75), ("mcbbs:c2r4", 0.5),
    ("mcbbs:c1r8", 0.875), ("mcbbs:c4r4", 0.25), ("kernel", 0.6), ("filter", 0.5), ("channel", 0.4),
]

shapes = st.builds(MatrixShape, out_channels=st.integers(1, 40), kernel_positions=st.sampled_from([1, 2, 9]),
                   strip_length=st.integers(1, 40))


def random_matrix(shape: MatrixShape, seed: int = 0) -> np.ndarray:
    matrix = np.random.default_rng(seed).standard_normal((shape.out_channels, shape.columns)).astype(np.float32)
    matrix[matrix == 0] = 1.0  # the invariants assume no natural zeros
    return matrix


def prune(matrix, shape, spec, sparsity, criterion=None):
    mask = parse_pattern(spec).mask(matrix, shape, sparsity, criterion or L1())
    assert mask.dtype == bool and mask.shape == matrix.shape
    return np.where(mask, matrix, 0)


@pytest.mark.parametrize("spec,sparsity", PATTERN_SPARSITIES)
@settings(max_examples=40, deadline=None)
@given(shape=shapes, criterion=st.sampled_from(["l1", "l2", "random"]), seed=st.integers(0, 3))
def test_every_pattern_meets_its_definition_on_any_shape(spec, sparsity, shape, criterion, seed):
    matrix = random_matrix(shape, seed)
    pruned = prune(matrix, shape, spec, sparsity, make_criterion(criterion, seed=seed, key="layer"))
    check_pattern(pruned, shape, parse_pattern(spec), sparsity)


@pytest.mark.parametrize("spec", sorted({spec for spec, _ in PATTERN_SPARSITIES
                                         if parse_pattern(spec).fixed_sparsity is None}))
def test_sparsity_zero_keeps_everything(spec):
    shape = MatrixShape(32, 9, 32)
    assert parse_pattern(spec).mask(random_matrix(shape), shape, 0.0, L1()).all()


@settings(max_examples=200, deadline=None)
@given(rows=st.integers(1, 5), units=st.integers(1, 12), keep=st.integers(0, 12), seed=st.integers(0, 999))
def test_top_per_row_equals_a_stable_descending_sort(rows, units, keep, seed):
    scores = np.random.default_rng(seed).integers(0, 4, (rows, units)).astype(np.float64)  # many ties
    order = np.argsort(-scores, axis=1, kind="stable")
    expected = np.zeros_like(scores, dtype=bool)
    np.put_along_axis(expected, order[:, :keep], True, axis=1)
    assert np.array_equal(top_per_row(scores, keep), expected)


def test_nm_keeps_the_largest_magnitudes_of_every_run():
    shape = MatrixShape(3, 2, 8)
    matrix = random_matrix(shape, 5)
    pruned = prune(matrix, shape, "2:4", 0.5)
    runs, kept = np.abs(matrix).reshape(-1, 4), pruned.reshape(-1, 4) != 0
    for run, keep in zip(runs, kept):
        assert set(np.flatnonzero(keep)) == set(np.argsort(-run)[:2])


def test_bank_ragged_tail_keeps_min_of_count_and_real_positions():
    # strip of 10 with banks of 4: banks of 4, 4 and a tail of 2 real positions; keep 3 per bank
    shape = MatrixShape(1, 1, 10)
    pruned = prune(random_matrix(shape), shape, "bank:4", 0.25)
    assert [np.count_nonzero(pruned[0, i:i + 4]) for i in (0, 4, 8)] == [3, 3, 2]


def test_mcbbs_keeps_whole_clusters_by_l1_within_each_range():
    # one strip of 8 channels, c2r4: clusters (0,1) (2,3) (4,5) (6,7); 75% keeps the best one
    matrix = np.array([[0.1, 0.1, 5.0, -4.0, 0.2, 0.3, -1.0, 1.0]], np.float32)
    pruned = prune(matrix, MatrixShape(1, 1, 8), "mcbbs:c2r4", 0.75)
    assert pruned.tolist() == [[0, 0, 5.0, -4.0, 0, 0, 0, 0]]


def test_mcbbs_cluster_runs_along_input_channels_of_one_kernel_position():
    # Conv 1 out x 2 positions x 4 channels: strips are [p0: i0..i3], [p1: i0..i3]
    matrix = np.array([[9, 9, 1, 1, 1, 1, 9, 9]], np.float32)
    pruned = prune(matrix, MatrixShape(1, 2, 4), "mcbbs:c2r2", 0.5)
    assert pruned.tolist() == [[9, 9, 0, 0, 0, 0, 9, 9]]


def test_block_unit_spans_n_rows_one_channel_and_the_whole_kernel():
    shape = MatrixShape(4, 2, 3)  # O=4, P=2, Ig=3: columns (p, i)
    matrix = np.ones((4, 6), np.float32)
    matrix[:, [1, 4]] = 10.0  # input channel 1 at both kernel positions is the strongest
    pruned = prune(matrix, shape, "1x4", 0.67)  # keep round(0.33*3) = 1 channel per block row
    assert np.array_equal(pruned != 0, np.tile([False, True, False, False, True, False], (4, 1)))


def test_block_rows_not_a_multiple_of_n_pad_with_virtual_rows():
    shape = MatrixShape(20, 1, 8)  # 1x16: one full block row and a tail of 4 rows
    pruned = prune(random_matrix(shape), shape, "1x16", 0.5)
    check_pattern(pruned, shape, parse_pattern("1x16"), 0.5)
    assert np.count_nonzero(pruned[16:]) == 4 * 4


def test_filter_and_channel_prune_whole_rows_and_input_channels():
    shape = MatrixShape(4, 1, 4)
    matrix = np.arange(1, 17, dtype=np.float32).reshape(4, 4)
    assert np.array_equal(prune(matrix, shape, "filter", 0.5).any(axis=1), [False, False, True, True])
    assert np.array_equal(prune(matrix, shape, "channel", 0.5).any(axis=0), [False, False, True, True])


def test_l2_and_l1_rank_clusters_differently():
    # cluster A (3, 3): L1 6, L2 4.24; cluster B (5, 0.5): L1 5.5, L2 5.02
    matrix = np.array([[3, 3, 5, 0.5]], np.float32)
    shape = MatrixShape(1, 1, 4)
    assert prune(matrix, shape, "mcbbs:c2r2", 0.5, L1()).tolist() == [[3, 3, 0, 0]]
    assert prune(matrix, shape, "mcbbs:c2r2", 0.5, L2()).tolist() == [[0, 0, 5, 0.5]]


def test_random_criterion_is_seeded_and_differs_between_layers():
    shape = MatrixShape(16, 1, 16)
    matrix = random_matrix(shape)
    first = prune(matrix, shape, "unstructured", 0.5, Random(seed=1, key="a"))
    assert np.array_equal(first, prune(matrix, shape, "unstructured", 0.5, Random(seed=1, key="a")))
    assert not np.array_equal(first, prune(matrix, shape, "unstructured", 0.5, Random(seed=1, key="b")))


@pytest.mark.parametrize("text,message", [
    ("diagonal", "unknown pattern"), ("4:4", "N < M"), ("5:4", "N < M"), ("0:4", "N < M"), ("1x0", "N >= 1"),
    ("bank:1", "B >= 2"), ("mcbbs:c0r4", "C >= 1"), ("mcbbs:c2r1", "R >= 2"),
])
def test_bad_pattern_specs_are_usage_errors(text, message):
    with pytest.raises(UsageError, match=message):
        parse_pattern(text)


def test_pattern_specs_users_can_guess():
    assert parse_pattern("2:4") == NM(2, 4)
    assert parse_pattern(" 1×16 ").spec == "1x16"
    assert parse_pattern("MCBBS:C2R4") == MCBBS(2, 4)
    assert [parse_pattern(s).spec for s in ("bank:16", "kernel", "filter", "channel", "unstructured")] == \
        ["bank:16", "kernel", "filter", "channel", "unstructured"]


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5])
def test_sparsity_outside_zero_one_is_rejected(sparsity):
    with pytest.raises(UsageError, match=r"outside \[0, 1\)"):
        parse_pattern("unstructured").check_sparsity(sparsity)


def test_mcbbs_sparsity_must_be_a_multiple_of_one_over_r():
    pattern = parse_pattern("mcbbs:c2r4")
    pattern.check_sparsity(0.75)
    with pytest.raises(UsageError, match="use one of 0, 0.25, 0.5, 0.75"):
        pattern.check_sparsity(0.8)


def test_nm_rejects_a_different_sparsity():
    with pytest.raises(UsageError, match="fixes sparsity at 0.5"):
        parse_pattern("2:4").check_sparsity(0.75)


@pytest.mark.parametrize("spec,sparsity", [
    ("filter", 0.5), ("channel", 0.5), ("kernel", 0.5), ("1x16", 0.75), ("1x4", 0.5), ("mcbbs:c2r4", 0.75),
    ("2:4", 0.5), ("1:4", 0.75), ("bank:16", 0.75),
])
def test_detect_finds_the_pattern_a_matrix_was_pruned_with(spec, sparsity):
    shape = MatrixShape(64, 9, 64)
    pruned = prune(random_matrix(shape, 3), shape, spec, sparsity)
    detected = detect_pattern(pruned, shape)
    assert detected.spec == spec
    assert detected.pattern_sparsity == pytest.approx(sparsity, abs=0.01)


def test_detect_reports_dense_and_unstructured():
    shape = MatrixShape(32, 9, 32)
    matrix = random_matrix(shape)
    assert detect_pattern(matrix, shape).spec == "dense"
    assert detect_pattern(prune(matrix, shape, "unstructured", 0.5), shape).spec == "unstructured"


def test_detect_tolerates_a_few_extra_zeros_from_quantization():
    shape = MatrixShape(64, 9, 64)
    pruned = prune(random_matrix(shape, 4), shape, "1x16", 0.75)
    pruned[np.abs(pruned) < 0.05] = 0  # small kept weights rounding to zero
    assert detect_pattern(pruned, shape).spec == "1x16"
