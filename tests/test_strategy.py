"""FedSpaLLMStrategy against a fake Grid whose nodes run real ClientWorkers in-process."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
import torch
from flwr.app import Error, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from pruning.federated import ClientData, ClientWorker, GlobalModel, Job
from pruning.models import prunable_shapes
from server_app.strategy import FedSpaLLMStrategy, Settings

Behaviour = Callable[[Message], Message | None]  # None: the node never answers (dropout)


class FakeGrid(Grid):
    """Delivers each message to an in-process node and returns the replies it produced."""

    def __init__(self, nodes: dict[int, Behaviour]) -> None:
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
        self.nodes = nodes
        self.sent: list[Message] = []

    def set_run(self, run) -> None:
        raise NotImplementedError

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        raise NotImplementedError  # deprecated in flwr; the strategy builds Messages itself

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # as the real grids do
            self.sent.append(msg)
            reply = self.nodes[msg.metadata.dst_node_id](msg)
            if reply is not None:
                replies.append(reply)
        return replies


def honest_node(
    worker: ClientWorker, data: ClientData, budget: int, partition_id: int = -1
) -> Behaviour:
    """A node that answers the query with its budget and prunes what it is told."""
    from flwr.app import Array, ArrayRecord

    def behave(msg: Message) -> Message:
        if msg.metadata.message_type == MessageType.QUERY:
            resources = MetricRecord({"max-layers": budget, "partition-id": partition_id})
            return Message(RecordDict({"resources": resources}), reply_to=msg)
        job = Job.from_config(dict(msg.content.config_records["config"]))
        down = msg.content.array_records.get("global")
        blob, metrics = worker.run(job, data, down["payload"].data if down else None)
        array = Array(dtype="uint8", shape=(len(blob),), stype="safetensors", data=blob)
        return Message(
            RecordDict(
                {"payload": ArrayRecord({"payload": array}), "metrics": MetricRecord(metrics)}
            ),
            reply_to=msg,
        )

    return behave


def failing_after_query(node: Behaviour, failure: str) -> Behaviour:
    """Answers the resource query, then fails its training job in the given way."""
    from flwr.app import Array, ArrayRecord

    def behave(msg: Message) -> Message | None:
        if msg.metadata.message_type == MessageType.QUERY:
            return node(msg)
        if failure == "dropout":
            return None
        if failure == "error":
            return Message(Error(code=1, reason="CUDA out of memory"), reply_to=msg)
        if failure == "vanished":  # the SuperLink answers for a node that went away
            reply = Message(Error(code=2, reason="node unavailable"), reply_to=msg)
            reply.metadata.__dict__["_src_node_id"] = 1
            return reply
        garbage = b"\x00" * 64  # not safetensors
        return Message(
            RecordDict(
                {
                    "payload": ArrayRecord(
                        {
                            "payload": Array(
                                dtype="uint8", shape=(64,), stype="safetensors", data=garbage
                            )
                        }
                    )
                }
            ),
            reply_to=msg,
        )

    return behave


@pytest.fixture(scope="module")
def setup(tiny_llama_dir: Path, tmp_path_factory) -> dict:
    text = tmp_path_factory.mktemp("data") / "private.txt"
    rows = [f"row {i} of a private corpus about topic {i % 7} and more words" for i in range(400)]
    text.write_text("\n".join(rows))
    worker = ClientWorker(str(tiny_llama_dir))
    return {"model": str(tiny_llama_dir), "worker": worker, "data": ClientData(path=str(text))}


def run_strategy(setup: dict, nodes: dict[int, Behaviour], **overrides) -> FedSpaLLMStrategy:
    settings = Settings(
        min_nodes=len(nodes), nsamples=4, seqlen=32, num_server_rounds=4, **overrides
    )
    model = GlobalModel(setup["model"], settings.sparsity, settings.pattern)
    strategy = FedSpaLLMStrategy(model, settings)
    strategy.run(FakeGrid(nodes))
    return strategy


def test_assignment_follows_budgets_and_covers_every_layer(setup: dict) -> None:
    w, d = setup["worker"], setup["data"]
    nodes = {11: honest_node(w, d, 1), 22: honest_node(w, d, 2), 33: honest_node(w, d, 3)}
    strategy = run_strategy(setup, nodes)
    first = strategy.rounds[0]
    assert strategy.budgets == {11: 1, 22: 2, 33: 3}
    assert {n: len(v) for n, v in first.assignment.items()} == {11: 1, 22: 2, 33: 3}
    assert set().union(*first.assignment.values()) == {0, 1, 2, 3}
    assert not strategy.remaining and len(strategy.rounds) == 1
    for layer in strategy.model.layer_shapes.values():  # exact 50% in every aggregated tensor
        for key, (rows, cols) in layer.items():
            weight = dict(strategy.model.model.named_parameters())[key]
            assert abs(int((weight == 0).sum()) - rows * cols // 2) <= 1


def test_simulated_nodes_are_sampled_by_partition_not_by_random_node_id(setup: dict) -> None:
    """Simulation draws new node ids every run; the same config must still give the same masks."""
    w, d = setup["worker"], setup["data"]
    runs = []
    for ids in ([11, 22, 33], [903, 17, 455]):  # node ids in partition order 0, 1, 2
        budgets = dict(zip(ids, [1, 2, 2], strict=True))
        nodes = {n: honest_node(w, d, budgets[n], partition_id=ids.index(n)) for n in ids}
        strategy = run_strategy(setup, nodes)
        by_partition = {ids.index(n): v for n, v in strategy.rounds[0].assignment.items()}
        runs.append((by_partition, dict(strategy.model.model.named_parameters())))
    (first, weights), (second, weights_again) = runs
    assert first == second
    assert all(torch.equal(weights[k], weights_again[k]) for k in weights)


@pytest.mark.parametrize("failure", ["dropout", "error", "vanished", "garbage"])
def test_failed_node_layers_are_reassigned(setup: dict, failure: str) -> None:
    w, d = setup["worker"], setup["data"]
    nodes = {
        1: honest_node(w, d, 2),
        2: honest_node(w, d, 2),
        3: failing_after_query(honest_node(w, d, 2), failure),
    }
    strategy = run_strategy(setup, nodes)
    first, second = strategy.rounds[0], strategy.rounds[1]
    assert not first.replies[3]["ok"] and first.replies[3]["reason"]
    assert set(first.replies) == {1, 2, 3}  # no reply is booked on a node that had no job
    lost = set(first.assignment[3]) - set(first.aggregated)
    assert lost, "node 3 held layers nobody else pruned in round 1"
    assert 3 not in second.assignment
    assert set().union(*second.assignment.values()) >= lost
    assert not strategy.remaining
    if failure == "garbage":
        assert (
            "not-safetensors" in first.replies[3]["reason"]
            or "truncated" in first.replies[3]["reason"]
        )


def test_later_rounds_receive_the_global_layers_below_their_assignment(setup: dict) -> None:
    w, d = setup["worker"], setup["data"]
    nodes = {1: honest_node(w, d, 2), 2: failing_after_query(honest_node(w, d, 2), "error")}
    strategy = run_strategy(setup, nodes)
    second = strategy.rounds[1]
    ((node, layers),) = second.assignment.items()
    below = [i for i in strategy.rounds[0].aggregated if i < max(layers)]
    assert bool(second.replies[node]["bytes_down"]) == bool(below)
    assert not strategy.remaining


def test_same_seed_same_masks(setup: dict) -> None:
    w, d = setup["worker"], setup["data"]

    def masks() -> dict[str, torch.Tensor]:
        nodes = {1: honest_node(w, d, 3), 2: honest_node(w, d, 3)}
        model = run_strategy(setup, nodes).model.model
        keys = [k for layer in prunable_shapes(model).values() for k in layer]
        params = dict(model.named_parameters())
        return {k: params[k] != 0 for k in keys}

    first, second = masks(), masks()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_unknown_method_is_refused() -> None:
    with pytest.raises(ValueError, match="method 'fedfoo'"):
        Settings.from_run_config({"method": "fedfoo"})
