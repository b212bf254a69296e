"""The federated pruning task, free of any Flower type: what a client does for one job, and
the global model the server builds from client payloads round after round.

The Flower apps in ``client_app/`` and ``server_app/`` only move configs and payload bytes
between these two classes.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import BinaryIO

import torch

from .config import SCOPES, PruneSpec, RunConfig
from .data import get_calibration
from .driver import PruneConfig, prune_layers
from .evaluate import perplexity, sparsity_report
from .memory import peak_rss_mib
from .models import (
    DEFAULT_DTYPE,
    DTYPES,
    BaseWeights,
    checkpoint_files,
    layer_state,
    load_layer_state,
    load_model,
    num_layers,
    prunable_shapes,
    prunable_views,
)
from .payload import (
    Expected,
    LazyMap,
    PayloadMeta,
    StoredPayload,
    decode_payload,
    encode_payload,
    write_payload,
)
from .sparsity import Target

log = logging.getLogger(__name__)

# what a job asks of a client: prune its layers to the target, or re-solve the kept values of
# the masks the server merged (sent with the job) on its own data
PHASES = ("prune", "refine")
# the server's saved model: shards small enough to write and upload one at a time (the
# Hub's long-standing default)
SHARD_SIZE = "5GB"


@dataclass
class Job(PruneSpec):
    """One client's work for one round, as the server sends it (no model, no data)."""

    round: int = 0
    layers: list[int] = field(default_factory=list)  # layers to prune and upload
    phase: str = "prune"
    union: bool = False  # calibrate on every partition (the centralized baseline)

    @classmethod
    def plan(
        cls, cfg: RunConfig, round: int, layers: list[int], union: bool = False, phase="prune"
    ) -> Job:
        shared = {f.name: getattr(cfg, f.name) for f in fields(PruneSpec)}
        return cls(**shared, round=round, layers=sorted(layers), union=union, phase=phase)

    def to_config(self) -> dict:
        return asdict(self)

    @classmethod
    def from_config(cls, config: dict) -> Job:
        names = {f.name for f in fields(cls)}
        job = cls(**{k: config[k] for k in names if k in config})
        job.layers = [int(i) for i in job.layers]
        if job.scope not in SCOPES:
            raise ValueError(f"scope {job.scope!r} is not one of {SCOPES}")
        if job.phase not in PHASES:
            raise ValueError(f"phase {job.phase!r} is not one of {PHASES}")
        return job

    def prune_config(self) -> PruneConfig:
        return PruneConfig(
            self.pruner,
            self.sparsity,
            self.pattern or None,
            refit=self.refit,
            true_sequential=self.true_sequential,
        )


@dataclass
class ClientData:
    """Where a client's private calibration text comes from.

    A real deployment names a local file (``path``). The simulation instead spreads the
    partitions over the named corpora in contiguous blocks (with 4 partitions and 2 corpora:
    partitions 0-1 on the first, 2-3 on the second) and cuts each corpus into contiguous shards
    among the partitions that share it: a non-IID split by domain.
    """

    path: str = ""
    sources: list[str] = field(default_factory=list)
    partition_id: int = 0
    num_partitions: int = 1
    text_field: str = "text"
    root: Path | None = None  # folder of relative paths (None: $FEDSPALLM_DATA)

    def shard(self, partition_id: int) -> tuple[str, int, int]:
        """``(source, shard index, shard count)`` of one partition."""
        if self.path:
            return self.path, 0, 1
        if not self.sources:
            raise ValueError("no calibration data: set a data path or calibration sources")
        n, k = len(self.sources), self.num_partitions
        source = partition_id * n // k
        peers = [p for p in range(k) if p * n // k == source]
        return self.sources[source], peers.index(partition_id), len(peers)

    def calibration(self, tokenizer, job: Job) -> torch.Tensor:
        """``[nsamples, seqlen]`` windows of this client (of all partitions when ``union``)."""
        parts = range(self.num_partitions) if job.union and not self.path else [self.partition_id]
        windows = []
        for p in parts:
            source, index, count = self.shard(p)
            windows.append(
                get_calibration(
                    source,
                    tokenizer,
                    job.nsamples,
                    job.seqlen,
                    job.seed,
                    index,
                    count,
                    self.text_field,
                    self.root,
                )
            )
        return torch.cat(windows)


def cast(tensors: dict[str, torch.Tensor], dtype: str) -> LazyMap:
    """``tensors`` in the transport ``dtype`` (``""``: as they are), each cast when looked up,
    so writing many matrices holds one cast copy at a time."""
    wire = DTYPES[dtype] if dtype else None
    return LazyMap(tensors, lambda k: tensors[k].to(wire or tensors[k].dtype))


def flat_shapes(layer_shapes: dict[int, dict[str, tuple[int, ...]]]) -> dict[str, tuple[int, ...]]:
    """``{state_dict key: shape}`` over all layers (what a payload may contain)."""
    return {k: s for layer in layer_shapes.values() for k, s in layer.items()}


class ClientWorker:
    """A client's copy of the base model, kept across jobs, and the job runner.

    Pruning works in place, so the prunable weights are restored before each job (read back
    from the checkpoint, see :class:`BaseWeights`): every job starts from the base model plus
    whatever global layers the server sent.
    """

    def __init__(
        self,
        model_spec: str,
        dtype: str = DEFAULT_DTYPE,
        device: str | None = None,
        keep_dense: tuple[str, ...] = (),
    ):
        self.model, self.tokenizer = load_model(model_spec, dtype, keep_dense=keep_dense)
        self.device = device
        self.shapes = flat_shapes(prunable_shapes(self.model))
        self.base = BaseWeights(self.model, checkpoint_files(model_spec))
        log.info(
            "base weights: %d of %d read back from the checkpoint, the rest kept in RAM",
            self.base.from_checkpoint,
            len(self.base),
        )

    @property
    def num_layers(self) -> int:
        return num_layers(self.model)

    def run(
        self,
        job: Job,
        data: ClientData,
        global_blob: bytes | None = None,
        sink: BinaryIO | None = None,
    ) -> tuple[bytes | None, dict]:
        """Run one job on private data; return the payload and metrics.

        With a ``sink`` (a file) the payload is written there one matrix at a time and
        ``None`` returned in its place: the payload of many layers is never held in memory.

        ``prune``: the job's layers are pruned to the target on top of the base model and the
        aggregated layers sent down (``scope="all"`` prunes the others below them too).
        ``refine``: the server sent the merged model; the job's layers start again from their
        dense base weights and only the kept values of the merged masks are solved. With
        ``refine_passes=2`` each layer runs dense for its statistics and again re-solved, so the
        job's own refined layers feed the ones above; with 1, one pass through the merged model
        gives both statistics and inputs.
        """
        start = time.perf_counter()
        load_layer_state(self.model, self.base)
        decoded = decode_payload(global_blob, Expected(shapes=self.shapes)) if global_blob else None
        targets = solve_from = None
        own: set[str] = set()  # weights that keep their dense base values for now
        if job.phase == "refine":
            if decoded is None or not set(job.layers) <= set(decoded.meta.layers):
                raise ValueError("a refine job needs the merged masks of its layers")
            masks = decoded.masks
            targets = lambda key: Target.fixed(masks[key])  # noqa: E731 - one use, read inline
            if job.refine_passes == 1:  # each job layer is re-solved from its dense weights
                solve_from = self.base.__getitem__
            else:  # the job's layers start dense and are re-solved in place, feeding the next
                own = set(layer_state(self.model, job.layers))
        if decoded is not None:
            load_layer_state(self.model, {k: w for k, w in decoded.weights.items() if k not in own})
        layers = set(job.layers)
        if job.phase == "prune" and job.scope == "all" and layers:
            layers |= set(range(max(layers) + 1)) - set(decoded.meta.layers if decoded else ())
        calib = data.calibration(self.tokenizer, job)
        report = prune_layers(
            self.model,
            calib,
            sorted(layers),
            job.prune_config(),
            self.device,
            False,
            targets,
            solve_from,
        )
        masks = report.masks()
        weights = cast(layer_state(self.model, job.layers), job.transport_dtype)
        meta = PayloadMeta(
            job.round,
            sorted(job.layers),
            job.sparsity,
            job.pattern,
            job.pruner,
            report.tokens,
            phase=job.phase,
            expert_tokens={k: c for k, c in report.expert_tokens().items() if k in weights},
        )
        if sink is None:
            blob = encode_payload(weights, meta, masks)
            size = len(blob)
        else:
            blob, size = None, write_payload(sink, weights, meta, masks)
        errors = [e for i in job.layers if (e := report.layers[i].rel_error) is not None]
        metrics = {
            "tokens": report.tokens,
            "prune-seconds": report.seconds,
            "seconds": time.perf_counter() - start,
            "payload-bytes": size,
            "rel-error": sum(errors) / len(errors) if errors else 0.0,  # 0: not measured
            "layers": len(job.layers),
            "layers-pruned": len(layers),
            "peak-rss-mib": peak_rss_mib(),
        }
        return blob, metrics


class GlobalModel:
    """The server's model: base weights, replaced layer by layer by aggregated ones."""

    def __init__(
        self, model_spec: str, dtype: str = DEFAULT_DTYPE, keep_dense: tuple[str, ...] = ()
    ):
        self.model, self.tokenizer = load_model(model_spec, dtype, keep_dense=keep_dense)
        self.layer_shapes = prunable_shapes(self.model)
        self.shapes = flat_shapes(self.layer_shapes)
        self.params = prunable_views(self.model)  # in the payloads' orientation

    @property
    def num_layers(self) -> int:
        return len(self.layer_shapes)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def dense_bytes(self, layers: list[int]) -> int:
        """Bytes of the dense prunable weights of ``layers`` (the payload size cap's basis)."""
        size = self.dtype.itemsize
        return sum(math.prod(s) * size for i in layers for s in self.layer_shapes[i].values())

    def layer_bytes(self) -> int:
        """Memory one layer needs while pruned: weights plus an fp32 Hessian per input width
        (one per expert for fused experts)."""
        inputs = {s[:-2] + s[-1:] for s in self.layer_shapes[0].values()}
        return self.dense_bytes([0]) + sum(4 * math.prod(s) * s[-1] for s in inputs)

    def sparse(
        self, layers: list[int], round: int, sparsity: float, pattern: str, dtype: str = ""
    ) -> tuple[LazyMap, PayloadMeta, LazyMap]:
        """Aggregated layers as the arguments of a payload writer (weights in the transport
        ``dtype``, default the model's, and their masks), each matrix built only when written:
        writing the whole model holds one matrix's copy, not the model's."""
        meta = PayloadMeta(round, sorted(layers), sparsity, pattern, role="global")
        views = layer_state(self.model, layers)
        return cast(views, dtype), meta, LazyMap(views, self.mask)

    def encode(
        self, layers: list[int], round: int, sparsity: float, pattern: str, dtype: str = ""
    ) -> bytes:
        """Aggregated layers as payload bytes (a downlink to clients)."""
        return encode_payload(*self.sparse(layers, round, sparsity, pattern, dtype))

    def write_sparse(
        self, out: BinaryIO, layers: list[int], round: int, sparsity: float, pattern: str
    ) -> int:
        """Aggregated layers as a payload file in the model's dtype (the layer checkpoint, the
        run's sparse copy), written one matrix at a time; returns its size."""
        return write_payload(out, *self.sparse(layers, round, sparsity, pattern))

    def mask(self, key: str) -> torch.Tensor:
        """Keep mask of a merged weight: the one its downlink carries and its refine payloads
        are read against (taken before any cast, so a value rounding to zero stays kept)."""
        return self.params[key].detach() != 0

    @torch.no_grad()
    def write(self, key: str, weight: torch.Tensor) -> None:
        self.params[key].copy_(weight)

    @torch.no_grad()
    def evaluate_alone(
        self,
        payload: StoredPayload,
        sources: list[str],
        seqlen: int,
        max_windows: int | None,
        root: Path | None = None,
    ) -> dict[str, float]:
        """Perplexity of the base model with one client's layers (the local-only baseline)."""
        saved = {k: v.clone() for k, v in layer_state(self.model, payload.meta.layers).items()}
        try:
            load_layer_state(self.model, {k: payload.update(k)[0] for k in payload.keys})
            return self.evaluate(sources, seqlen, max_windows, root)
        finally:
            load_layer_state(self.model, saved)

    def evaluate(
        self, sources: list[str], seqlen: int, max_windows: int | None, root: Path | None = None
    ) -> dict[str, float]:
        return evaluate_sources(self.model, self.tokenizer, sources, seqlen, max_windows, root)

    def save(self, out: Path, layers: list[int], sparsity: float, pattern: str) -> dict:
        """``save_pretrained`` directory (safetensors in shards of at most ``SHARD_SIZE``) plus
        a compressed sparse copy of the pruned layers, each written without a second copy of
        the model in memory."""
        out.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(out / "model", max_shard_size=SHARD_SIZE)
        self.tokenizer.save_pretrained(out / "model")
        with (out / "model.sparse.safetensors").open("wb") as fh:
            size = self.write_sparse(fh, layers, 0, sparsity, pattern)
        return {"sparse_bytes": size, "sparsity": sparsity_report(self.model)}


def evaluate_sources(
    model,
    tokenizer,
    sources: list[str],
    seqlen: int,
    max_windows: int | None,
    root: Path | None = None,
    device: str | None = None,
) -> dict[str, float]:
    """Perplexity of ``model`` on each evaluation source."""
    from .data import get_eval_tokens

    return {
        s: perplexity(model, get_eval_tokens(s, tokenizer, root=root), seqlen, device, max_windows)
        for s in sources
    }
