"""FedSpaLLMStrategy over FederatedRun against a fake Grid whose nodes run real ClientWorkers
in-process; every preset's output is checked bit for bit against a reference the test composes
from the engine (client jobs, codec, merge) without the server machinery."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from flwr.app import Message, MessageType
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity
from helpers import reference_output, reference_plan, reference_run

from pruning.attacks import ATTACKS, poison
from pruning.checkpoint import STOP_AFTER_ROUND, Checkpoint, ResumeError, Stopped
from pruning.config import ConfigError, RunConfig
from pruning.federated import ClientData, ClientWorker, GlobalModel, Job
from pruning.parts import PartStore
from pruning.payload import decode_payload
from pruning.server import FederatedRun, RunState
from server_app import protocol
from server_app.strategy import FedSpaLLMStrategy

Behaviour = Callable[[Message], Message | None]  # None: the node never answers (dropout)
SOURCES = ("wikitext2/wiki.valid.tokens", "ptb/ptb.valid.txt")


class FakeGrid(Grid):
    """Delivers each pushed message to an in-process node and keeps its reply until pulled."""

    def __init__(self, nodes: dict[int, Behaviour]) -> None:
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
        self.nodes = nodes
        self.replies: dict[str, Message] = {}
        self.pulls = 0

    def set_run(self, run) -> None:
        raise NotImplementedError

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        raise NotImplementedError  # deprecated in flwr; the strategy builds Messages itself

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # as the real grids do
            ids.append(msg.metadata.message_id)
            reply = self.nodes[msg.metadata.dst_node_id](msg)
            if reply is not None:
                self.replies[msg.metadata.message_id] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        ids = list(message_ids)
        self.pulls += 1
        assert len(ids) == 1, "the strategy pulls one message at a time"
        return [self.replies.pop(i) for i in ids if i in self.replies]

    def send_and_receive(self, messages, *, timeout=None):
        raise NotImplementedError  # replies are streamed with push/pull


def honest_node(
    worker: ClientWorker,
    data: ClientData,
    budget: int,
    partition_id: int = -1,
    tamper: Callable[[Job, bytes, bytes | None], bytes] | None = None,
) -> Behaviour:
    """A node that answers the query with its budget and prunes what it is told (and, given
    ``tamper``, sends ``tamper(job, payload, downlink)`` instead: a poisoning client)."""

    def behave(msg: Message) -> Message:
        if msg.metadata.message_type == MessageType.QUERY:
            return protocol.resources_reply(
                msg, {"max-layers": budget, "partition-id": partition_id}
            )
        job, down = protocol.read_job(msg)
        blob, metrics = worker.run(job, data, down)
        return protocol.payload_reply(msg, tamper(job, blob, down) if tamper else blob, metrics)

    return behave


def failing_after_query(node: Behaviour, failure: str, worker=None, data=None) -> Behaviour:
    """Answers the resource query, then fails its training job in the given way."""

    def behave(msg: Message) -> Message | None:
        if msg.metadata.message_type == MessageType.QUERY:
            return node(msg)
        if failure in ("replay", "misdirected"):  # a well-formed payload for another job
            job, down = protocol.read_job(msg)
            if failure == "replay":
                job.round -= 1
            else:
                job.sparsity, job.pattern = 0.75, "1:4"
            return protocol.payload_reply(msg, *worker.run(job, data, down))
        if failure == "dropout":
            return None
        if failure == "error":
            return protocol.error_reply(msg, "CUDA out of memory")
        if failure == "vanished":  # the SuperLink answers for a node that went away
            reply = protocol.error_reply(msg, "node unavailable")
            reply.metadata.__dict__["_src_node_id"] = 1
            return reply
        return protocol.payload_reply(msg, b"\x00" * 64, {})  # not safetensors

    return behave


@pytest.fixture(scope="module")
def setup(tiny_llama_dir: Path, data_dir: Path, tmp_path_factory) -> dict:
    text = tmp_path_factory.mktemp("data") / "private.txt"
    rows = [f"row {i} of a private corpus about topic {i % 7} and more words" for i in range(400)]
    text.write_text("\n".join(rows))
    worker = ClientWorker(str(tiny_llama_dir))
    return {
        "model": str(tiny_llama_dir),
        "worker": worker,
        "data": ClientData(path=str(text)),
        "root": data_dir,
        "out": tmp_path_factory.mktemp("runs"),
    }


def config(setup: dict, nodes: int, **overrides) -> RunConfig:
    # one phase by default, so the round mechanics are seen alone; presets are tested below
    values = {"model": setup["model"], "min_nodes": nodes, "nsamples": 4, "seqlen": 32}
    values |= {"method": "fedspallm-paper"}
    values |= {"num_server_rounds": 4, "round_timeout": 0.5, "data_dir": str(setup["root"])}
    return RunConfig(**(values | overrides)).checked()


def run_strategy(setup: dict, nodes: dict[int, Behaviour], **overrides) -> FederatedRun:
    cfg = config(setup, len(nodes), **overrides)
    out = setup["out"] / uuid.uuid4().hex
    run = FederatedRun(cfg, GlobalModel(cfg.model, cfg.dtype), out)
    FedSpaLLMStrategy(run).run(FakeGrid(nodes))
    return run


def partition_data(setup: dict, pid: int, partitions: int) -> ClientData:
    """Simulated non-IID partitions, as in the default run."""
    return ClientData(
        sources=list(SOURCES), partition_id=pid, num_partitions=partitions, root=setup["root"]
    )


def pruned_weights(run: FederatedRun) -> dict[str, torch.Tensor]:
    return {k: run.model.params[k].detach().clone() for k in run.model.shapes}


def test_assignment_follows_budgets_and_covers_every_layer(setup: dict) -> None:
    w, d = setup["worker"], setup["data"]
    nodes = {11: honest_node(w, d, 1), 22: honest_node(w, d, 2), 33: honest_node(w, d, 3)}
    run = run_strategy(setup, nodes)
    first = run.state.rounds[0]
    assert run.state.budgets == {11: 1, 22: 2, 33: 3}
    assert {n: len(v) for n, v in first.assignment.items()} == {11: 1, 22: 2, 33: 3}
    assert set().union(*first.assignment.values()) == {0, 1, 2, 3}
    assert not run.state.remaining and len(run.state.rounds) == 1
    assert all(r.verdict == "accepted" for r in first.replies.values())
    for key, (rows, cols) in run.model.shapes.items():  # exact 50% in every aggregated tensor
        assert abs(int((run.model.params[key] == 0).sum()) - rows * cols // 2) <= 1


def test_state_is_written_each_round_and_the_spool_is_released(setup: dict) -> None:
    w, d = setup["worker"], setup["data"]
    nodes = {1: honest_node(w, d, 1), 2: failing_after_query(honest_node(w, d, 1), "error")}
    run = run_strategy(setup, nodes)
    saved = RunState.from_dict(__import__("json").loads((run.out / "state.json").read_text()))
    assert saved == run.state and len(saved.rounds) == 4 and not saved.remaining
    assert not any((run.out / "spool").glob("round-*/*")), "merged payloads stay on disk"


@pytest.mark.parametrize("method", ["fedspallm", "fedspallm-sampled"])
def test_an_interrupted_run_resumes_to_the_same_model(setup: dict, method: str, monkeypatch):
    """Budgets below the layer count, and partition 2 fails its first job: the prune phase
    takes two rounds, then the refine phase one. Stopped after round 1 or 2 (as a crash right
    after the round's checkpoint) and resumed by a new FederatedRun whose nodes have new ids
    (as in a new simulation), the run plays the same rounds (the failed node stays out) and
    ends with the same weights, bit for bit, as the uninterrupted run."""
    w = setup["worker"]

    def nodes(ids: list[int]) -> dict[int, Behaviour]:
        made = {n: honest_node(w, partition_data(setup, p, 3), 1, p) for p, n in enumerate(ids)}
        made[ids[2]] = failing_after_query(made[ids[2]], "error")
        return made

    def by_partition(run: FederatedRun, ids: list[int]) -> list[dict]:
        return [{ids.index(n): v for n, v in r.assignment.items()} for r in run.state.rounds]

    whole = run_strategy(setup, nodes([1, 2, 3]), method=method)
    assert [r.phase for r in whole.state.rounds] == ["prune", "prune", "refine"]
    assert not whole.state.rounds[0].replies[3].ok and 3 not in whole.state.rounds[1].assignment
    for stop in (1, 2):
        cfg = config(setup, 3, method=method)
        out = setup["out"] / uuid.uuid4().hex
        monkeypatch.setenv(STOP_AFTER_ROUND, str(stop))
        with pytest.raises(Stopped, match=f"after round {stop}"):
            FedSpaLLMStrategy(FederatedRun(cfg, GlobalModel(cfg.model), out)).run(
                FakeGrid(nodes([1, 2, 3]))
            )
        monkeypatch.delenv(STOP_AFTER_ROUND)
        saved = Checkpoint(out).read_state(cfg)
        last = RunState.from_dict(saved).last_merged()
        files = {p.name for p in (out / "checkpoint").iterdir()}
        assert files == {f"layer-{i}.round-{r}.safetensors" for i, r in last.items()}
        assert len(last) == (2 if stop == 1 else 4)
        resumed = FederatedRun(cfg, GlobalModel(cfg.model), out, saved)
        FedSpaLLMStrategy(resumed).run(FakeGrid(nodes([70, 80, 90])))
        assert by_partition(resumed, [70, 80, 90]) == by_partition(whole, [1, 2, 3])
        expected = pruned_weights(whole)
        assert all(torch.equal(v, expected[k]) for k, v in pruned_weights(resumed).items())


def in_parts(node: Behaviour, store: PartStore, part_bytes: int, tamper: bool = False):
    """``node``, leaving each payload over ``part_bytes`` on its disk and serving it part by
    part, as the ClientApp does above ``max-message-mb`` (``tamper``: parts reversed)."""

    def behave(msg: Message) -> Message | None:
        if msg.metadata.message_type == f"{MessageType.QUERY}.{protocol.FETCH}":
            data = store.part(*protocol.read_fetch(msg))
            return protocol.part_reply(msg, data[::-1] if tamper else data)
        reply = node(msg)
        if msg.metadata.message_type != MessageType.TRAIN:
            return reply
        blob, _, metrics = protocol.read_payload(reply)
        if len(blob) <= part_bytes:
            return reply
        return protocol.parts_reply(msg, store.put(blob, part_bytes), metrics)

    return behave


def test_large_payloads_are_fetched_in_parts_to_the_same_model(setup: dict, tmp_path: Path):
    """Payloads over the part size arrive in many small messages: same model, same bytes
    counted, nothing left on the node; a part that does not match drops the payload."""
    w, d = setup["worker"], setup["data"]
    store = PartStore(tmp_path / "node")
    whole = run_strategy(
        setup, {1: honest_node(w, d, 2), 2: honest_node(w, d, 4)}, method="fedspallm"
    )
    nodes = {1: honest_node(w, d, 2), 2: in_parts(honest_node(w, d, 4), store, 4096)}
    grid = FakeGrid(nodes)
    cfg = config(setup, 2, method="fedspallm")
    parted = FederatedRun(cfg, GlobalModel(cfg.model), setup["out"] / uuid.uuid4().hex)
    FedSpaLLMStrategy(parted).run(grid)
    expected = pruned_weights(whole)
    assert all(torch.equal(v, expected[k]) for k, v in pruned_weights(parted).items())
    sent = [r.replies[2].bytes_up for r in parted.state.rounds]
    assert sent == [r.replies[2].bytes_up for r in whole.state.rounds] and min(sent) > 4096
    assert grid.pulls >= 2 + sum(-(-b // 4096) for b in sent)  # one message per part
    assert not list(store.root.iterdir()), "fetched payloads stay on the node"

    nodes[2] = in_parts(honest_node(w, d, 4), store, 4096, tamper=True)
    bad = run_strategy(setup, nodes, method="fedspallm")
    assert "parts" in bad.state.rounds[0].replies[2].reason and bad.state.rounds[0].replies[1].ok


def test_an_exhausted_run_goes_on_with_more_rounds(setup: dict) -> None:
    """``num-server-rounds`` may grow on a resume: a run cut short by it ends as a longer one."""

    def nodes() -> dict[int, Behaviour]:
        return {n: honest_node(setup["worker"], setup["data"], 1, p) for p, n in enumerate([1, 2])}

    short = run_strategy(setup, nodes(), num_server_rounds=1)
    assert short.state.remaining
    cfg = replace(short.cfg, num_server_rounds=4, resume=str(short.out))
    more = FederatedRun(
        cfg, GlobalModel(cfg.model), short.out, Checkpoint(short.out).read_state(cfg)
    )
    FedSpaLLMStrategy(more).run(FakeGrid(nodes()))
    whole = run_strategy(setup, nodes())
    assert len(more.state.rounds) == len(whole.state.rounds) == 2 and not more.state.remaining
    expected = pruned_weights(whole)
    assert all(torch.equal(v, expected[k]) for k, v in pruned_weights(more).items())


def test_a_resume_refuses_another_config_or_a_missing_state(setup: dict, tmp_path: Path):
    cfg = config(setup, 1, method="fedspallm")
    w, d = setup["worker"], setup["data"]
    run = FederatedRun(cfg, GlobalModel(cfg.model), tmp_path / "run")
    FedSpaLLMStrategy(run).run(FakeGrid({1: honest_node(w, d, 4)}))
    saved = Checkpoint(run.out)
    harmless = replace(cfg, resume=str(run.out), round_timeout=9.0, eval_max_windows=2)
    assert saved.read_state(harmless)["rounds"]
    with pytest.raises(ResumeError, match="config.*sparsity .saved 0.5, now 0.6.*seed"):
        saved.read_state(replace(cfg, sparsity=0.6, seed=4))
    with pytest.raises(ResumeError) as err:
        Checkpoint(tmp_path / "elsewhere").read_state(cfg)
    assert err.value.reason == "no-state"
    with pytest.raises(ResumeError, match="local-only"):
        FederatedRun(replace(cfg, method="local-only"), run.model, run.out, {"rounds": []})


def test_simulated_nodes_are_sampled_by_partition_not_by_random_node_id(setup: dict) -> None:
    """Simulation draws new node ids every run; the same config must still give the same masks."""
    w, d = setup["worker"], setup["data"]
    runs = []
    for ids in ([11, 22, 33], [903, 17, 455]):  # node ids in partition order 0, 1, 2
        budgets = dict(zip(ids, [1, 2, 2], strict=True))
        nodes = {n: honest_node(w, d, budgets[n], partition_id=ids.index(n)) for n in ids}
        run = run_strategy(setup, nodes)
        by_partition = {ids.index(n): v for n, v in run.state.rounds[0].assignment.items()}
        runs.append((by_partition, pruned_weights(run)))
    (first, weights), (second, weights_again) = runs
    assert first == second
    assert all(torch.equal(weights[k], weights_again[k]) for k in weights)


@pytest.mark.parametrize(
    "failure", ["dropout", "error", "vanished", "garbage", "replay", "misdirected"]
)
def test_failed_node_layers_are_reassigned(setup: dict, failure: str) -> None:
    w, d = setup["worker"], setup["data"]
    nodes = {
        1: honest_node(w, d, 2),
        2: honest_node(w, d, 2),
        3: failing_after_query(honest_node(w, d, 2), failure, w, d),
    }
    run = run_strategy(setup, nodes)
    first, second = run.state.rounds[0], run.state.rounds[1]
    assert not first.replies[3].ok and first.replies[3].reason
    assert set(first.replies) == {1, 2, 3}  # no reply is booked on a node that had no job
    lost = set(first.assignment[3]) - set(first.aggregated)
    assert lost, "node 3 held layers nobody else pruned in round 1"
    assert 3 not in second.assignment
    assert set().union(*second.assignment.values()) >= lost
    assert not run.state.remaining
    reason = {"dropout": "no reply", "error": "CUDA out of memory", "vanished": "unavailable"}
    reason |= {"replay": "stale-round", "misdirected": "settings"}
    assert reason.get(failure, "not-safetensors") in first.replies[3].reason


def test_later_rounds_receive_the_global_layers_below_their_assignment(setup: dict) -> None:
    w, d = setup["worker"], setup["data"]
    nodes = {1: honest_node(w, d, 2), 2: failing_after_query(honest_node(w, d, 2), "error")}
    run = run_strategy(setup, nodes)
    second = run.state.rounds[1]
    ((node, layers),) = second.assignment.items()
    below = [i for i in run.state.rounds[0].aggregated if i < max(layers)]
    assert bool(second.replies[node].bytes_down) == bool(below)
    assert not run.state.remaining


def test_same_seed_same_masks(setup: dict) -> None:
    w, d = setup["worker"], setup["data"]

    def masks() -> dict[str, torch.Tensor]:
        nodes = {1: honest_node(w, d, 3), 2: honest_node(w, d, 3)}
        return {k: v != 0 for k, v in pruned_weights(run_strategy(setup, nodes)).items()}

    first, second = masks(), masks()
    assert all(torch.equal(first[k], second[k]) for k in first)


PRESETS = [
    ("fedspallm", ""),
    ("fedspallm", "2:4"),
    ("fedspallm-sampled", ""),
    ("fedspallm-paper", ""),
    ("fedspallm-paper", "2:4"),
    ("fedprllm", ""),
    ("fedavg", ""),
    ("local-only", ""),
    ("centralized", ""),
]


@pytest.mark.parametrize(("method", "pattern"), PRESETS)
def test_each_preset_equals_a_reference_built_from_the_engine(
    setup: dict, method: str, pattern: str
) -> None:
    """Three simulated partitions (WikiText-2, WikiText-2, PTB), budgets 2/1/2: the run's
    output equals, bit for bit, the clients' payloads merged tensor by tensor in partition
    order without the server machinery (state, store, streaming)."""
    w, budgets = setup["worker"], [2, 1, 2]

    def data(pid: int) -> ClientData:
        return partition_data(setup, pid, 3)

    ids = [907, 15, 433]  # partition 0, 1, 2
    nodes = {n: honest_node(w, data(p), budgets[p], partition_id=p) for p, n in enumerate(ids)}
    run = run_strategy(setup, nodes, method=method, pattern=pattern)
    cfg = run.cfg
    assert all(r.verdict == "accepted" for rnd in run.state.rounds for r in rnd.replies.values())

    if method == "local-only":
        held = reference_plan(cfg, w.num_layers, budgets)
        assert sorted(run.local) == sorted(ids)
        for p, payload in reference_run(cfg, w, data, held).items():
            stored = run.local[ids[p]]
            for key in payload.sparse:
                assert torch.equal(stored.update(key)[0], payload.update(key)[0]), key
        return
    expected = reference_output(cfg, w, data, budgets)
    assert all(torch.equal(w, expected[k]) for k, w in pruned_weights(run).items())
    phases = [r.phase for r in run.state.rounds]
    two_phase = method in ("fedspallm", "fedspallm-sampled")
    assert phases == (["prune", "refine"] if two_phase else ["prune"])


def test_one_pass_refine_keeps_the_masks_and_solves_on_the_merged_models_statistics(
    setup: dict,
) -> None:
    """``refine-passes=1`` and ``2`` share the prune phase bit for bit and keep its masks; the
    refined values differ (statistics of the merged layers, not of dense ones fed by the
    client's own refined layers), and both equal the engine reference of their setting."""
    w, budgets = setup["worker"], [2, 1, 2]
    ids = [907, 15, 433]
    outputs: dict[int, dict] = {}
    masks: dict[int, dict] = {}
    for passes in (1, 2):
        nodes = {
            n: honest_node(w, partition_data(setup, p, 3), budgets[p], partition_id=p)
            for p, n in enumerate(ids)
        }
        run = run_strategy(setup, nodes, method="fedspallm", refine_passes=passes)
        outputs[passes] = pruned_weights(run)
        masks[passes] = {k: v != 0 for k, v in outputs[passes].items()}
        expected = reference_output(run.cfg, w, lambda p: partition_data(setup, p, 3), budgets)
        assert all(torch.equal(v, expected[k]) for k, v in outputs[passes].items())
    # the same mask (a merged bf16 value may round to exactly 0: at most one such per tensor)
    assert all(int((masks[1][k] != masks[2][k]).sum()) <= 1 for k in masks[1])
    assert any(not torch.equal(outputs[1][k], outputs[2][k]) for k in outputs[1])


def test_refit_travels_with_the_job_and_keeps_the_sweeps_masks(setup: dict) -> None:
    """``refit`` reaches the client in the job's config; the lowest layer, whose inputs are the
    same either way, keeps the plain sweep's masks and gets other kept values."""
    w, d = setup["worker"], setup["data"]
    payloads = {}
    for refit in (0, 20):
        cfg = RunConfig(model=setup["model"], nsamples=4, seqlen=32, refit=refit)
        job = Job.from_config(Job.plan(cfg, 1, [0, 1]).to_config())
        assert job.prune_config().refit == refit
        payloads[refit] = decode_payload(w.run(job, d)[0])
    plain, refit = payloads[0], payloads[20]
    lowest = [k for k in plain.keys if ".0." in k]
    assert lowest and sorted(plain.keys) == sorted(refit.keys)
    for key in lowest:
        assert torch.equal(plain.masks[key], refit.masks[key]), key
        assert not torch.equal(plain.weights[key], refit.weights[key]), key


def _fails_to_refine(node: Callable) -> Callable:
    def reply(msg: Message) -> Message | None:
        if (
            msg.metadata.message_type == MessageType.TRAIN
            and protocol.read_job(msg)[0].phase == "refine"
        ):
            return protocol.error_reply(msg, "killed")
        return node(msg)

    return reply


@pytest.mark.parametrize("method", ["fedspallm", "fedspallm-sampled"])
def test_a_node_that_fails_in_the_refine_phase_leaves_its_layers_to_the_others(
    setup: dict, method: str
):
    """Default: everyone refines every layer, so the others cover a failed node at once;
    ``fedspallm-sampled``: its layers go to the others in one more round."""
    w, d = setup["worker"], setup["data"]
    nodes = {1: honest_node(w, d, 2), 2: _fails_to_refine(honest_node(w, d, 4))}
    run = run_strategy(setup, nodes, method=method)
    prune, refine, *retry = run.state.rounds
    assert (prune.phase, refine.phase) == ("prune", "refine") and not refine.replies[2].ok
    assert set(refine.assignment[2]) == set(range(4))
    if method == "fedspallm":
        assert not retry and refine.assignment[1] == list(range(4))
    else:
        assert [r.phase for r in retry] == ["refine"]
        assert retry[0].assignment == {1: [i for i in range(4) if i not in refine.aggregated]}
        assert all(r.ok for r in retry[0].replies.values())
    assert not run.state.remaining
    for key, (rows, cols) in run.model.shapes.items():
        assert abs(int((run.model.params[key] == 0).sum()) - rows * cols // 2) <= 1


ATTACKER = 11  # partition 1 of attacked_run


def attacked_run(
    setup: dict,
    attack: str | None,
    phases: tuple[str, ...] = ("prune", "refine"),
    one_tensor: bool = False,
    budget: int = 2,
    **overrides,
) -> FederatedRun:
    """The default method on 4 non-IID nodes, partition 1 poisoning its payloads in ``phases``
    (only one tensor of its lowest layer, with ``one_tensor``; nobody, without an attack)."""
    w = setup["worker"]

    def tamper(job: Job, blob: bytes, down: bytes | None) -> bytes:
        if attack is None or job.phase not in phases:
            return blob
        keys = [f"model.layers.{min(job.layers)}.mlp.up_proj.weight"] if one_tensor else ()
        return poison(blob, attack, w.base, keys, down)

    nodes = {
        10 + p: honest_node(
            w, partition_data(setup, p, 4), budget, p, tamper if 10 + p == ATTACKER else None
        )
        for p in range(4)
    }
    return run_strategy(setup, nodes, **({"method": "fedspallm"} | overrides))


def assert_dropped(run: FederatedRun, rnd: int | None) -> None:
    """The attacker dropped in round ``rnd`` (``None``: never) and given no work after it, every
    other reply merged, every layer done in both phases."""
    for r in run.state.rounds:
        for node, reply in r.replies.items():
            dropped = node == ATTACKER and rnd is not None
            assert reply.ok == (not dropped or r.round < rnd), (r.round, node, reply)
            assert not dropped or r.round <= rnd
    assert not run.state.remaining and run.state.phase == 1


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_a_poisoning_client_is_dropped_and_its_layers_reassigned(setup: dict, attack: str):
    run = attacked_run(setup, attack)
    first = run.state.rounds[0]
    assert_dropped(run, 1)
    bad = first.replies[ATTACKER]
    # the dense weights are refused by the payload checks (density), the rest by screening
    assert bad.reason.startswith("density" if attack == "dense" else "outlier")
    assert bad.verdict == ("" if attack == "dense" else "outlier")
    honest = [r for n, r in first.replies.items() if n != ATTACKER]
    assert all(r.verdict == "accepted" and r.deviation < 1 for r in honest)
    lost = set(first.assignment[ATTACKER]) - set(first.aggregated)
    assert lost <= set().union(*run.state.rounds[1].assignment.values())
    assert run.state.rounds[1].phase == ("prune" if lost else "refine")
    dropped = run.finish({})["dropped"]
    assert dropped == [{"round": 1, "node": ATTACKER, "partition-id": 1, "reason": bad.reason}]


def test_a_client_poisoning_only_its_refine_payload_is_dropped_there(setup: dict):
    run = attacked_run(setup, "sign-flip", phases=("refine",))
    refine = run.state.rounds[1]
    assert refine.phase == "refine" and refine.replies[ATTACKER].verdict == "outlier"
    assert_dropped(run, 2)


def test_one_poisoned_tensor_drops_the_whole_payload(setup: dict):
    run = attacked_run(setup, "sign-flip", one_tensor=True)
    assert "mlp.up_proj" in run.state.rounds[0].replies[ATTACKER].reason
    assert_dropped(run, 1)


@pytest.mark.parametrize(
    ("pruner", "sparsity", "pattern"),
    [("sparsegpt", 0.7, ""), ("wanda", 0.5, ""), ("magnitude", 0.5, "2:4")],
)
def test_honest_clients_pass_the_screening(setup: dict, pruner: str, sparsity: float, pattern: str):
    run = attacked_run(setup, None, pruner=pruner, sparsity=sparsity, pattern=pattern)
    assert_dropped(run, None)
    replies = [r for rnd in run.state.rounds for r in rnd.replies.values()]
    assert all(r.verdict == "accepted" for r in replies)


def test_robust_aggregators_bound_an_unscreened_attack(setup: dict):
    """Every node on every layer, screening off: one client's values x100 blow up the l0 mean,
    not the trimmed mean or the median (30x and 1.25x the base's peak). The refine phase does
    it: all 4 holders keep the server's mask there, whereas in the prune phase a position kept
    by fewer than 3 clients is not trimmed (the one-phase fedspallm-paper ends at 30x)."""
    base = GlobalModel(setup["model"]).params
    peaks = {}
    for merge in ("", "l0-trimmed", "l0-median"):
        run = attacked_run(setup, "scaled-x100", budget=4, screen=False, aggregator=merge)
        assert all(r.verdict == "unscreened" for r in run.state.rounds[0].replies.values())
        peaks[merge] = max(
            float(run.model.params[k].detach().abs().max() / base[k].detach().abs().max())
            for k in run.model.shapes
        )
    assert peaks[""] > 10 and peaks["l0-trimmed"] < 2 and peaks["l0-median"] < 2


def test_run_config_is_checked_once_with_named_keys() -> None:
    with pytest.raises(ConfigError, match="method 'fedfoo'"):
        RunConfig.parse({"method": "fedfoo"})
    with pytest.raises(ConfigError, match="unknown run-config key"):
        RunConfig.parse({"sparsty": 0.5})
    with pytest.raises(ConfigError, match="vote-scaling"):
        RunConfig.parse({"method": "fedspallm", "vote-scaling": True})
    with pytest.raises(ConfigError, match="aggregator replaces the l0 merge"):
        RunConfig.parse({"method": "fedavg", "aggregator": "l0-median"})
    with pytest.raises(ConfigError, match="aggregator 'median'"):
        RunConfig.parse({"aggregator": "median"})
    with pytest.raises(ConfigError, match="screen-mad"):
        RunConfig.parse({"screen-mad": 0.0})
    with pytest.raises(ConfigError, match="contradicts"):
        RunConfig.parse({"sparsity": 0.7, "pattern": "2:4"})
    with pytest.raises(ConfigError, match="refit -1 is negative"):
        RunConfig.parse({"refit": -1})
    cfg = RunConfig.parse({"calib-sources": "a.txt, b.txt", "sim-max-layers": "3,2"})
    assert cfg.calib_sources == ("a.txt", "b.txt") and cfg.sim_budget(3) == 2


def test_pyproject_defaults_are_the_run_config_defaults() -> None:
    import tomllib

    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    app_config = tomllib.loads(pyproject.read_text())["tool"]["flwr"]["app"]["config"]
    assert RunConfig.parse(app_config) == RunConfig()
