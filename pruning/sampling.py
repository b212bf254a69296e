"""Resource-proportional layer sampling: which client prunes which decoder layers in a round.

A client with budget ``b_i`` (the most layers it can prune in one round, see
:func:`budget_from_resources`) is given ``min(b_i, L)`` distinct layers out of the ``L`` still to
prune; let ``B`` be the sum of those capped budgets.

* ``B >= L`` (coverage possible): first every layer gets one owner, by pairing the layers with a
  uniformly random set of ``L`` of the ``B`` budget slots (client ``i`` holds ``b_i`` slots);
  then each client fills its remaining slots with layers drawn uniformly from those it does not
  hold yet. Every layer is covered, and since nothing in the procedure tells layers apart,
  ``P(client i prunes layer l) = b_i / L`` for every layer: probability proportional to budget.
  The expected number of clients per layer is ``B / L`` (and its average over layers is exactly
  ``B / L`` in every round).
* ``B < L``: the first ``B`` layers of the given list are each pruned by exactly one client
  (random pairing with the slots); the rest are returned as ``uncovered`` for the caller to put
  first next round, so every layer is pruned within ``ceil(L / B)`` rounds.

Unbiasedness: the procedure is symmetric in the clients apart from their budgets. With equal
budgets the set of clients pruning a layer, given its size, is a uniformly random subset, so the
expected ℓ0 aggregate of a position (given that some sampled client kept it) equals the aggregate
of all clients that would have kept it: sampling adds variance, not bias. With unequal budgets,
client ``i`` contributes to each layer with probability ``b_i / L``, so the expected aggregate
leans toward high-budget clients; weighting by ``L / b_i`` (Horvitz-Thompson) would remove that,
but FedSpaLLM's aggregate is the plain ℓ0 mean, so we do not. tests/test_sampling.py checks both
statements empirically.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Assignment:
    """Layers per client for one round (clients with no work are absent) and the carried-over."""

    per_client: dict[str, list[int]]
    uncovered: list[int]


def budget_from_resources(
    num_layers: int,
    max_layers: int | None = None,
    memory_gb: float | None = None,
    layer_bytes: int | None = None,
) -> int:
    """Layers a client can prune per round: ``num_layers`` capped by each figure it reports.

    ``max_layers`` is an operator's or device's explicit cap; ``memory_gb`` with ``layer_bytes``
    (the memory the client needs per layer it holds at once: weights, Hessians, activations)
    caps it at ``floor(memory_gb * 2**30 / layer_bytes)``. May return 0: such a client cannot
    take part, and is better left out than overloaded.
    """
    budget = num_layers
    if max_layers is not None:
        budget = min(budget, max_layers)
    if memory_gb is not None:
        if not layer_bytes or layer_bytes <= 0:
            raise ValueError("memory_gb needs layer_bytes > 0 to become a layer count")
        budget = min(budget, math.floor(memory_gb * 2**30 / layer_bytes))
    return max(0, budget)


def assign_layers(
    budgets: Mapping[str, int], layers: Sequence[int], seed: int, round: int
) -> Assignment:
    """Sample each client's layers for ``round`` (see the module docstring for the law).

    Deterministic in ``(budgets, layers, seed, round)``; independent of the budgets' dict order.
    """
    layers = list(layers)
    if len(set(layers)) != len(layers):
        raise ValueError(f"duplicate layers in {layers}")
    caps = {c: min(int(budgets[c]), len(layers)) for c in sorted(budgets) if budgets[c] > 0}
    slots = [c for c, cap in caps.items() for _ in range(cap)]
    rng = np.random.default_rng([seed, round])
    covered = layers[: len(slots)]
    held: dict[str, set[int]] = {c: set() for c in caps}
    for layer, slot in zip(covered, rng.permutation(len(slots)), strict=False):
        held[slots[slot]].add(layer)
    for client, cap in caps.items():  # fill the remaining slots (only when all are covered)
        others = [layer for layer in layers if layer not in held[client]]
        picks = rng.choice(len(others), cap - len(held[client]), replace=False)
        held[client].update(others[i] for i in picks)
    return Assignment({c: sorted(h) for c, h in held.items() if h}, layers[len(slots) :])
