"""The table of federated methods: for each, who prunes which layers in a round, and how the
server merges them. Nothing else in the project branches on a method's name.

A plan maps each node's stable sampling key (see :class:`pruning.server.RunState`) to its
layers; layers it leaves uncovered are carried over to the next round.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from .sampling import Assignment, assign_layers

Plan = Callable[[Mapping[str, int], Sequence[int], int, int], Assignment]


def sampled(budgets: Mapping[str, int], layers: Sequence[int], seed: int, rnd: int) -> Assignment:
    """FedSpaLLM: layers sampled per node in proportion to its budget, every layer covered."""
    return assign_layers(budgets, layers, seed, rnd)


def everyone(budgets: Mapping[str, int], layers: Sequence[int], seed: int, rnd: int) -> Assignment:
    """Every node prunes every remaining layer (the baselines, whatever the budgets)."""
    return Assignment({key: list(layers) for key in sorted(budgets)}, [])


def one_node(budgets: Mapping[str, int], layers: Sequence[int], seed: int, rnd: int) -> Assignment:
    """A single node prunes everything (on every partition's data: the centralized baseline)."""
    return Assignment({sorted(budgets)[0]: list(layers)}, [])


@dataclass(frozen=True)
class Method:
    """A federated method: its layer plan, its merge (a key of ``pruning.aggregate.MERGES``;
    ``None``: each node's layers stand alone and are evaluated per node), whether its node
    calibrates on every partition (``union``), and its merge with vote scaling, if it has one."""

    plan: Plan
    merge: str | None
    union: bool = False
    scaled_merge: str | None = None

    def merge_for(self, vote_scaling: bool) -> str | None:
        return self.scaled_merge if vote_scaling else self.merge


METHODS: dict[str, Method] = {
    "fedspallm": Method(sampled, "l0"),
    "fedprllm": Method(everyone, "mask-vote", scaled_merge="mask-vote-scaled"),
    "fedavg": Method(everyone, "fedavg"),
    "local-only": Method(everyone, None),
    "centralized": Method(one_node, "l0", union=True),
}
