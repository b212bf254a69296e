"""The run config, parsed once for the ServerApp and the ClientApp.

Keys and defaults are those of ``[tool.flwr.app.config]`` in ``pyproject.toml`` (a test keeps the
two equal); a value is checked here, before any model is loaded, so a typo fails the run at once
with the key's name. Kebab-case keys map to the snake-case fields below.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .aggregate import ROBUST
from .models import DEFAULT_DTYPE, DTYPES
from .pruners import METHODS as PRUNERS
from .sparsity import Target

SCOPES = ("assigned", "all")


class ConfigError(ValueError):
    """A run-config key that is unknown or whose value cannot be used."""


def _csv(value: Any) -> tuple[str, ...]:
    if isinstance(value, (list, tuple)):
        return tuple(str(v).strip() for v in value if str(v).strip())
    return tuple(v.strip() for v in str(value).split(",") if v.strip())


@dataclass
class PruneSpec:
    """What every pruning job of a run shares: the run config sets it, each job carries it."""

    sparsity: float = 0.5
    pattern: str = ""
    pruner: str = "sparsegpt"
    nsamples: int = 32
    seqlen: int = 512
    seed: int = 0
    # "assigned": prune only the uploaded layers, propagate through the others as they are;
    # "all": prune every layer up to the last uploaded one, so each sees pruned inputs
    scope: str = "assigned"
    true_sequential: bool = False
    # dtype of the kept values on the wire (the pruning math stays in float32): the usual
    # checkpoint dtype, half of float32's bytes; "" sends the model's own dtype
    transport_dtype: str = "bfloat16"
    # refine phase: 2 = each layer runs dense for its statistics, then re-solved for the next
    # layer's inputs (the client's own refined layers feed the ones above); 1 = one pass
    # through the merged model gives both (faster; statistics of the merged layers)
    refine_passes: int = 2
    # sparsegpt: conjugate-gradient steps re-solving the kept weights on the final mask, in
    # both phases (0: the one-shot sweep alone, as the paper's SparseGPT; 10 steps give ~97 %
    # of the converged gain in layer output error for ~15 % more client compute)
    refit: int = 10

    def target(self) -> Target:
        return Target.of(self.sparsity, self.pattern)


@dataclass
class RunConfig(PruneSpec):
    """Every setting of a federated run (see the README's table for their meaning)."""

    method: str = "fedspallm"
    model: str = "smollm2-135m"
    dtype: str = DEFAULT_DTYPE
    num_server_rounds: int = 4
    min_nodes: int = 4
    vote_scaling: bool = False
    calib_sources: tuple[str, ...] = ("wikitext2", "ptb")
    sim_max_layers: tuple[int, ...] = (24, 16, 12, 8)
    max_layers: int = 0
    data_dir: str = ""
    eval_data: tuple[str, ...] = ("wikitext2", "ptb")
    eval_max_windows: int = 32
    eval_dense: bool = True
    out_dir: str = "runs"
    round_timeout: float = 3600.0
    node_wait_timeout: float = 600.0
    max_payload_mb: float = 0.0
    # a larger payload stays on its node and is fetched in parts of this size (0: never)
    max_message_mb: float = 256.0
    text_field: str = "text"
    # "": each phase's own merge; "l0-trimmed" / "l0-median" replace the l0 mean
    aggregator: str = ""
    screen: bool = True  # drop payloads whose deviation from the server's weights stands out
    screen_mad: float = 6.0  # k of the pooled test: median + k * 1.4826 * MAD
    screen_max_deviation: float = 1.25  # absolute bound on a tensor's relative deviation
    resume: str = ""  # run directory of an interrupted run to continue ("": a new run)
    # decoder weights (name patterns) that no rule prunes and the run may leave dense; any
    # other such weight stops the run (pruning.models.check_layout)
    keep_dense: tuple[str, ...] = ()
    # torch threads of a client job (0: the process's own count). Float sums, and so the last
    # bits of every pruned weight, depend on it: the same count on every run keeps runs equal
    threads: int = 0

    @classmethod
    def parse(cls, values: Mapping[str, Any]) -> RunConfig:
        """A checked config from a Flower run config (kebab-case keys, scalar values)."""
        names = {f.name.replace("_", "-"): f for f in fields(cls)}
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise ConfigError(f"unknown run-config key(s) {', '.join(unknown)}")
        kwargs = {}
        for key, value in values.items():
            field = names[key]
            kind = type(getattr(cls, field.name))
            try:
                if kind is tuple:
                    items = _csv(value)
                    kwargs[field.name] = (
                        tuple(int(v) for v in items) if key.startswith("sim-") else items
                    )
                elif kind is bool:
                    if not isinstance(value, bool):
                        raise TypeError(f"{value!r} is not true/false")
                    kwargs[field.name] = value
                else:
                    kwargs[field.name] = kind(value)
            except (TypeError, ValueError) as err:
                raise ConfigError(f"run-config key {key!r}: {err}") from None
        return cls(**kwargs).checked()

    def checked(self) -> RunConfig:
        from .methods import METHODS  # the method table imports this module

        choices = {
            "method": (self.method, METHODS),
            "pruner": (self.pruner, PRUNERS),
            "scope": (self.scope, SCOPES),
            "dtype": (self.dtype, DTYPES),
            "transport-dtype": (self.transport_dtype or self.dtype, DTYPES),
            "aggregator": (self.aggregator, ("", *ROBUST)),
        }
        for key, (value, allowed) in choices.items():
            if value not in allowed:
                raise ConfigError(f"{key} {value!r} is not one of {', '.join(allowed)}")
        try:
            self.target()
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if self.vote_scaling and METHODS[self.method].scaled_merge is None:
            raise ConfigError("vote-scaling applies to the mask-vote merge (fedprllm) only")
        if self.aggregator and "l0" not in METHODS[self.method].merges(False):
            raise ConfigError(f"aggregator replaces the l0 merge, which {self.method} does not use")
        if self.refine_passes not in (1, 2):
            raise ConfigError(f"refine-passes {self.refine_passes} is not 1 or 2")
        if self.screen_mad <= 0 or self.screen_max_deviation <= 0:
            raise ConfigError("screen-mad and screen-max-deviation must be positive")
        if self.refit < 0:
            raise ConfigError(f"refit {self.refit} is negative (0: no refit)")
        if self.threads < 0:
            raise ConfigError(f"threads {self.threads} is negative (0: the process's own count)")
        return self

    def values(self) -> dict[str, Any]:
        """The kebab-case run config that :meth:`parse` reads back (report, ``state.json``)."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    @property
    def data_root(self) -> Path | None:
        """The folder relative data paths are read from (``None``: ``$FEDSPALLM_DATA``)."""
        return Path(self.data_dir).expanduser() if self.data_dir else None

    def sim_budget(self, partition_id: int | None) -> int:
        """Layers per round of a simulated node: its ``sim-max-layers`` entry, else the default."""
        if self.sim_max_layers and partition_id is not None:
            return self.sim_max_layers[partition_id % len(self.sim_max_layers)]
        return self.max_layers
