"""FedSpaLLMStrategy: a Flower Message-API strategy that prunes an LLM layer-wise across nodes.

Per round: the strategy samples layers per node in proportion to each node's budget (reported
in a first query round), sends each node only its job config — plus, from round 2 on, the
already-aggregated layers below its assignment so that it prunes on top of the global state —
then validates every payload, aggregates each layer over the nodes that pruned it and writes it
into the global model. Layers of nodes that failed, timed out or sent a bad payload are
re-assigned in the next round, until every decoder layer is pruned or the rounds run out.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from pruning.federated import GlobalModel, Job, JobSpec
from pruning.payload import Decoded, PayloadError
from pruning.sampling import assign_layers, budget_from_resources

log = logging.getLogger(__name__)

# method preset -> aggregator (None: no aggregation, each client's model is evaluated alone)
PRESETS = {
    "fedspallm": "l0",
    "fedprllm": "mask-vote",
    "fedavg": "fedavg",
    "local-only": None,
    "centralized": "l0",
}


@dataclass
class Settings(JobSpec):
    """Run-config values the server acts on (keys as in ``[tool.flwr.app.config]``)."""

    method: str = "fedspallm"
    num_server_rounds: int = 3
    min_nodes: int = 2
    round_timeout: float = 3600.0
    node_wait_timeout: float = 600.0
    max_payload_mb: float = 0.0  # 0: twice the dense bytes of the assigned layers

    @classmethod
    def from_run_config(cls, config: dict) -> Settings:
        known = {k.replace("_", "-"): k for k in cls.__dataclass_fields__}
        values = {known[k]: v for k, v in config.items() if k in known}
        settings = cls(**values)
        if settings.method not in PRESETS:
            raise ValueError(f"method {settings.method!r} is not one of {', '.join(PRESETS)}")
        return settings


@dataclass
class RoundLog:
    round: int
    assignment: dict[int, list[int]]
    uncovered: list[int]
    replies: dict[int, dict] = field(default_factory=dict)
    aggregated: list[int] = field(default_factory=list)
    seconds: float = 0.0


class FedSpaLLMStrategy(Strategy):
    """Layer-sampled federated pruning with ℓ0-norm aggregation (or a baseline preset)."""

    def __init__(self, model: GlobalModel, settings: Settings) -> None:
        self.model, self.settings = model, settings
        self.budgets: dict[int, int] = {}  # nodes still taking work -> layers per round
        self.reported_budgets: dict[int, int] = {}
        self.resources: dict[int, dict] = {}
        self.remaining: list[int] = list(range(model.num_layers))
        self.rounds: list[RoundLog] = []
        self.local: dict[int, Decoded] = {}  # local-only preset: every node's own layers
        self._jobs: dict[int, Job] = {}
        self._sent: list[Message] = []

    # -- orchestration -------------------------------------------------------------------------

    def run(self, grid: Grid) -> None:
        """Query resources, then prune round by round until every layer is covered."""
        self.query_resources(grid)
        for rnd in range(1, self.settings.num_server_rounds + 1):
            if not self.remaining:
                break
            if not self.budgets:
                raise RuntimeError("no node is left to prune the remaining layers")
            start = time.perf_counter()
            messages = list(self.configure_train(rnd, ArrayRecord(), ConfigRecord(), grid))
            replies = grid.send_and_receive(messages, timeout=self.settings.round_timeout)
            self.aggregate_train(rnd, replies)
            self.rounds[-1].seconds = time.perf_counter() - start
        if self.remaining:
            log.warning("rounds exhausted with layers %s still unpruned", self.remaining)

    def wait_for_nodes(self, grid: Grid) -> list[int]:
        """Block until ``min_nodes`` nodes are registered (sampling earlier sees too few)."""
        deadline = time.monotonic() + self.settings.node_wait_timeout
        while len(nodes := sorted(grid.get_node_ids())) < self.settings.min_nodes:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"only {len(nodes)} of {self.settings.min_nodes} nodes connected after "
                    f"{self.settings.node_wait_timeout:.0f}s"
                )
            log.info("waiting for nodes: %d of %d connected", len(nodes), self.settings.min_nodes)
            time.sleep(1.0)
        return nodes

    def query_resources(self, grid: Grid) -> None:
        """Ask every node for its resources and turn them into per-round layer budgets."""
        nodes = self.wait_for_nodes(grid)
        content = RecordDict({"config": ConfigRecord({"num-layers": self.model.num_layers})})
        messages = [
            _message(content, MessageType.QUERY, node, "resources", self._ttl()) for node in nodes
        ]
        layer_bytes = self.model.layer_bytes()
        for reply in grid.send_and_receive(messages, timeout=self.settings.round_timeout):
            node = _sender(reply, messages)
            if reply.has_error():
                log.warning("node %d did not report resources: %s", node, reply.error.reason)
                continue
            res = dict(reply.content.metric_records.get("resources", MetricRecord()))
            self.resources[node] = res
            self.budgets[node] = budget_from_resources(
                self.model.num_layers,
                int(res["max-layers"]) if res.get("max-layers", 0) > 0 else None,
                float(res["memory-gb"]) if res.get("memory-gb", 0) > 0 else None,
                layer_bytes,
            )
        self.reported_budgets = dict(self.budgets)
        self.budgets = {n: b for n, b in self.budgets.items() if b > 0}
        log.info("node budgets (layers per round): %s", self.budgets)

    # -- Strategy interface --------------------------------------------------------------------

    def _ttl(self) -> float:
        return self.settings.round_timeout

    def _assign(self, rnd: int) -> tuple[dict[int, list[int]], list[int]]:
        nodes = sorted(self.budgets)
        if self.settings.method == "fedspallm":
            keys = self._sampling_keys()
            budgets = {keys[n]: self.budgets[n] for n in nodes}
            plan = assign_layers(budgets, self.remaining, self.settings.seed, rnd)
            node_of = {key: n for n, key in keys.items()}
            return {node_of[k]: layers for k, layers in plan.per_client.items()}, plan.uncovered
        if self.settings.method == "centralized":
            return {nodes[0]: list(self.remaining)}, []
        return {n: list(self.remaining) for n in nodes}, []

    def _sampling_keys(self) -> dict[int, str]:
        """A stable name per node for the layer sampler, so the same config gives the same masks.

        Simulation draws random node ids on every run, but each node there reports a distinct
        partition id, which names it; elsewhere (deployment) the node id does.
        """
        pids = {n: int(self.resources.get(n, {}).get("partition-id", -1)) for n in self.budgets}
        if min(pids.values(), default=-1) >= 0 and len(set(pids.values())) == len(pids):
            return {n: str(p) for n, p in pids.items()}
        return {n: str(n) for n in self.budgets}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One message per node with work: its job config and the global layers it needs."""
        assignment, uncovered = self._assign(server_round)
        log.info("round %d: assignment %s, carried over %s", server_round, assignment, uncovered)
        self.rounds.append(RoundLog(server_round, assignment, uncovered))
        messages = []
        for node, layers in assignment.items():
            job = self.settings.job(server_round, layers, self.settings.method == "centralized")
            self._jobs[node] = job
            records = {"config": ConfigRecord(job.to_config())}
            below = [i for i in self.model.done if i < max(layers)]
            down = 0
            if below:
                blob = self.model.downlink(below, server_round)
                records["global"] = ArrayRecord({"payload": _bytes_array(blob)})
                down = len(blob)
            self.rounds[-1].replies[node] = {
                "ok": False,
                "bytes_down": down,
                "bytes_up": 0,
                "reason": "no reply",
            }
            messages.append(
                _message(
                    RecordDict(records), MessageType.TRAIN, node, str(server_round), self._ttl()
                )
            )
        self._sent = messages
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate payloads, aggregate each layer over its valid clients, re-queue the rest."""
        current = self.rounds[-1]
        valid: dict[int, Decoded] = {}
        for reply in replies:
            node = _sender(reply, self._sent)
            entry = current.replies.setdefault(node, {"bytes_down": 0})
            if node not in current.assignment:
                log.warning("ignoring a reply from node %d, which had no job", node)
                continue
            if reply.has_error():
                entry.update(ok=False, reason=f"error reply: {reply.error.reason}")
                log.warning("node %d failed: %s", node, reply.error.reason)
                continue
            try:
                blob = reply.content.array_records["payload"]["payload"].data
                entry["bytes_up"] = len(blob)
                valid[node] = self.model.decode(
                    blob, current.assignment[node], self._max_bytes(node)
                )
            except PayloadError as err:
                entry.update(ok=False, reason=str(err))
                log.warning("node %d sent a bad payload, dropped: %s", node, err)
                continue
            except KeyError:
                entry.update(ok=False, reason="reply carries no payload")
                continue
            metrics = dict(reply.content.metric_records.get("metrics", MetricRecord()))
            entry.update(ok=True, reason="", metrics=metrics)
        failed = [n for n in current.assignment if n not in valid]
        for node in failed:  # a node that failed once gets no further work this run
            self.budgets.pop(node, None)
        if self.settings.method == "local-only":
            self.local.update(valid)
            covered = set(self.remaining) if valid else set()
        else:
            covered = set()
            for layer in sorted({i for n in valid for i in current.assignment[n]}):
                self.model.aggregate(
                    layer, [valid[n] for n in valid if layer in current.assignment[n]]
                )
                covered.add(layer)
        current.aggregated = sorted(covered)
        self.remaining = [i for i in self.remaining if i not in covered]
        log.info(
            "round %d: aggregated %d layers, %d remaining, failed nodes %s",
            server_round,
            len(covered),
            len(self.remaining),
            failed,
        )
        return None, MetricRecord(
            {"aggregated-layers": len(covered), "remaining-layers": len(self.remaining)}
        )

    def _max_bytes(self, node: int) -> int:
        """Payload cap: the configured one, or twice the dense bytes of the node's layers."""
        if self.settings.max_payload_mb > 0:
            return int(self.settings.max_payload_mb * 2**20)
        return 2 * self.model.dense_bytes(self._jobs[node].layers) + 65536

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return []  # evaluation is centralised on held-out text at the end of the run

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        log.info(
            "FedSpaLLMStrategy(method=%s, aggregator=%s, sparsity=%s, pattern=%r)",
            self.settings.method,
            self.model.aggregator,
            self.settings.sparsity,
            self.settings.pattern,
        )


def _sender(reply: Message, sent: list[Message]) -> int:
    """The node a reply answers for. Error replies made by the SuperLink for a vanished node
    carry the SuperLink's id as source, so match on the id of the message they answer."""
    for msg in sent:
        if (
            msg.metadata.message_id
            and msg.metadata.message_id == reply.metadata.reply_to_message_id
        ):
            return msg.metadata.dst_node_id
    return reply.metadata.src_node_id


def _message(content: RecordDict, kind: str, node: int, group: str, ttl: float) -> Message:
    return Message(content, dst_node_id=node, message_type=kind, group_id=group, ttl=ttl)


def _bytes_array(blob: bytes) -> Array:
    """Raw safetensors bytes as a Flower Array (no numpy round trip, no pickling)."""
    return Array(dtype="uint8", shape=(len(blob),), stype="safetensors", data=blob)
