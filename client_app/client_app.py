"""ClientApp: prune the assigned layers of a cached base model on this node's private text."""

from __future__ import annotations

import functools
import logging
import traceback

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from pruning import console
from pruning.config import RunConfig
from pruning.federated import ClientData, ClientWorker
from pruning.parts import PartStore
from server_app import protocol

log = logging.getLogger("fedspallm.client")
app = ClientApp()


@functools.lru_cache(maxsize=1)
def _worker(
    model: str, dtype: str, device: str | None, keep_dense: tuple[str, ...]
) -> ClientWorker:
    """One base model per process: loading it is the slowest part of a small job."""
    return ClientWorker(model, dtype, device, keep_dense)


def _client_data(cfg: RunConfig, node: dict) -> ClientData:
    """A deployed node reads its own file (node config ``data-path``); a simulated one its
    partition of the run's calibration sources."""
    return ClientData(
        path=str(node.get("data-path", "")),
        sources=list(cfg.calib_sources),
        partition_id=int(node.get("partition-id", 0)),
        num_partitions=int(node.get("num-partitions", 1)),
        text_field=str(node.get("text-field", cfg.text_field)),
        root=cfg.data_root,
    )


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Report resources; the server turns them into this node's layer budget."""
    cfg, node = RunConfig.parse(context.run_config), context.node_config
    pid = node.get("partition-id")
    budget = int(node["max-layers"]) if "max-layers" in node else cfg.sim_budget(pid)
    resources = {
        "max-layers": budget,
        "memory-gb": float(node.get("memory-gb", 0.0)),
        "cuda": int(torch.cuda.is_available()),
        "partition-id": int(pid) if pid is not None else -1,
    }
    return protocol.resources_reply(msg, resources)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Run one pruning job; failures become error replies with the reason, not crashes.

    Its lines in the stream (the simulation forwards them) carry the client's name: the job,
    each layer done (the driver's lines, ``done/assigned``) and the upload."""
    node = context.node_config
    pid = node.get("partition-id")
    console.setup(f"client {pid}" if pid is not None else f"node {context.node_id}")
    try:
        cfg = RunConfig.parse(context.run_config)
        job, down = protocol.read_job(msg)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        threads = torch.get_num_threads()
        log.info(
            "round %d (%s): layers %s, torch threads %d", job.round, job.phase, job.layers, threads
        )
        device = str(node["device"]) if "device" in node else None
        worker = _worker(cfg.model, cfg.dtype, device, cfg.keep_dense)
        # the payload goes to a file as it is encoded: a large one stays there for the server
        # to fetch in parts, a small one is read back and sent in the reply
        store = PartStore()
        key, path = store.new()
        try:
            with path.open("wb") as sink:
                _, metrics = worker.run(job, _client_data(cfg, node), down, sink)
            size, part_bytes = metrics["payload-bytes"], int(cfg.max_message_mb * 2**20)
            metrics["threads"] = threads  # the report shows what the float sums ran on
            log.info(
                "round %d: done in %.1fs, sending %d bytes", job.round, metrics["seconds"], size
            )
            if 0 < part_bytes < size:
                manifest, path = store.seal(key, part_bytes), None  # the node keeps the file
                return protocol.parts_reply(msg, manifest, metrics)
            blob = path.read_bytes()
        finally:
            if path is not None:
                path.unlink(missing_ok=True)
    except Exception as err:  # noqa: BLE001 - every failure must reach the server as a reason
        reason = f"{type(err).__name__}: {err}"
        # bad input (a ValueError with its reason: data, config, model, payload) in one line
        log.error(
            "job failed: %s", reason if isinstance(err, ValueError) else traceback.format_exc()
        )
        return protocol.error_reply(msg, reason)
    return protocol.payload_reply(msg, blob, metrics)


@app.query(protocol.FETCH)
def fetch(msg: Message, context: Context) -> Message:
    """One part of a payload this node keeps for the server (see ``pruning/parts.py``)."""
    try:
        return protocol.part_reply(msg, PartStore().part(*protocol.read_fetch(msg)))
    except (OSError, KeyError, ValueError) as err:
        return protocol.error_reply(msg, f"{type(err).__name__}: {err}")
