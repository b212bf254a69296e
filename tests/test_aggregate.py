"""ℓ0 aggregation, adaptive mask expansion and the baselines, against brute-force references."""

import itertools
import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pruning import aggregate
from pruning.aggregate import MERGES, expand_mask, l0_aggregate, merge_tensor
from pruning.sparsity import (
    Pattern,
    Target,
    keep_nm,
    keep_topk,
    keep_topk_per_row,
    nm_valid,
    prune_count,
    prune_counts_per_row,
)


def merged(merge, updates, sparsity, pattern=None, dense=None, per_row=False):
    """``merge_tensor`` over in-memory updates, each a re-readable source."""
    sources = [(lambda u=u: u) for u in updates]
    reader = (lambda: dense) if dense is not None else None
    return merge_tensor(merge, sources, Target(sparsity, pattern), reader, per_row)


@pytest.fixture(autouse=True, scope="module")
def tiny_blocks():
    """Blocks of 5 elements, so every streaming loop runs many partial blocks on small tensors."""
    saved, aggregate._BLOCK = aggregate._BLOCK, 5
    yield
    aggregate._BLOCK = saved


def client_updates(n, rows, cols, sparsity, pattern, per_row, seed, dtype=torch.float16):
    """Clients pruned exactly as the pruners do; values on a 1/64 grid so fp32 sums are exact."""
    gen = torch.Generator().manual_seed(seed)
    updates = []
    for _ in range(n):
        weight = (torch.randint(-128, 129, (rows, cols), generator=gen) / 64).to(dtype)
        scores = torch.rand(rows, cols, generator=gen)
        if pattern:
            mask = keep_nm(scores, pattern)
        elif per_row:
            mask = keep_topk_per_row(scores, sparsity)
        else:
            mask = keep_topk(scores, sparsity)
        updates.append((weight * mask, mask))
    return updates


def ref_l0(updates):
    """Naive per-position loop."""
    rows, cols = updates[0][0].shape
    mean, count = torch.zeros(rows, cols, dtype=torch.float64), torch.zeros(rows, cols)
    for i, j in itertools.product(range(rows), range(cols)):
        kept = [float(w[i, j]) for w, m in updates if m[i, j]]
        count[i, j] = len(kept)
        mean[i, j] = sum(kept) / len(kept) if kept else 0.0
    return mean, count


def ref_keep(weight, count, sparsity, pattern=None, per_row=False):
    """Sort positions by (count, |w|, index) and prune from the front, in the requested scope."""
    rows, cols = weight.shape

    def key(p):  # p = (row, col); tuples sort like flat indices
        return int(count[p]), abs(float(weight[p])), p

    def best_first(p):  # within an N:M group equal keys keep the lower index (as keep_nm)
        return -key(p)[0], -key(p)[1], p

    if pattern:
        starts = itertools.product(range(rows), range(0, cols, pattern.m))
        groups = [[(i, j) for j in range(g, g + pattern.m)] for i, g in starts]
        pruned = [p for group in groups for p in sorted(group, key=best_first)[pattern.n :]]
    elif per_row:
        n_prune = prune_counts_per_row(rows, cols, sparsity).tolist()
        by_row = [sorted(((i, j) for j in range(cols)), key=key) for i in range(rows)]
        pruned = [p for row, n in zip(by_row, n_prune, strict=True) for p in row[:n]]
    else:
        everything = sorted(itertools.product(range(rows), range(cols)), key=key)
        pruned = everything[: prune_count(rows * cols, sparsity)]
    keep = torch.ones(rows, cols, dtype=torch.bool)
    for p in pruned:
        keep[p] = False
    return keep


scenarios = st.fixed_dictionaries(
    {
        "n": st.integers(1, 16),
        "rows": st.integers(1, 6),
        "groups": st.integers(1, 4),
        "scope": st.sampled_from(["global", "row", "2:4", "1:4", "2:8"]),
        "sparsity": st.sampled_from([0.0, 0.1, 0.3, 0.5, 0.7, 0.95]),
        "seed": st.integers(0, 2**16),
    }
)


def unpack(s):
    pattern = Pattern(*map(int, s["scope"].split(":"))) if ":" in s["scope"] else None
    sparsity = pattern.sparsity if pattern else s["sparsity"]
    cols = s["groups"] * (pattern.m if pattern else 3)
    per_row = s["scope"] == "row"
    updates = client_updates(s["n"], s["rows"], cols, sparsity, pattern, per_row, s["seed"])
    return updates, sparsity, pattern, per_row


@settings(max_examples=80, deadline=None)
@given(scenarios)
def test_l0_matches_the_per_position_loop_and_expansion_matches_the_sorted_order(s):
    updates, sparsity, pattern, per_row = unpack(s)
    mean, count, n = l0_aggregate(iter(updates))
    ref_mean, ref_count = ref_l0(updates)
    assert n == len(updates) and mean.dtype == torch.float32
    assert torch.equal(count.double(), ref_count.double())
    assert torch.allclose(mean.double(), ref_mean, rtol=1e-6, atol=0)

    weight, mask = merged("l0", updates, sparsity, pattern, per_row=per_row)
    stored = mean.to(torch.float16)
    assert weight.dtype == torch.float16
    assert torch.equal(mask, ref_keep(stored, count, sparsity, pattern, per_row))
    assert torch.equal(weight, stored * mask)
    assert int((~mask).sum()) == prune_count(mask.numel(), sparsity)
    assert pattern is None or nm_valid(mask, pattern)
    # a position kept by every client never goes while one kept by fewer stays (in its scope)
    for scope_m, scope_c in zip(
        *(_scopes(t, pattern, per_row) for t in (mask, count)), strict=True
    ):
        assert not ((~scope_m & (scope_c == n)).any() and (scope_m & (scope_c < n)).any())


def ref_robust(updates, merge):
    """Per position, over the clients that kept it: the median, or the mean without the
    smallest and largest value when three or more kept it (float64)."""
    rows, cols = updates[0][0].shape
    out = torch.zeros(rows, cols, dtype=torch.float64)
    for i, j in itertools.product(range(rows), range(cols)):
        kept = sorted(float(w[i, j]) for w, m in updates if m[i, j])
        if merge == "l0-median" and kept:
            out[i, j] = statistics.median(kept)
        elif kept:
            inner = kept[1:-1] if len(kept) >= 3 else kept
            out[i, j] = sum(inner) / len(inner)
    return out


@settings(max_examples=60, deadline=None)
@given(scenarios, st.sampled_from(["l0-trimmed", "l0-median"]))
def test_robust_merges_match_the_per_position_reference(s, merge):
    updates, sparsity, pattern, per_row = unpack(s)
    weight, count, n = MERGES[merge].combine([(lambda u=u: u) for u in updates], None)
    assert n == len(updates) and weight.dtype == torch.float16
    assert torch.equal(count.double(), ref_l0(updates)[1].double())
    assert torch.allclose(weight.double(), ref_robust(updates, merge), rtol=2**-10, atol=0)
    merged_weight, mask = merged(merge, updates, sparsity, pattern, per_row=per_row)
    assert int((~mask).sum()) == prune_count(mask.numel(), sparsity)
    assert torch.equal(merged_weight, weight * mask)


def test_robust_merges_ignore_one_wild_client_where_three_kept():
    honest = [(torch.full((2, 4), v), torch.ones(2, 4, dtype=torch.bool)) for v in (1.0, 2.0, 3.0)]
    wild = (torch.full((2, 4), 1e4), torch.ones(2, 4, dtype=torch.bool))
    for merge, want in (("l0-trimmed", 2.5), ("l0-median", 2.5), ("l0", 2501.5)):
        weight, _ = merged(merge, [*honest, wild], 0.0)
        assert torch.equal(weight, torch.full((2, 4), want)), merge


def _scopes(t, pattern, per_row):
    if pattern:
        return list(t.reshape(-1, pattern.m))
    return list(t) if per_row else [t.reshape(-1)]


@settings(max_examples=50, deadline=None)
@given(scenarios, st.sampled_from(sorted(MERGES)), st.randoms(use_true_random=False))
def test_result_does_not_depend_on_client_order(s, method, rnd):
    updates, sparsity, pattern, per_row = unpack(s)
    dense = updates[0][0] + 0.5
    shuffled = rnd.sample(updates, len(updates))
    kw = dict(pattern=pattern, dense=dense, per_row=per_row)
    a = merged(method, updates, sparsity, **kw)
    b = merged(method, shuffled, sparsity, **kw)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@settings(max_examples=50, deadline=None)
@given(scenarios)
def test_one_client_gets_its_own_weights_and_mask_back(s):
    updates, sparsity, pattern, per_row = unpack({**s, "n": 1})
    weight, mask = merged("l0", updates, sparsity, pattern, per_row=per_row)
    assert torch.equal(mask, updates[0][1]) and torch.equal(weight, updates[0][0])


def test_l0_ignores_weights_outside_their_own_mask():
    w = torch.tensor([[2.0, 4.0, 6.0]])
    updates = [
        (w, torch.tensor([[True, False, False]])),
        (w * 3, torch.tensor([[True, True, False]])),
    ]
    mean, count, n = l0_aggregate(updates)
    assert mean.tolist() == [[4.0, 12.0, 0.0]] and count.tolist() == [[2, 1, 0]] and n == 2


def test_counts_widen_past_255_clients():
    updates = [(torch.ones(2, 3, dtype=torch.bfloat16), torch.ones(2, 3, dtype=torch.bool))] * 300
    mean, count, n = l0_aggregate(iter(updates))
    assert n == 300 and int(count.min()) == 300 and torch.equal(mean, torch.ones(2, 3))


def test_expansion_prefers_more_votes_over_magnitude_and_magnitude_over_position():
    weight = torch.tensor([[9.0, 1.0, 1.0, 3.0, 0.5, 2.0]])
    count = torch.tensor([[1, 3, 3, 2, 3, 2]], dtype=torch.uint8)
    _, mask = expand_mask(weight.clone(), count, 3, 1 / 3)  # prune 2 of 6
    assert mask.tolist() == [[False, True, True, True, True, False]]
    # equal count and magnitude: the lower index goes first, across several blocks of 5
    _, mask = expand_mask(torch.ones(3, 7), torch.ones(3, 7, dtype=torch.uint8), 1, 0.5)
    assert mask.view(-1).tolist() == [False] * 10 + [True] * 11


def test_union_sparser_than_target_is_filled_to_the_exact_count():
    weight, mask = expand_mask(
        torch.tensor([[0.0, 5.0, 0.0, 0.0]]), torch.tensor([[0, 1, 0, 0]]), 1, 0.5
    )
    assert mask.tolist() == [[False, True, False, True]] and weight.tolist() == [[0, 5, 0, 0]]


def test_fedavg_is_the_plain_mean_then_magnitude_pruning():
    updates, _, _, _ = unpack(
        {"n": 5, "rows": 4, "groups": 3, "scope": "global", "sparsity": 0.5, "seed": 1}
    )
    mean = (sum(w.float() for w, _ in updates) / 5).half()
    weight, mask = merged("fedavg", updates, 0.5)
    assert torch.equal(mask, keep_topk(mean.abs().float(), 0.5))
    assert torch.equal(weight, mean * mask)


@pytest.mark.parametrize("scaling", [False, True])
def test_mask_vote_keeps_the_most_voted_positions_with_dense_weights(scaling):
    pattern = Pattern(2, 4)
    updates, _, _, _ = unpack(
        {"n": 4, "rows": 3, "groups": 2, "scope": "2:4", "sparsity": 0.5, "seed": 2}
    )
    dense = torch.randn(3, 8, generator=torch.Generator().manual_seed(3)).half()
    votes = sum(m.int() for _, m in updates)
    merge = "mask-vote-scaled" if scaling else "mask-vote"
    weight, mask = merged(merge, updates, 0.5, pattern, dense=dense)
    assert torch.equal(mask, ref_keep(dense, votes, 0.5, pattern)) and nm_valid(mask, pattern)
    scale = votes / 4 if scaling else torch.ones(())
    assert torch.equal(weight, (dense * scale).half() * mask)


def test_bad_calls_are_refused():
    ok = [(torch.ones(2, 4), torch.ones(2, 4, dtype=torch.bool))]
    with pytest.raises(ValueError, match="unknown merge"):
        merged("median", ok, 0.5)
    with pytest.raises(ValueError, match="dense"):
        merged("mask-vote", ok, 0.5)
    with pytest.raises(ValueError, match="no client updates"):
        merged("l0", [], 0.5)
    with pytest.raises(ValueError, match="do not match"):
        merged("l0", ok + [(torch.ones(4, 2), torch.ones(4, 2, dtype=torch.bool))], 0.5)
    with pytest.raises(ValueError, match="bool"):
        merged("l0", [(torch.ones(2, 4), torch.ones(2, 4))], 0.5)
    with pytest.raises(ValueError, match="more than"):
        expand_mask(torch.ones(2, 4), torch.full((2, 4), 3), 2, 0.5)
