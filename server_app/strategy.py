"""FedSpaLLMStrategy: the Flower side of a federated pruning run.

It waits for the nodes, asks each for its resources, then, round by round, turns the tasks that
:class:`pruning.server.FederatedRun` plans into Messages and hands each reply to it as soon as
it arrives (one message pulled at a time, so replies never pile up in memory). Everything else
(plans, checks, the payload store, merges, state) lives in ``pruning/server.py``.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Iterable, Iterator
from functools import partial

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from pruning.parts import Manifest, Parts
from pruning.payload import PayloadError
from pruning.server import FederatedRun, Task
from server_app import protocol

log = logging.getLogger(__name__)


class FedSpaLLMStrategy(Strategy):
    """Layer-sampled federated pruning (or a baseline preset) over a :class:`FederatedRun`."""

    def __init__(self, run: FederatedRun) -> None:
        self.fed, self.cfg = run, run.cfg
        self._sent: dict[str, int] = {}  # message id -> node, for the open round
        self._grid: Grid | None = None  # where parts of large payloads are fetched from

    def run(self, grid: Grid) -> None:
        """Query resources (and continue a resumed run with the nodes that answered), then
        prune round by round until every layer is covered."""
        self._grid = grid
        self.query_resources(grid)
        self.fed.restore()
        while tasks := self.fed.start_round():
            for node, reply in self._stream(grid, self._messages(tasks)):
                self.fed.receive(node, *self._payload(node, reply))
            self.fed.close_round()

    def _payload(self, node: int, reply: Message) -> tuple[bytes | Parts | None, str | None, dict]:
        """What a train reply carries, for :meth:`FederatedRun.receive`: the payload, or the
        parts to fetch it by (one message per part, each pulled before the next is sent)."""
        blob, error, metrics = protocol.read_payload(reply)
        if isinstance(blob, Manifest):
            return Parts(blob, partial(self._fetch, node, blob)), error, metrics
        return blob, error, metrics

    def _fetch(self, node: int, manifest: Manifest, index: int) -> bytes:
        if self._grid is None:
            raise PayloadError("parts", "no grid to fetch parts from")
        # the previous part came in a message that only the cycle collector frees, and it
        # runs by object counts, not bytes: without this, parts piled up until a payload ended
        gc.collect()
        ttl = self.cfg.round_timeout
        (msg_id,) = self._grid.push_messages([protocol.fetch_message(node, manifest, index, ttl)])
        deadline = time.monotonic() + ttl
        while time.monotonic() < deadline:
            for reply in self._grid.pull_messages([msg_id]):
                try:
                    return protocol.read_part(reply)
                except ValueError as err:
                    raise PayloadError("parts", f"part {index}: {err}") from None
            time.sleep(0.1)
        raise PayloadError("parts", f"part {index} did not come within {ttl:.0f}s")

    def wait_for_nodes(self, grid: Grid) -> list[int]:
        """Block until ``min-nodes`` nodes are registered (sampling earlier sees too few)."""
        deadline = time.monotonic() + self.cfg.node_wait_timeout
        while len(nodes := sorted(grid.get_node_ids())) < self.cfg.min_nodes:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"only {len(nodes)} of {self.cfg.min_nodes} nodes connected after "
                    f"{self.cfg.node_wait_timeout:.0f}s"
                )
            log.info("waiting for nodes: %d of %d connected", len(nodes), self.cfg.min_nodes)
            time.sleep(1.0)
        return nodes

    def query_resources(self, grid: Grid) -> None:
        """Ask every node for its resources; the run turns them into per-round layer budgets."""
        num_layers, ttl = self.fed.model.num_layers, self.cfg.round_timeout
        messages = [protocol.query_message(n, num_layers, ttl) for n in self.wait_for_nodes(grid)]
        for node, reply in self._stream(grid, messages):
            if reply.has_error():
                log.warning("node %d did not report resources: %s", node, reply.error.reason)
            else:
                self.fed.add_node(node, protocol.read_resources(reply))
        budgets = []
        for node, budget in sorted(self.fed.state.budgets.items()):
            pid = self.fed.state.resources[node].get("partition-id", -1)
            budgets.append(
                f"client {pid} (node {node}): {budget}" if pid >= 0 else f"node {node}: {budget}"
            )
        log.info("layers per round: %s", ", ".join(budgets))

    def _stream(self, grid: Grid, messages: Iterable[Message]) -> Iterator[tuple[int, Message]]:
        """Push the messages one by one as they are built, then yield ``(node, reply)`` as
        replies arrive, pulling one message at a time, until all answered or ``round-timeout``
        passed: the server never holds more than one outgoing or incoming payload. Matching by
        the id of the message answered also names the node when the SuperLink replies for a
        vanished one."""
        self._sent = {}
        for msg in messages:
            (msg_id,) = grid.push_messages([msg])
            self._sent[msg_id] = msg.metadata.dst_node_id
        pending = dict(self._sent)
        deadline = time.monotonic() + self.cfg.round_timeout
        while pending and time.monotonic() < deadline:
            arrived = False
            for msg_id in list(pending):
                for reply in grid.pull_messages([msg_id]):
                    arrived = True
                    yield pending.pop(msg_id), reply
            if not arrived:
                time.sleep(0.5)

    # -- Strategy interface --------------------------------------------------------------------

    def _messages(self, tasks: list[Task]) -> Iterator[Message]:
        for t in tasks:
            yield protocol.job_message(t.node, t.job, t.downlink(), self.cfg.round_timeout)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One message per node with work: its job and the aggregated layers it builds on."""
        self._grid = grid
        return self._messages(self.fed.start_round() or [])

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check and store each reply, then merge the round (the batch form of :meth:`run`)."""
        for reply in replies:
            node = self._sent.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            self.fed.receive(node, *self._payload(node, reply))
        self.fed.close_round()
        state = self.fed.state
        return None, MetricRecord(
            {
                "aggregated-layers": len(state.rounds[-1].aggregated),
                "remaining-layers": len(state.remaining),
            }
        )

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return []  # evaluation is centralised on held-out text at the end of the run

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        cfg = self.cfg
        log.info(
            "FedSpaLLMStrategy(method=%s, merge=%s, sparsity=%s, pattern=%r)",
            cfg.method,
            self.fed.merge,
            cfg.sparsity,
            cfg.pattern,
        )
