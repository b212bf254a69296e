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
class Phase:
    """One pass over every layer: who prunes what (``plan``; ``None``: each layer by the nodes
    whose payload for it was merged in the previous phase), the merge (a key of
    ``pruning.aggregate.MERGES``; ``None``: no merge, each node's layers stand alone), and
    whether nodes ``refine`` the merged masks of their layers (sent down with the job) rather
    than prune them to the target."""

    plan: Plan | None
    merge: str | None
    refine: bool = False

    @property
    def name(self) -> str:
        """The jobs' phase (``pruning.federated.PHASES``)."""
        return "refine" if self.refine else "prune"


@dataclass(frozen=True)
class Method:
    """A federated method: its phases, whether its node calibrates on every partition
    (``union``, the centralized baseline), and the first phase's merge with vote scaling, if it
    has one."""

    phases: tuple[Phase, ...]
    union: bool = False
    scaled_merge: str | None = None

    def merges(self, vote_scaling: bool, aggregator: str = "") -> list[str | None]:
        """Each phase's merge; ``aggregator`` (a robust merge) replaces the l0 mean."""
        first = self.scaled_merge if vote_scaling else self.phases[0].merge
        merges = [first, *(p.merge for p in self.phases[1:])]
        return [aggregator if aggregator and m == "l0" else m for m in merges]


def _one(plan: Plan, merge: str | None, **kw) -> Method:
    return Method((Phase(plan, merge),), **kw)


METHODS: dict[str, Method] = {
    # default: the paper's prune phase (layers sampled by budget), then every client re-solves
    # the kept values of the merged masks on its own data, on inputs that flow through the
    # merged model; the server averages them, so every layer is fitted to every client's data
    "fedspallm": Method((Phase(sampled, "l0"), Phase(everyone, "l0", refine=True))),
    # the same, but each layer is refined only by the clients that pruned it (budgets hold in
    # both phases; cheaper, and worse when a layer's pruners share one domain)
    "fedspallm-sampled": Method((Phase(sampled, "l0"), Phase(None, "l0", refine=True))),
    # the algorithm as the paper describes it: l0 mean + count-then-magnitude expansion
    "fedspallm-paper": _one(sampled, "l0"),
    "fedprllm": _one(everyone, "mask-vote", scaled_merge="mask-vote-scaled"),
    "fedavg": _one(everyone, "fedavg"),
    "local-only": _one(everyone, None),
    "centralized": _one(one_node, "l0", union=True),
}
