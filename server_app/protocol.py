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

JOB = "config"  # ConfigRecord, server -> client: the job (or, in a query, the model's size)
GLOBAL = "global"  # ArrayRecord, server -> client: aggregated layers the job builds on
PAYLOAD = "payload"  # ArrayRecord, client -> server: the sparse payload
METRICS = "metrics"  # MetricRecord, client -> server: the job's figures
RESOURCES = "resources"  # MetricRecord, client -> server: what the node can take on
BLOB = "payload"  # the key of the one bytes Array inside GLOBAL and PAYLOAD


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


def error_reply(msg: Message, reason: str) -> Message:
    return Message(Error(code=1, reason=reason), reply_to=msg)


def read_payload(reply: Message) -> tuple[bytes | None, str | None, dict]:
    """``(payload bytes, error reason, metrics)`` of a train reply; bytes ``None`` if absent."""
    if reply.has_error():
        return None, reply.error.reason, {}
    record = reply.content.array_records.get(PAYLOAD)
    blob = record_bytes(record) if record is not None and BLOB in record else None
    return blob, None, dict(reply.content.metric_records.get(METRICS, MetricRecord()))
