"""The server side of a federated run, free of any Flower type.

Flow of a round: the run state gives the layers still to prune and each node's budget; the
method's plan assigns layers to nodes (:meth:`FederatedRun.start_round` returns one
:class:`Task` per node); each reply is checked against what its node was asked for and written
to the payload store (:meth:`FederatedRun.receive`), so no payload stays in memory; then
:meth:`FederatedRun.close_round` screens the stored payloads, merges each layer from them one
tensor at a time, expands the merged mask to the exact target and updates the state, which is
written to ``state.json`` in the run directory, next to each merged layer
(``pruning/checkpoint.py``), so that ``resume`` can continue an interrupted run
(:meth:`FederatedRun.restore`). ``server_app/strategy.py`` only moves tasks and replies through
Flower.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

from .aggregate import merge_tensor
from .checkpoint import STOP_AFTER_ROUND, Checkpoint, ResumeError, Stopped
from .config import RunConfig
from .federated import GlobalModel, Job
from .memory import peak_rss_mib
from .methods import METHODS
from .models import DTYPES
from .parts import Parts
from .payload import Expected, PayloadError, StoredPayload
from .report import bytes_totals
from .sampling import Assignment, assign_layers, budget_from_resources
from .screening import deviations, screen

log = logging.getLogger(__name__)


@dataclass
class Reply:
    """What became of one node's job in one round."""

    ok: bool = False
    reason: str = "no reply"
    bytes_up: int = 0
    bytes_down: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    verdict: str = ""  # the screening's word on a valid payload: accepted, outlier, unscreened
    deviation: float = 0.0  # its largest relative deviation from the server's weights


@dataclass
class RoundLog:
    round: int
    phase: str
    assignment: dict[int, list[int]]
    uncovered: list[int]
    replies: dict[int, Reply] = field(default_factory=dict)
    aggregated: list[int] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class RunState:
    """Everything the server knows between rounds; ``to_dict`` is what ``state.json`` holds."""

    num_layers: int
    remaining: list[int]  # layers still to do in the current phase
    done: list[int] = field(default_factory=list)  # layers merged at least once
    phase: int = 0  # index into the method's phases
    holders: dict[int, list[int]] = field(default_factory=dict)  # layer -> nodes last merged
    budgets: dict[int, int] = field(default_factory=dict)  # nodes still taking work
    reported: dict[int, int] = field(default_factory=dict)  # budgets as first reported
    resources: dict[int, dict] = field(default_factory=dict)
    rounds: list[RoundLog] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-ready (node ids become string keys, as in the report)."""

        def keyed(d: dict) -> dict:
            return {str(k): v for k, v in d.items()}

        out = asdict(self)
        for name in ("budgets", "reported", "resources", "holders"):
            out[name] = keyed(out[name])
        for rnd in out["rounds"]:
            rnd["assignment"], rnd["replies"] = keyed(rnd["assignment"]), keyed(rnd["replies"])
        return out

    @classmethod
    def from_dict(cls, data: dict) -> RunState:
        def keyed(d: dict) -> dict:
            return {int(k): v for k, v in d.items()}

        rounds = [
            RoundLog(
                **{**r, "assignment": keyed(r["assignment"])},
            )
            for r in data["rounds"]
        ]
        for rnd in rounds:
            rnd.replies = {int(n): Reply(**v) for n, v in rnd.replies.items()}
        return cls(
            data["num_layers"],
            data["remaining"],
            data["done"],
            data["phase"],
            keyed(data["holders"]),
            keyed(data["budgets"]),
            keyed(data["reported"]),
            keyed(data["resources"]),
            rounds,
        )

    def sampling_keys(self, nodes: Iterable[int] | None = None) -> dict[int, str]:
        """A stable name per node (of ``nodes``, default: those still taking work) for the
        plans, so the same config gives the same masks.

        Simulation draws random node ids on every run, but each node there reports a distinct
        partition id, which names it; elsewhere (deployment) the node id does.
        """
        nodes = self.budgets if nodes is None else nodes
        pids = {n: int(self.resources.get(n, {}).get("partition-id", -1)) for n in nodes}
        if min(pids.values(), default=-1) >= 0 and len(set(pids.values())) == len(pids):
            return {n: str(p) for n, p in pids.items()}
        return {n: str(n) for n in pids}

    def last_merged(self) -> dict[int, int]:
        """Layer -> the round that merged it last (whose checkpoint version holds it)."""
        return {i: r.round for r in self.rounds for i in r.aggregated}

    def renamed(self, ids: dict[int, int]) -> RunState:
        """The same state with node ids translated by ``ids`` (ids not in it stay)."""

        def keyed(d: dict) -> dict:
            return {ids.get(n, n): v for n, v in d.items()}

        rounds = [
            replace(r, assignment=keyed(r.assignment), replies=keyed(r.replies))
            for r in self.rounds
        ]
        holders = {i: [ids.get(n, n) for n in nodes] for i, nodes in self.holders.items()}
        return replace(
            self,
            holders=holders,
            budgets=keyed(self.budgets),
            reported=keyed(self.reported),
            resources=keyed(self.resources),
            rounds=rounds,
        )


@dataclass(frozen=True)
class Task:
    """One node's work in a round: the job, and the aggregated layers it must build on,
    encoded only when its message is sent (so the server holds one such payload at a time)."""

    node: int
    job: Job
    downlink: Callable[[], bytes | None]


class PayloadStore:
    """Checked payloads on disk, ``<run>/spool/round-<r>/node-<id>.safetensors``.

    A payload is written as received (or part by part, as fetched), validated from the file and
    kept only if valid; merges read it back one tensor at a time, so server memory does not
    grow with the number of clients. A round's folder is removed once its layers are merged.
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    def put(self, rnd: int, node: int, blob: bytes | Parts, expected: Expected) -> StoredPayload:
        path = self.root / f"round-{rnd}" / f"node-{node}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            if isinstance(blob, Parts):
                _fetch_to(path, blob, expected)
            else:
                path.write_bytes(blob)
            payload = StoredPayload(path, expected)
            missing = set(expected.layers or ()) - set(payload.meta.layers)
            if missing:
                raise PayloadError("unassigned-layer", f"layers {sorted(missing)} missing")
        except PayloadError:
            path.unlink(missing_ok=True)
            raise
        return payload

    def drop(self, rnd: int) -> None:
        shutil.rmtree(self.root / f"round-{rnd}", ignore_errors=True)


def _fetch_to(path: Path, parts: Parts, expected: Expected) -> None:
    """Append every part of a payload to ``path``, checking the announced size against the cap
    before the first fetch, each part's length, and the whole file's SHA-256."""
    manifest = parts.manifest
    if expected.max_bytes is not None and manifest.size > expected.max_bytes:
        raise PayloadError("too-large", f"{manifest.size} bytes > limit {expected.max_bytes}")
    digest = hashlib.sha256()
    with path.open("wb") as fh:
        for index in range(manifest.count):
            data = parts.fetch(index)
            if len(data) != manifest.part_size(index):
                raise PayloadError("parts", f"part {index} has {len(data)} bytes")
            digest.update(data)
            fh.write(data)
            del data  # before the next part arrives
    if digest.hexdigest() != manifest.sha256:
        raise PayloadError("parts", "the fetched parts do not match the announced SHA-256")


def _holders_plan(
    state: RunState, keys: dict[int, str], budgets: dict[str, int], seed: int, rnd: int
) -> Assignment:
    """Each remaining layer to the nodes (still taking work) whose payload for it was merged in
    the previous phase; a layer none of them can take is sampled among the others."""
    per_node: dict[str, list[int]] = {}
    orphans = []
    for layer in state.remaining:
        alive = [keys[n] for n in state.holders.get(layer, []) if n in keys]
        for key in alive:
            per_node.setdefault(key, []).append(layer)
        if not alive:
            orphans.append(layer)
    extra = assign_layers(budgets, orphans, seed, rnd) if orphans else Assignment({}, [])
    for key, layers in extra.per_client.items():
        per_node[key] = sorted(set(per_node.get(key, [])) | set(layers))
    return Assignment(per_node, extra.uncovered)


def _rejoined(saved: RunState, now: RunState) -> RunState:
    """``saved`` with its nodes renamed to the nodes of ``now`` (freshly reported) that have
    the same sampling key; nodes new to the run join it, nodes not back lose their budget."""
    current = {key: n for n, key in now.sampling_keys(now.resources).items()}
    old = saved.sampling_keys(saved.resources)
    ids = {n: current[key] for n, key in old.items() if key in current}
    state = saved.renamed(ids)
    for node in sorted(set(now.resources) - set(ids.values())):
        state.resources[node], state.reported[node] = now.resources[node], now.reported[node]
        if node in now.budgets:
            state.budgets[node] = now.budgets[node]
    state.budgets = {n: b for n, b in state.budgets.items() if n in now.resources}
    return state


class FederatedRun:
    """One federated pruning run on the server: state, plans, store, merges, outputs.

    ``saved`` (``Checkpoint(out).read_state(cfg)`` of the run directory ``out``) continues an
    interrupted run: :meth:`restore` applies it once the nodes have reported.
    """

    def __init__(
        self, cfg: RunConfig, model: GlobalModel, out: Path, saved: dict | None = None
    ) -> None:
        self.cfg, self.model, self.out = cfg, model, out
        self.method = METHODS[cfg.method]
        self.merges = self.method.merges(cfg.vote_scaling, cfg.aggregator)
        if saved is not None and None in self.merges:
            raise ResumeError("method", f"{cfg.method} merges nothing that could be resumed")
        self.saved = RunState.from_dict(saved) if saved is not None else None
        self.state = RunState(model.num_layers, list(range(model.num_layers)))
        self.store = PayloadStore(out / "spool")
        self.checkpoint = Checkpoint(out)
        self.jobs: dict[int, Job] = {}  # the open round's jobs, by node
        self.payloads: dict[int, StoredPayload] = {}  # valid payloads of the open round
        self.local: dict[int, StoredPayload] = {}  # local-only: every node's own layers
        self.started = self.round_started = time.perf_counter()

    # -- nodes -----------------------------------------------------------------------------

    def add_node(self, node: int, resources: dict) -> None:
        """Turn a node's reported resources into its per-round layer budget."""
        max_layers, memory_gb = resources.get("max-layers", 0), resources.get("memory-gb", 0)
        self.state.resources[node] = dict(resources)
        self.state.reported[node] = budget_from_resources(
            self.model.num_layers,
            int(max_layers) if max_layers > 0 else None,
            float(memory_gb) if memory_gb > 0 else None,
            self.model.layer_bytes(),
        )
        if self.state.reported[node] > 0:
            self.state.budgets[node] = self.state.reported[node]

    def restore(self) -> None:
        """Continue the saved run, if any, with the nodes that reported (call after
        :meth:`add_node` for each): its state, with node ids translated to the current nodes,
        and its merged layers read back from the checkpoint.

        Nodes are matched by the name the plans know them by (partition id in simulation, node
        id elsewhere), so the rounds to come are those the interrupted run would have played.
        A node of the saved run that is not back takes no more work; a new node joins with its
        reported budget; a returning one keeps its saved budget (or, if it failed, none).
        """
        if self.saved is None:
            return
        saved = self.saved
        if saved.num_layers != self.model.num_layers:
            raise ResumeError(
                "model", f"{saved.num_layers} layers saved, the model has {self.model.num_layers}"
            )
        state = _rejoined(saved, self.state)
        last = state.last_merged()
        for layer, rnd in sorted(last.items()):
            expected = Expected(
                self.model.shapes, {layer}, self.model.dtype, round=rnd, role="global"
            )
            stored = StoredPayload(self.checkpoint.layer(layer, rnd), expected)
            for key in stored.keys:
                self.model.write(key, stored.update(key)[0])
        self.checkpoint.keep(last)  # the unfinished round's layers and payloads are redone
        shutil.rmtree(self.store.root, ignore_errors=True)
        self.state, self.saved = state, None
        log.info("resumed after round %d with nodes %s", len(state.rounds), sorted(state.budgets))

    # -- rounds ----------------------------------------------------------------------------

    @property
    def merge(self) -> str | None:
        return self.merges[self.state.phase]

    def start_round(self) -> list[Task] | None:
        """Plan the next round; ``None`` when every phase covered every layer or the rounds ran
        out (they count over all phases)."""
        rnd, state = len(self.state.rounds) + 1, self.state
        if not state.remaining and state.phase + 1 < len(self.method.phases):
            state.phase += 1
            state.remaining = list(range(state.num_layers))
        if not self.state.remaining or rnd > self.cfg.num_server_rounds:
            if self.state.remaining:
                log.warning("rounds exhausted with layers %s still unpruned", self.state.remaining)
            return None
        if not self.state.budgets:
            raise RuntimeError("no node is left to prune the remaining layers")
        keys = self.state.sampling_keys()
        node_of = {key: n for n, key in keys.items()}
        budgets = {keys[n]: b for n, b in self.state.budgets.items()}
        phase = self.method.phases[state.phase]
        if phase.plan is None:  # each layer by the nodes whose payload was merged last phase
            plan = _holders_plan(state, keys, budgets, self.cfg.seed, rnd)
        else:
            plan = phase.plan(budgets, state.remaining, self.cfg.seed, rnd)
        assignment = {node_of[k]: layers for k, layers in plan.per_client.items()}
        log.info(
            "round %d (%s): assignment %s, carried over %s",
            rnd,
            phase.name,
            assignment,
            plan.uncovered,
        )
        current = RoundLog(rnd, phase.name, assignment, plan.uncovered)
        self.state.rounds.append(current)
        tasks = []
        for node, layers in assignment.items():
            # the merged layers the job builds on (a refine job also needs its own layers' masks)
            below = [i for i in sorted(state.done) if i < max(layers) + phase.refine]
            current.replies[node] = Reply()
            job = Job.plan(self.cfg, rnd, layers, self.method.union, phase.name)
            tasks.append(Task(node, job, partial(self._downlink, node, below)))
        self.jobs = {t.node: t.job for t in tasks}
        self.payloads, self.round_started = {}, time.perf_counter()
        return tasks

    def drive(self, work: Callable[[Task], tuple[bytes, dict]]) -> None:
        """Every round in this process, ``work`` doing each task's job: the engine without
        Flower's transport (benchmarks)."""
        self.restore()
        while (tasks := self.start_round()) is not None:
            for task in tasks:
                blob, metrics = work(task)
                self.receive(task.node, blob, metrics=metrics)
            self.close_round()

    def _downlink(self, node: int, layers: list[int]) -> bytes | None:
        if not layers:
            return None
        cfg = self.cfg
        blob = self.model.encode(
            layers, len(self.state.rounds), cfg.sparsity, cfg.pattern, cfg.transport_dtype
        )
        self.state.rounds[-1].replies[node].bytes_down = len(blob)
        return blob

    def receive(
        self,
        node: int,
        blob: bytes | Parts | None,
        error: str | None = None,
        metrics: dict | None = None,
    ) -> None:
        """Check one reply (its payload, or the parts to fetch it by) against its node's job
        and store it; failures are logged, not raised."""
        current = self.state.rounds[-1]
        if node not in current.assignment:
            log.warning("ignoring a reply from node %d, which had no job", node)
            return
        entry = current.replies[node]
        if error is not None:
            entry.reason = f"error reply: {error}"
            log.warning("node %d failed: %s", node, error)
            return
        if blob is None:
            entry.reason = "reply carries no payload"
            return
        entry.bytes_up = blob.manifest.size if isinstance(blob, Parts) else len(blob)
        try:
            self.payloads[node] = self.store.put(
                current.round, node, blob, self._expected(self.jobs[node])
            )
        except PayloadError as err:
            entry.reason = str(err)
            log.warning("node %d sent a bad payload, dropped: %s", node, err)
            return
        entry.ok, entry.reason, entry.metrics = True, "", dict(metrics or {})

    def _expected(self, job: Job) -> Expected:
        """What a node's payload must be: an answer to its job of this round, within the size
        cap (the configured one, or twice the dense bytes of its layers)."""
        cap = self.cfg.max_payload_mb
        layers = job.layers
        max_bytes = int(cap * 2**20) if cap > 0 else 2 * self.model.dense_bytes(layers) + 65536
        return Expected(
            self.model.shapes,
            set(layers),
            DTYPES[job.transport_dtype] if job.transport_dtype else self.model.dtype,
            job.sparsity,
            max_bytes=max_bytes,
            round=job.round,
            pattern=job.pattern,
            pruner=job.pruner,
            role="update",
            phase=job.phase,
            masks=self.model.mask if job.phase == "refine" else None,
        )

    def close_round(self) -> None:
        """Screen, merge and expand every layer some valid node pruned; re-queue the rest."""
        current = self.state.rounds[-1]
        self._screen(current)
        for node in current.assignment:  # a node that failed once gets no further work this run
            if not current.replies[node].ok:
                self.state.budgets.pop(node, None)
        # merge in a fixed client order (partition, then node id): float sums depend on it
        valid = sorted(self.payloads, key=lambda n: (self._partition(n), n))
        if self.merge is None:
            self.local.update({n: self.payloads[n] for n in valid})
            covered = set(self.state.remaining) if valid else set()
        else:
            covered = {i for n in valid for i in current.assignment[n]}
            for layer in sorted(covered):
                nodes = [n for n in valid if layer in current.assignment[n]]
                self._merge_layer(layer, [self.payloads[n] for n in nodes])
                self.state.holders[layer] = nodes
                write = partial(
                    self.model.write_sparse,
                    layers=[layer],
                    round=current.round,
                    sparsity=self.cfg.sparsity,
                    pattern=self.cfg.pattern,
                )
                self.checkpoint.write_layer(layer, current.round, write)
            self.store.drop(current.round)
        current.aggregated = sorted(covered)
        self.state.done = sorted(set(self.state.done) | covered)
        self.state.remaining = [i for i in self.state.remaining if i not in covered]
        current.seconds = time.perf_counter() - self.round_started
        log.info(
            "round %d: aggregated %d layers, %d remaining, failed nodes %s, peak RSS %.0f MiB",
            current.round,
            len(covered),
            len(self.state.remaining),
            [n for n in current.assignment if not current.replies[n].ok],
            peak_rss_mib(),
        )
        self.checkpoint.write_state(self.cfg, self.state.to_dict(), self.state.last_merged())
        if os.environ.get(STOP_AFTER_ROUND) == str(current.round):
            raise Stopped(f"stopped after round {current.round} (${STOP_AFTER_ROUND})")

    def _screen(self, current: RoundLog) -> None:
        """Give every valid payload a verdict; an outlier is dropped like a failed reply.

        Each tensor is judged against the server's weights the job started from: the dense
        base in the prune phase, the merged layer in the refine phase."""
        cfg = self.cfg
        if not cfg.screen:
            for node in self.payloads:
                current.replies[node].verdict = "unscreened"
            return
        found = {n: deviations(p, self.model.params.__getitem__) for n, p in self.payloads.items()}
        for node, verdict in screen(found, cfg.screen_mad, cfg.screen_max_deviation).items():
            entry = current.replies[node]
            entry.deviation = verdict.deviation
            entry.verdict = "accepted" if verdict.accepted else "outlier"
            if not verdict.accepted:
                entry.ok, entry.reason = False, f"outlier: {verdict.reason}"
                self.payloads.pop(node).path.unlink()
                log.warning("node %d: payload dropped as an outlier: %s", node, verdict.reason)

    def _partition(self, node: int) -> int:
        return int(self.state.resources.get(node, {}).get("partition-id", -1))

    def _merge_layer(self, layer: int, holders: list[StoredPayload]) -> None:
        target = self.cfg.target()
        for key, shape in self.model.layer_shapes[layer].items():
            sources = [partial(p.update, key) for p in holders]
            experts = shape[0] if len(shape) == 3 else 0
            tokens = [p.meta.expert_tokens.get(key) for p in holders]  # per expert, if sent
            weight, _ = merge_tensor(
                self.merge,
                sources,
                target,
                dense=lambda k=key: self.model.params[k].detach(),
                tokens=tokens if experts and None not in tokens else None,
                experts=experts,
            )
            self.model.write(key, weight)

    # -- outputs ---------------------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        cfg = self.cfg
        windows = cfg.eval_max_windows or None
        return self.model.evaluate(list(cfg.eval_data), cfg.seqlen, windows, cfg.data_root)

    def finish(self, dense: dict[str, float]) -> dict:
        """Save the pruned model (or evaluate each node alone, for local-only) and build the
        report; the payload store is removed, and the layer checkpoint if the run is complete."""
        cfg, state = self.cfg, self.state
        perplexity: dict = {"dense": dense}
        saved: dict = {}
        if self.merge is None:
            windows = cfg.eval_max_windows or None
            per_client = {
                str(n): self.model.evaluate_alone(
                    p, list(cfg.eval_data), cfg.seqlen, windows, cfg.data_root
                )
                for n, p in self.local.items()
            }
            perplexity["clients"] = per_client
            perplexity["pruned"] = (
                {s: sum(c[s] for c in per_client.values()) / len(per_client) for s in cfg.eval_data}
                if per_client
                else {}
            )
        else:
            saved = self.model.save(self.out, state.done, cfg.sparsity, cfg.pattern)
            perplexity["pruned"] = self.evaluate()
        shutil.rmtree(self.store.root, ignore_errors=True)
        if not state.remaining:  # an incomplete run may still go on with more rounds
            self.checkpoint.drop_layers()
        data = state.to_dict()
        return {
            "model": cfg.model,
            "config": cfg.values(),
            "num_layers": state.num_layers,
            "nodes": {
                n: {"budget": data["reported"].get(n, 0), "resources": r}
                for n, r in data["resources"].items()
            },
            "rounds": data["rounds"],
            "complete": not state.remaining,
            "dropped": [  # every job whose payload was not merged, and why
                {
                    "round": r.round,
                    "node": n,
                    "partition-id": state.resources.get(n, {}).get("partition-id"),
                    "reason": e.reason,
                }
                for r in state.rounds
                for n, e in r.replies.items()
                if not e.ok
            ],
            "unpruned_layers": state.remaining,
            "bytes": bytes_totals(data["rounds"]),
            "perplexity": perplexity,
            **saved,
            "seconds": time.perf_counter() - self.started,
            "server_peak_rss_mib": peak_rss_mib(),
            "out": str(self.out),
        }
