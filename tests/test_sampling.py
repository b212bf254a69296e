"""Layer sampling: budgets, coverage, determinism, and the stated probabilities and (un)bias."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pruning.aggregate import l0_aggregate
from pruning.sampling import assign_layers, budget_from_resources

budget_maps = st.dictionaries(st.sampled_from("abcdefghijklmnop"), st.integers(0, 12), max_size=16)


@settings(max_examples=100, deadline=None)
@given(budget_maps, st.integers(0, 24), st.integers(0, 2**31), st.integers(0, 100))
def test_budgets_are_used_and_layers_covered_when_possible(budgets, n_layers, seed, rnd):
    layers = list(range(100, 100 + n_layers))  # not 0..L-1, so ids and positions differ
    result = assign_layers(budgets, layers, seed, rnd)
    caps = {c: min(b, n_layers) for c, b in budgets.items()}
    assert {c: len(ls) for c, ls in result.per_client.items()} == {
        c: k for c, k in caps.items() if k
    }
    for ls in result.per_client.values():
        assert ls == sorted(set(ls)) and set(ls) <= set(layers)
    covered = [layer for ls in result.per_client.values() for layer in ls]
    total = sum(caps.values())
    if total >= n_layers:
        assert set(covered) == set(layers) and result.uncovered == []
    else:  # the first `total` layers once each, the rest carried over in order
        assert sorted(covered) == layers[:total] and result.uncovered == layers[total:]
    assert assign_layers(dict(reversed(list(budgets.items()))), layers, seed, rnd) == result


def test_seed_and_round_make_it_deterministic_and_vary_it():
    budgets, layers = {"a": 3, "b": 2, "c": 5}, list(range(12))
    runs = {str(assign_layers(budgets, layers, s, r)) for s in range(5) for r in range(5)}
    assert assign_layers(budgets, layers, 7, 3) == assign_layers(budgets, layers, 7, 3)
    assert len(runs) == 25


def test_inclusion_probability_is_budget_over_layers():
    budgets, layers, trials = {"a": 1, "b": 2, "c": 4, "d": 6}, list(range(8)), 4000
    hits = torch.zeros(len(budgets), len(layers))
    for t in range(trials):
        for i, client in enumerate(budgets):
            hits[i, assign_layers(budgets, layers, seed=t, round=0).per_client[client]] += 1
    expected = torch.tensor([b / len(layers) for b in budgets.values()])[:, None]
    # binomial standard error is at most 0.008 here; allow about 4 of them
    assert (hits / trials - expected).abs().max() < 0.03
    # clients per layer: B / L in expectation, and on average over layers in every round
    assert torch.allclose(hits.sum(0) / trials, torch.full((8,), 13 / 8), atol=0.06)


def _updates(n_clients, seed):
    gen = torch.Generator().manual_seed(seed)
    weights = torch.randn(n_clients, 3, 4, generator=gen)
    masks = torch.rand(n_clients, 3, 4, generator=gen) < 0.5
    return [(w * m, m) for w, m in zip(weights, masks, strict=True)]


def _sampled_l0_mean(budgets, updates, trials):
    """Layer 0's ℓ0 aggregate averaged over rounds in which some sampled client kept it."""
    clients = list(budgets)
    total, hits = torch.zeros(3, 4), torch.zeros(3, 4)
    for t in range(trials):
        per_client = assign_layers(budgets, range(4), seed=11, round=t).per_client
        chosen = [updates[clients.index(c)] for c, ls in per_client.items() if 0 in ls]
        mean, count, _ = l0_aggregate(chosen)
        total += mean
        hits += count > 0
    return total / hits


def test_l0_aggregate_of_equal_budget_samples_is_unbiased():
    updates = _updates(6, seed=0)
    full, _, _ = l0_aggregate(updates)
    sampled = _sampled_l0_mean(dict.fromkeys("abcdef", 1), updates, trials=3000)
    # one to three clients per layer, values ~N(0, 1): standard error below 0.025 per position
    assert (sampled - full).abs().max() < 0.1


def test_unequal_budgets_lean_toward_the_high_budget_client_as_documented():
    weight, mask = torch.ones(3, 4), torch.ones(3, 4, dtype=torch.bool)
    updates = [(weight, mask)] + [(weight * 0, mask)] * 3  # the full-participation mean is 1/4
    sampled = _sampled_l0_mean({"a": 4, "b": 1, "c": 1, "d": 1}, updates, trials=400)
    # "a" prunes every layer, the others each a given layer with probability 1/4, so "a"'s 1
    # dominates: the expected aggregate is far above the full-participation mean of 1/4
    assert (sampled > 0.5).all()


def test_budget_from_resources():
    assert budget_from_resources(30) == 30
    assert budget_from_resources(30, max_layers=4) == 4
    assert budget_from_resources(30, memory_gb=1.0, layer_bytes=300 * 2**20) == 3
    assert budget_from_resources(2, memory_gb=64.0, layer_bytes=2**20) == 2
    assert budget_from_resources(30, max_layers=2, memory_gb=1.0, layer_bytes=300 * 2**20) == 2
    assert budget_from_resources(30, memory_gb=0.1, layer_bytes=2**30) == 0
    with pytest.raises(ValueError):
        budget_from_resources(30, memory_gb=1.0)
