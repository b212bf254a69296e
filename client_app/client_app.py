"""ClientApp: prune the assigned layers of a cached base model on this node's private text."""

from __future__ import annotations

import functools
import logging
import os
import traceback

from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from pruning.federated import ClientData, ClientWorker, Job

log = logging.getLogger("fedspallm.client")
app = ClientApp()


@functools.lru_cache(maxsize=1)
def _log_progress() -> None:
    """Per-layer progress lines (the simulation forwards them to the `flwr run` stream)."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    for name in ("fedspallm", "pruning"):
        logging.getLogger(name).setLevel(logging.INFO)


@functools.lru_cache(maxsize=1)
def _worker(model: str, dtype: str, device: str | None) -> ClientWorker:
    """One base model per process: loading it is the slowest part of a small job."""
    return ClientWorker(model, dtype, device)


def _node_value(context: Context, key: str, default):
    """A node-config value (set per SuperNode) overriding the run config."""
    return context.node_config.get(key, context.run_config.get(key, default))


def _client_data(context: Context) -> ClientData:
    if context.run_config.get("data-dir"):
        os.environ.setdefault("FEDSPALLM_DATA", str(context.run_config["data-dir"]))
    return ClientData(
        path=str(context.node_config.get("data-path", "")),
        sources=[
            s.strip()
            for s in str(context.run_config.get("calib-sources", "")).split(",")
            if s.strip()
        ],
        partition_id=int(context.node_config.get("partition-id", 0)),
        num_partitions=int(context.node_config.get("num-partitions", 1)),
        text_field=str(_node_value(context, "text-field", "text")),
    )


def _budget(context: Context) -> int:
    """Layers per round this node offers: node config, else its simulation entry, else default."""
    if "max-layers" in context.node_config:
        return int(context.node_config["max-layers"])
    sim = [
        int(v) for v in str(context.run_config.get("sim-max-layers", "")).split(",") if v.strip()
    ]
    pid = context.node_config.get("partition-id")
    if sim and pid is not None:
        return sim[int(pid) % len(sim)]
    return int(context.run_config.get("max-layers", 0))


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Report resources; the server turns them into this node's layer budget."""
    import torch

    resources = MetricRecord(
        {
            "max-layers": _budget(context),
            "memory-gb": float(_node_value(context, "memory-gb", 0.0)),
            "cuda": int(torch.cuda.is_available()),
            "partition-id": int(context.node_config.get("partition-id", -1)),
        }
    )
    return Message(RecordDict({"resources": resources}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Run one pruning job; failures become error replies with the reason, not crashes."""
    from flwr.app import Error

    _log_progress()
    try:
        job = Job.from_config(dict(msg.content.config_records["config"]))
        log.info("round %d: pruning layers %s with %s", job.round, job.layers, job.pruner)
        worker = _worker(
            str(context.run_config["model"]),
            str(context.run_config.get("dtype", "float32")),
            str(context.node_config["device"]) if "device" in context.node_config else None,
        )
        down = msg.content.array_records.get("global")
        blob, metrics = worker.run(
            job, _client_data(context), down["payload"].data if down else None
        )
    except Exception as err:  # noqa: BLE001 - every failure must reach the server as a reason
        log.error("pruning job failed: %s", traceback.format_exc())
        return Message(Error(code=1, reason=f"{type(err).__name__}: {err}"), reply_to=msg)
    log.info("round %d: sending %d bytes after %.1fs", job.round, len(blob), metrics["seconds"])
    payload = Array(dtype="uint8", shape=(len(blob),), stype="safetensors", data=blob)
    content = RecordDict(
        {"payload": ArrayRecord({"payload": payload}), "metrics": MetricRecord(metrics)}
    )
    return Message(content, reply_to=msg)
