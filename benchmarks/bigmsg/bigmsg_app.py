"""ServerApp and ClientApp that move one large bytes ``Array`` each way through a SuperLink.

The payload is random bytes (nothing on the way compresses it) and its SHA-256 travels next to
it, so the receiver proves it got every byte. The ServerApp writes its timings to ``result``.
"""

from __future__ import annotations

import hashlib
import json
import time

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

MIB = 2**20
client = ClientApp()
server = ServerApp()


def _blob(mib: int, seed: int) -> tuple[bytes, str]:
    data = np.random.default_rng(seed).bytes(mib * MIB)
    return data, hashlib.sha256(data).hexdigest()


def _record(data: bytes) -> ArrayRecord:
    return ArrayRecord({"blob": Array(dtype="uint8", shape=(len(data),), stype="raw", data=data)})


@client.train()
def reply(msg: Message, context: Context) -> Message:
    """Check the downlink (if any), then answer with ``up-mib`` MiB of random bytes."""
    job = msg.content.config_records["job"]
    down = msg.content.array_records.get("down")
    ok = down is None or hashlib.sha256(down["blob"].data).hexdigest() == job["sha256"]
    start = time.perf_counter()
    data, digest = _blob(int(job["up-mib"]), 1)
    info = {"sha256": digest, "down-ok": ok, "build-s": time.perf_counter() - start}
    return Message(RecordDict({"up": _record(data), "info": ConfigRecord(info)}), reply_to=msg)


@server.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    while not (nodes := list(grid.get_node_ids())):
        time.sleep(0.5)
    job = {"up-mib": int(cfg["up-mib"]), "sha256": ""}
    records: dict = {}
    if int(cfg["down-mib"]):
        data, job["sha256"] = _blob(int(cfg["down-mib"]), 2)
        records["down"] = _record(data)
        del data
    records["job"] = ConfigRecord(job)
    msg = Message(
        RecordDict(records), dst_node_id=nodes[0], message_type=MessageType.TRAIN, ttl=3600
    )
    start = time.perf_counter()
    (msg_id,) = grid.push_messages([msg])
    pushed = time.perf_counter()
    del msg, records
    replies: list[Message] = []
    while not replies:
        replies = list(grid.pull_messages([msg_id]))
        if not replies:
            time.sleep(0.2)
    pulled = time.perf_counter()
    (answer,) = replies
    if answer.has_error():
        raise RuntimeError(f"the ClientApp failed: {answer.error.reason}")
    info = dict(answer.content.config_records["info"])
    blob = answer.content.array_records["up"]["blob"].data
    result = {
        "up_bytes": len(blob),
        "up_sha256_ok": hashlib.sha256(blob).hexdigest() == info["sha256"],
        "down_ok": info["down-ok"],
        "push_s": pushed - start,
        "round_trip_s": pulled - start,
        "client_build_s": info["build-s"],
    }
    with open(cfg["result"], "w") as fh:
        json.dump(result, fh)
