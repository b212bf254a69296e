"""Mask selection in pruning/sparsity.py against brute-force references."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pruning.sparsity import (
    Pattern,
    SparsityError,
    check_sparsity,
    keep_nm,
    keep_topk,
    keep_topk_per_row,
    nm_valid,
    parse_pattern,
    prune_count,
    prune_counts_per_row,
)

pytestmark = pytest.mark.usefixtures("one_thread")

SPARSITIES = st.floats(0.0, 0.99, allow_nan=False)


def scores_with_ties(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Scores on a coarse grid, so that ties (and their tie-breaking) are common."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 4, (rows, cols), generator=gen).float()


def ref_keep(scores: list[float], n_prune: int) -> list[bool]:
    """Prune the ``n_prune`` smallest by (score, index): equal scores, lower index pruned first."""
    order = sorted(range(len(scores)), key=lambda i: (scores[i], i))
    pruned = set(order[:n_prune])
    return [i not in pruned for i in range(len(scores))]


def ref_keep_best(scores: list[float], n_keep: int) -> list[bool]:
    """Keep the ``n_keep`` largest by (score, -index): keep_nm's rule, equal scores keep the lower
    index (the server's N:M mask expansion relies on the same rule)."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return [i in set(order[:n_keep]) for i in range(len(scores))]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2:4", Pattern(2, 4)),
        (" 4 : 8 ", Pattern(4, 8)),
        (None, None),
        ("", None),
        ("unstructured", None),
        ("None", None),
    ],
)
def test_parse_pattern(text: str | None, expected: Pattern | None) -> None:
    assert parse_pattern(text) == expected


@pytest.mark.parametrize("text", ["2-4", "4:4", "0:4", "5:4", "2:4:8", "a:b"])
def test_parse_pattern_rejects(text: str) -> None:
    with pytest.raises(SparsityError):
        parse_pattern(text)


def test_pattern_sparsity_and_str() -> None:
    assert Pattern(2, 4).sparsity == 0.5 and Pattern(1, 4).sparsity == 0.75
    assert str(Pattern(4, 8)) == "4:8"


@pytest.mark.parametrize(
    ("sparsity", "pattern"), [(-0.1, None), (1.0, None), ("0.5", None), (0.6, Pattern(2, 4))]
)
def test_check_sparsity_rejects(sparsity, pattern: Pattern | None) -> None:
    with pytest.raises(SparsityError):
        check_sparsity(sparsity, pattern)


def test_check_sparsity_accepts_matching_pattern() -> None:
    assert check_sparsity(0.5, Pattern(2, 4)) == 0.5
    assert check_sparsity(0, None) == 0.0


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 7), cols=st.integers(1, 9), sparsity=SPARSITIES, seed=st.integers(0, 99))
def test_keep_topk_matches_reference(rows: int, cols: int, sparsity: float, seed: int) -> None:
    scores = scores_with_ties(rows, cols, seed)
    keep = keep_topk(scores, sparsity)
    assert keep.shape == scores.shape and keep.dtype == torch.bool
    assert int((~keep).sum()) == prune_count(rows * cols, sparsity)
    expected = ref_keep(scores.flatten().tolist(), prune_count(rows * cols, sparsity))
    assert keep.flatten().tolist() == expected


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.97])
def test_keep_topk_is_a_stable_sort_on_large_scores_with_nan_and_inf(sparsity: float) -> None:
    """The linear-time cut gives a stable sort's mask, NaN ranked as +inf."""
    gen = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 50, (61, 130), generator=gen).float()
    scores.view(-1)[torch.randperm(scores.numel(), generator=gen)[:300]] = torch.nan
    scores.view(-1)[torch.randperm(scores.numel(), generator=gen)[:200]] = torch.inf
    n = prune_count(scores.numel(), sparsity)
    flat = scores.flatten().nan_to_num(nan=torch.inf, posinf=torch.inf)
    expected = torch.ones(scores.numel(), dtype=torch.bool)
    expected[torch.sort(flat, stable=True).indices[:n]] = False
    assert torch.equal(keep_topk(scores, sparsity).flatten(), expected)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 9), cols=st.integers(1, 9), sparsity=SPARSITIES)
def test_prune_counts_per_row_exact_and_balanced(rows: int, cols: int, sparsity: float) -> None:
    counts = prune_counts_per_row(rows, cols, sparsity)
    assert int(counts.sum()) == prune_count(rows * cols, sparsity)
    assert int(counts.max() - counts.min()) <= 1
    assert bool((counts[:-1] >= counts[1:]).all())  # the extra weights go to the first rows


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 7), cols=st.integers(1, 9), sparsity=SPARSITIES, seed=st.integers(0, 99))
def test_keep_topk_per_row_matches_reference(
    rows: int, cols: int, sparsity: float, seed: int
) -> None:
    scores = scores_with_ties(rows, cols, seed)
    keep = keep_topk_per_row(scores, sparsity)
    counts = prune_counts_per_row(rows, cols, sparsity).tolist()
    for r in range(rows):
        assert keep[r].tolist() == ref_keep(scores[r].tolist(), counts[r])


@settings(max_examples=40, deadline=None)
@given(
    nm=st.sampled_from([(1, 4), (2, 4), (4, 8), (3, 5)]),
    rows=st.integers(1, 5),
    groups=st.integers(1, 4),
    seed=st.integers(0, 99),
)
def test_keep_nm_keeps_n_best_per_group(
    nm: tuple[int, int], rows: int, groups: int, seed: int
) -> None:
    pattern = Pattern(*nm)
    scores = scores_with_ties(rows, groups * pattern.m, seed)
    keep = keep_nm(scores, pattern)
    assert nm_valid(keep, pattern)
    assert int(keep.sum()) == rows * groups * pattern.n  # exactly n kept, not just at most n
    for r in range(rows):
        for g in range(groups):
            cols = slice(g * pattern.m, (g + 1) * pattern.m)
            group = scores[r, cols].tolist()
            assert keep[r, cols].tolist() == ref_keep_best(group, pattern.n)


def test_keep_nm_rejects_ragged_columns() -> None:
    with pytest.raises(SparsityError, match="multiple of M=4"):
        keep_nm(torch.rand(2, 6), Pattern(2, 4))


@pytest.mark.parametrize(
    ("mask", "valid"),
    [
        ([[1, 1, 0, 0, 0, 1, 0, 1]], True),
        ([[1, 0, 0, 0, 0, 0, 0, 0]], True),  # fewer than n kept is still valid
        ([[1, 1, 1, 0, 0, 1, 0, 1]], False),
        ([[1, 1, 0, 0, 0, 1, 1, 1]], False),  # the violation is in the second group
        ([[1, 1, 0, 0, 0, 1]], False),  # ragged width
    ],
)
def test_nm_valid(mask: list[list[int]], valid: bool) -> None:
    assert nm_valid(torch.tensor(mask, dtype=torch.bool), Pattern(2, 4)) is valid
