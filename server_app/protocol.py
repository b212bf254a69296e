"""The messages between the ServerApp and the ClientApp, in one place: record keys and the
raw-bytes arrays that carry payloads (no numpy round trip, no pickling). Both apps and the tests
build and read messages only through these functions."""

from __future__ import annotations

from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from pruning.federated import Job
from pruning.parts import Manifest

JOB = "config"  # ConfigRecord, server -> client: the job (or, in a query, the model's size)
GLOBAL = "global"  # ArrayRecord, server -> client: aggregated layers the job builds on
PAYLOAD = "payload"  # ArrayRecord, client -> server: the sparse payload
METRICS = "metrics"  # MetricRecord, client -> server: the job's figures
RESOURCES = "resources"  # MetricRecord, client -> server: what the node can take on
PARTS = "parts"  # ConfigRecord, client -> server: a payload left on the node (its Manifest)
BLOB = "payload"  # the key of the one bytes Array inside GLOBAL, PAYLOAD and a part
FETCH = "fetch"  # the query action that asks a node for one part of such a payload


def bytes_record(blob: bytes) -> ArrayRecord:
    """Raw safetensors bytes as a Flower record."""
    return ArrayRecord(
        {BLOB: Array(dtype="uint8", shape=(len(blob),), stype="safetensors", data=blob)}
    )


def record_bytes(record: ArrayRecord) -> bytes:
    return record[BLOB].data


def query_message(node: int, num_layers: int, ttl: float) -> Message:
    content = RecordDict({JOB: ConfigRecord({"num-layers": num_layers})})
    return Message(
        content, dst_node_id=node, message_type=MessageType.QUERY, group_id="resources", ttl=ttl
    )


def job_message(node: int, job: Job, downlink: bytes | None, ttl: float) -> Message:
    records: dict = {JOB: ConfigRecord(job.to_config())}
    if downlink:
        records[GLOBAL] = bytes_record(downlink)
    return Message(
        RecordDict(records),
        dst_node_id=node,
        message_type=MessageType.TRAIN,
        group_id=str(job.round),
        ttl=ttl,
    )


def read_job(msg: Message) -> tuple[Job, bytes | None]:
    down = msg.content.array_records.get(GLOBAL)
    return Job.from_config(dict(msg.content.config_records[JOB])), record_bytes(
        down
    ) if down else None


def resources_reply(msg: Message, resources: dict) -> Message:
    return Message(RecordDict({RESOURCES: MetricRecord(resources)}), reply_to=msg)


def read_resources(reply: Message) -> dict:
    return dict(reply.content.metric_records.get(RESOURCES, MetricRecord()))


def payload_reply(msg: Message, blob: bytes, metrics: dict) -> Message:
    return Message(
        RecordDict({PAYLOAD: bytes_record(blob), METRICS: MetricRecord(metrics)}), reply_to=msg
    )


def parts_reply(msg: Message, manifest: Manifest, metrics: dict) -> Message:
    """The answer to a job whose payload is too large for one message: fetch it in parts."""
    content = {PARTS: ConfigRecord(manifest.to_config()), METRICS: MetricRecord(metrics)}
    return Message(RecordDict(content), reply_to=msg)


def fetch_message(node: int, manifest: Manifest, index: int, ttl: float) -> Message:
    content = RecordDict({JOB: ConfigRecord({**manifest.to_config(), "index": index})})
    message_type = f"{MessageType.QUERY}.{FETCH}"
    return Message(content, dst_node_id=node, message_type=message_type, group_id=FETCH, ttl=ttl)


def read_fetch(msg: Message) -> tuple[Manifest, int]:
    config = dict(msg.content.config_records[JOB])
    return Manifest.from_config(config), int(config["index"])


def part_reply(msg: Message, data: bytes) -> Message:
    return Message(RecordDict({PAYLOAD: bytes_record(data)}), reply_to=msg)


def read_part(reply: Message) -> bytes:
    """The bytes of a part; ``ValueError`` with the reason if the node could not send it."""
    if reply.has_error():
        raise ValueError(reply.error.reason)
    return record_bytes(reply.content.array_records[PAYLOAD])


def error_reply(msg: Message, reason: str) -> Message:
    return Message(Error(code=1, reason=reason), reply_to=msg)


def read_payload(reply: Message) -> tuple[bytes | Manifest | None, str | None, dict]:
    """``(payload bytes or the manifest of its parts, error reason, metrics)`` of a train
    reply; ``None`` if it carries neither."""
    if reply.has_error():
        return None, reply.error.reason, {}
    metrics = dict(reply.content.metric_records.get(METRICS, MetricRecord()))
    if PARTS in reply.content.config_records:
        try:
            return Manifest.from_config(dict(reply.content.config_records[PARTS])), None, metrics
        except (KeyError, TypeError, ValueError) as err:
            return None, f"unreadable parts manifest: {err}", metrics
    record = reply.content.array_records.get(PAYLOAD)
    blob = record_bytes(record) if record is not None and BLOB in record else None
    return blob, None, metrics
