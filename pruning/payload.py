"""Sparse safetensors codec for pruned decoder layers, used by both the client and the server.

One codec on both sides means a client can never send what the server cannot read. Each weight
matrix ``K`` travels as three tensors, modelled on compressed-tensors' ``sparse-bitmask`` layout:

* ``K.shape``   int64 ``[ndim]``: the dense shape;
* ``K.bitmask`` uint8 ``[rows, ceil(cols / 8)]``: bit ``j`` (little-endian) of byte ``b`` in a row
  is set when column ``8 * b + j`` is kept (``rows`` = product of all but the last dimension);
* ``K.values``  original dtype ``[nnz]``: the kept values in row-major order.

Row offsets are not stored: they follow from the bitmask and would be one more field that can
disagree with it. A fused expert tensor ``[experts, out, in]`` travels the same way (its rows are
the experts' rows, one after another); the metadata's ``expert_tokens`` then gives, per such
key, how many calibration tokens the client's router sent to each expert. At 50 % sparsity in
fp16 this costs 1 + 1/8 bytes per weight instead of 2.

A ``refine`` payload answers a job that fixed the masks (the server's merged ones), so it carries
no bitmask: its values are read against the receiver's own masks (:attr:`Expected.masks`). That
saves the bits and means a refine payload cannot move a mask.

The file-level safetensors metadata carries the :class:`PayloadMeta` fields as strings. Decoding
never unpickles; everything it rejects raises :class:`PayloadError` with a stable ``reason``.
"""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import safetensors.torch
import torch

from pruning.sparsity import SparsityError, as_int, parse_pattern

FORMAT = "fedspallm-sparse-bitmask"
# 2: explicit ``role`` (was ``pruner="global"``); 3: maskless refine payloads; 4: expert_tokens
FORMAT_VERSION = 4
ROLES = ("update", "global")  # a client's pruned layers; aggregated layers sent by the server
_PARTS = {"shape": "shape", "bitmask": "bitmask", "values": "value-count"}  # -> reason if absent
MASKLESS_PHASE = "refine"  # a job with fixed masks: its payload carries values and shapes only
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
DENSITY_SLACK = 0.05  # tolerated kept fraction above 1 - sparsity, per tensor
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.")


def layer_index(key: str) -> int | None:
    """Decoder-layer index of a state_dict key (``model.layers.3.…``, ``transformer.h.3.…``)."""
    match = _LAYER_RE.search(key)
    return int(match.group(1)) if match else None


def tensor_name(key: str) -> str:
    """A key without its layer prefix: the same name in every layer (``mlp.up_proj.weight``)."""
    match = _LAYER_RE.search(key)
    return key[match.end() :] if match else key


class PayloadError(ValueError):
    """A payload the receiver refuses; ``reason`` is a stable code for logs and tests."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class PayloadMeta:
    """What the sender claims about a payload; the receiver checks it against its own plan."""

    round: int
    layers: list[int]
    sparsity: float
    pattern: str = ""  # "" (unstructured) or "N:M"
    pruner: str = ""  # e.g. "sparsegpt"; "" for aggregated layers
    calib_tokens: int = 0
    role: str = "update"  # one of ROLES
    phase: str = "prune"  # the job's phase: "prune" (own mask) or "refine" (server's mask)
    # per fused expert tensor ``[experts, out, in]``: calibration tokens routed to each expert
    # (the server weights this client's expert by it; 0: the client does not vote on it)
    expert_tokens: dict[str, list[int]] = field(default_factory=dict)

    def to_strings(self) -> dict[str, str]:
        """safetensors metadata must be ``str -> str``."""
        fields = {
            k: json.dumps(v) if k in ("layers", "expert_tokens") else str(v)
            for k, v in asdict(self).items()
        }
        return {"format": FORMAT, "format_version": str(FORMAT_VERSION), **fields}

    @classmethod
    def from_strings(cls, meta: Mapping[str, str]) -> PayloadMeta:
        """Parse and sanity-check the metadata of a received payload."""
        if meta.get("format") != FORMAT or "format_version" not in meta:
            raise PayloadError(
                "metadata", f"not a {FORMAT} payload (format={meta.get('format')!r})"
            )
        if meta["format_version"] != str(FORMAT_VERSION):
            raise PayloadError(
                "version", f"format version {meta['format_version']!r}, expected {FORMAT_VERSION}"
            )
        try:
            out = cls(
                round=int(meta["round"]),
                layers=[int(i) for i in json.loads(meta["layers"])],
                sparsity=float(meta["sparsity"]),
                pattern=meta["pattern"],
                pruner=meta["pruner"],
                calib_tokens=int(meta["calib_tokens"]),
                role=meta["role"],
                phase=meta["phase"],
                expert_tokens=_expert_tokens(json.loads(meta["expert_tokens"])),
            )
            parse_pattern(out.pattern)
        except KeyError as err:
            raise PayloadError("metadata", f"missing field {err.args[0]!r}") from None
        except (ValueError, TypeError, SparsityError) as err:
            raise PayloadError("metadata", f"unparsable field: {err}") from None
        if out.role not in ROLES:
            raise PayloadError("metadata", f"role {out.role!r} is not one of {ROLES}")
        if not 0.0 <= out.sparsity < 1.0 or out.round < 0 or out.calib_tokens < 0:
            raise PayloadError("metadata", f"out of range: {out}")
        return out

    @property
    def parts(self) -> dict[str, str]:
        """The tensors of each key in this payload (-> the reason a missing one is refused)."""
        if self.phase == MASKLESS_PHASE:
            return {p: r for p, r in _PARTS.items() if p != "bitmask"}
        return _PARTS


def _expert_tokens(value) -> dict[str, list[int]]:
    """``{key: [tokens per expert]}`` as sent, or a ValueError."""
    if not isinstance(value, dict) or not all(
        isinstance(c, list) and all(isinstance(n, int) and n >= 0 for n in c)
        for c in value.values()
    ):
        raise ValueError(f"expert_tokens must map keys to lists of counts >= 0, got {value!r}")
    return value


@dataclass(frozen=True)
class SparseTensor:
    """One matrix in bitmask form; :meth:`unpack` materialises it only when asked."""

    shape: tuple[int, ...]
    bitmask: torch.Tensor
    values: torch.Tensor

    @classmethod
    def pack(cls, weight: torch.Tensor, mask: torch.Tensor) -> SparseTensor:
        """Bitmask and kept values of ``weight`` under its keep ``mask``."""
        _check_packable(weight, mask)
        keep = mask.detach().cpu().numpy()
        # numpy's boolean indexing streams (torch's masked_select builds an int64 prefix sum);
        # viewing as a same-width int also covers bfloat16, which numpy lacks
        raw = as_int(weight.detach().cpu().contiguous()).numpy()[keep]
        return cls(tuple(weight.shape), pack_bits(mask), torch.from_numpy(raw).view(weight.dtype))

    def mask(self) -> torch.Tensor:
        return unpack_bits(self.bitmask, self.shape)

    def unpack(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense weight (zero where pruned) and its keep mask."""
        mask = self.mask()
        dense = torch.zeros(self.shape, dtype=self.values.dtype).masked_scatter_(mask, self.values)
        return dense, mask


def _check_packable(weight: torch.Tensor, mask: torch.Tensor) -> None:
    if weight.dim() == 0 or mask.shape != weight.shape or mask.dtype != torch.bool:
        raise ValueError(f"need a bool mask of shape {tuple(weight.shape)} for a >=1-d weight")
    if weight.dtype not in FLOAT_DTYPES:
        raise ValueError(f"weights must be floating point, got {weight.dtype}")


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Row-major little-endian bitmask ``[rows, ceil(cols / 8)]`` of a bool keep mask."""
    keep = np.ascontiguousarray(mask.detach().cpu().numpy())  # a transposed view's mask, too
    return torch.from_numpy(
        np.packbits(keep.reshape(-1, mask.shape[-1]), axis=-1, bitorder="little")
    )


def unpack_bits(bits: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The bool keep mask of ``shape`` that :func:`pack_bits` packed into ``bits``."""
    keep = np.unpackbits(bits.numpy(), axis=-1, count=shape[-1], bitorder="little")
    return torch.from_numpy(keep).view(torch.bool).reshape(shape)


@dataclass(frozen=True)
class PackedMask:
    """A keep mask at one bit per weight (the payload's bitmask layout): a client that prunes
    many layers holds their masks in an eighth of the bool tensors' memory."""

    shape: tuple[int, ...]
    bits: torch.Tensor

    @classmethod
    def pack(cls, mask: torch.Tensor) -> PackedMask:
        return cls(tuple(mask.shape), pack_bits(mask))

    def unpack(self) -> torch.Tensor:
        return unpack_bits(self.bits, self.shape)


class LazyMap(Mapping[str, torch.Tensor]):
    """Read-only mapping that builds one tensor per lookup (``get(key)``): K clients' payloads
    stay sparse, and a writer of many matrices holds one at a time."""

    def __init__(self, keys: Iterable[str], get: Callable[[str], torch.Tensor]):
        self._keys, self._get = dict.fromkeys(keys), get  # ordered, O(1) membership

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        return self._get(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


@dataclass(frozen=True)
class Decoded:
    """A validated payload. ``weights``/``masks`` materialise a dense tensor per lookup."""

    meta: PayloadMeta
    sparse: dict[str, SparseTensor]

    @property
    def weights(self) -> Mapping[str, torch.Tensor]:
        return LazyMap(self.sparse, lambda k: self.sparse[k].unpack()[0])

    @property
    def masks(self) -> Mapping[str, torch.Tensor]:
        return LazyMap(self.sparse, lambda k: self.sparse[k].mask())

    @property
    def keys(self) -> list[str]:
        return list(self.sparse)

    def update(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weight, mask)`` of one key, unpacking the bitmask once (a merge's input)."""
        return self.sparse[key].unpack()


@dataclass(frozen=True)
class Expected:
    """What the receiver planned; every field left ``None`` skips that check."""

    shapes: dict[str, tuple[int, ...]]  # every prunable key of the model
    layers: set[int] | None = None  # layers assigned to this sender this round
    dtype: torch.dtype | None = None
    sparsity: float | None = None
    density_slack: float = DENSITY_SLACK
    max_bytes: int | None = None
    # the job it answers: another round is a replay, other settings a misdirected payload
    round: int | None = None
    pattern: str | None = None
    pruner: str | None = None
    role: str | None = None
    phase: str | None = None
    # the receiver's keep mask of a key: what a maskless (refine) payload's values fill
    masks: Callable[[str], torch.Tensor] | None = None

    def check_meta(self, meta: PayloadMeta) -> PayloadMeta:
        """The payload must answer this job: same round, role and pruning settings."""
        if self.round is not None and meta.round != self.round:
            raise PayloadError(
                "stale-round", f"payload of round {meta.round}, expected {self.round}"
            )
        if self.role is not None and meta.role != self.role:
            raise PayloadError("role", f"a {meta.role!r} payload, expected {self.role!r}")
        if self.phase is not None and meta.phase != self.phase:
            raise PayloadError("phase", f"a {meta.phase!r} payload, expected {self.phase!r}")
        claimed = (meta.sparsity, meta.pattern, meta.pruner)
        wanted = (self.sparsity, self.pattern, self.pruner)
        for name, got, want in zip(("sparsity", "pattern", "pruner"), claimed, wanted, strict=True):
            if want is not None and got != want:
                raise PayloadError("settings", f"{name} {got!r}, the job asked for {want!r}")
        return meta


_ST_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.uint8: "U8",
}


def write_payload(
    out: BinaryIO,
    weights: Mapping[str, torch.Tensor],
    meta: PayloadMeta,
    masks: Mapping[str, torch.Tensor] | None = None,
) -> int:
    """Write pruned weights (mask defaults to ``weight != 0``) to ``out`` as safetensors, one
    matrix at a time, and return the bytes written.

    The header is computed from the masks alone (kept counts), so no more than one matrix's
    bitmask and values are ever in memory: a client can send a payload larger than its free
    RAM. Any safetensors reader parses the result (it is what :func:`decode_payload` reads).
    """

    def mask_of(key: str) -> torch.Tensor:
        return weights[key] != 0 if masks is None else masks[key]

    header: dict = {"__metadata__": meta.to_strings()}
    offset = 0
    for key, weight in weights.items():
        mask = mask_of(key)
        _check_packable(weight, mask)
        rows, row_bytes = math.prod(weight.shape[:-1]), (weight.shape[-1] + 7) // 8
        kept = int(mask.sum())
        layout = {
            "shape": ("I64", [weight.dim()], 8 * weight.dim()),
            "bitmask": ("U8", [rows, row_bytes], rows * row_bytes),
            "values": (_ST_DTYPES[weight.dtype], [kept], kept * weight.dtype.itemsize),
        }
        for part, (dtype, shape, size) in layout.items():
            if part in meta.parts:
                header[f"{key}.{part}"] = {
                    "dtype": dtype,
                    "shape": shape,
                    "data_offsets": [offset, offset + size],
                }
                offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # tensors start 8-byte aligned, as safetensors writes them
    out.write(len(raw).to_bytes(8, "little") + raw)
    for key, weight in weights.items():
        sparse = SparseTensor.pack(weight, mask_of(key))
        data = {
            "shape": np.asarray(sparse.shape, dtype="<i8"),
            "bitmask": sparse.bitmask.numpy(),
            "values": as_int(sparse.values).numpy(),
        }
        for part in (p for p in ("shape", "bitmask", "values") if p in meta.parts):
            out.write(np.ascontiguousarray(data[part]).tobytes())
    return 8 + len(raw) + offset


def encode_payload(
    weights: Mapping[str, torch.Tensor],
    meta: PayloadMeta,
    masks: Mapping[str, torch.Tensor] | None = None,
) -> bytes:
    """Pack pruned weights (mask defaults to ``weight != 0``) into safetensors bytes."""
    buffer = io.BytesIO()
    write_payload(buffer, weights, meta, masks)
    return buffer.getvalue()


def decode_payload(blob: bytes, expected: Expected | None = None) -> Decoded:
    """Parse and validate a payload held in memory; raise :class:`PayloadError` on the first
    problem found.

    Without ``expected`` only the payload's self-consistency is checked (format, bitmask versus
    value count, finite values); with it, also the model's names and shapes, this round's
    assignment, dtype, density and size.
    """
    _check_size(len(blob), expected)
    meta = _meta(_read_header(blob, len(blob)), expected)
    try:
        tensors = safetensors.torch.load(bytes(blob))
    except Exception as err:  # the Rust parser's errors have no common Python base class
        raise PayloadError("not-safetensors", str(err)) from None
    return Decoded(meta, dict(_checked_groups(tensors, tensors.__getitem__, meta, expected)))


class StoredPayload:
    """A validated payload file, read back one tensor at a time (the server's payload store).

    Opening it validates every tensor group in turn and keeps none of them, so checking and
    later merging never hold more than one matrix of one client in memory.
    """

    def __init__(self, path: Path, expected: Expected | None = None) -> None:
        self.path = Path(path)
        size = self.path.stat().st_size
        _check_size(size, expected)
        with self.path.open("rb") as fh:
            head = fh.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else 0
            head += fh.read(max(0, min(length, size - 8)))
        self.meta = _meta(_read_header(head, size), expected)
        self._masks = expected.masks if expected is not None else None
        with self._open() as f:
            names = list(f.keys())
        self.keys = [k for k, _ in _checked_groups(names, self._tensor, self.meta, expected)]

    def _open(self):
        try:
            return safetensors.safe_open(str(self.path), "pt")
        except Exception as err:  # the Rust parser's errors have no common Python base class
            raise PayloadError("not-safetensors", str(err)) from None

    def _tensor(self, name: str) -> torch.Tensor:
        """One tensor, read through a mapping of its own: a mapping left open over the whole
        file keeps every page read through it resident (the payload's size in the RSS)."""
        with self._open() as f:
            return f.get_tensor(name)

    def sparse(self, key: str) -> SparseTensor:
        parts = {p: self._tensor(f"{key}.{p}") for p in self.meta.parts}
        shape = tuple(parts["shape"].tolist())
        bits = parts["bitmask"] if "bitmask" in parts else pack_bits(self._masks(key))
        return SparseTensor(shape, bits, parts["values"])

    def update(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weight, mask)`` of one key, read from the file (a merge's source)."""
        return self.sparse(key).unpack()


def _meta(header: dict, expected: Expected | None) -> PayloadMeta:
    meta = PayloadMeta.from_strings(header.get("__metadata__") or {})
    return expected.check_meta(meta) if expected is not None else meta


def _check_size(size: int, expected: Expected | None) -> None:
    if expected is not None and expected.max_bytes is not None and size > expected.max_bytes:
        raise PayloadError("too-large", f"{size} bytes > limit {expected.max_bytes}")


def _checked_groups(
    names: Iterable[str],
    get: Callable[[str], torch.Tensor],
    meta: PayloadMeta,
    expected: Expected | None,
) -> Iterator[tuple[str, SparseTensor]]:
    """Validate each ``K.{shape,bitmask,values}`` group, reading its tensors only when due."""
    groups: dict[str, list[str]] = {}
    names = list(names)
    stray = sorted(set(meta.expert_tokens) - {n.rpartition(".")[0] for n in names})
    if stray:
        raise PayloadError("metadata", f"expert_tokens for tensors not in the payload: {stray[:3]}")
    for name in names:
        key, _, part = name.rpartition(".")
        if part not in meta.parts:
            raise PayloadError(
                "unknown-tensor", f"{name!r} is not one of {key}.{{{','.join(meta.parts)}}}"
            )
        groups.setdefault(key, []).append(part)
    if expected is not None:
        _check_assignment(set(groups), meta, expected)
    for key, parts in groups.items():
        try:
            tensors = {p: get(f"{key}.{p}") for p in parts}
        except Exception as err:  # a corrupt tensor in an otherwise parsable file
            raise PayloadError("not-safetensors", f"{key}: {err}") from None
        yield key, _check_tensor(key, tensors, meta, expected)


def _read_header(head: bytes, total: int) -> dict:
    """Parse the safetensors header ourselves to tell 'truncated' from 'not safetensors'.

    ``head`` holds at least the 8-byte length and the header; ``total`` is the whole size.
    """
    if total < 8:
        raise PayloadError("truncated", f"{total} bytes; the header length alone needs 8")
    size = int.from_bytes(head[:8], "little")
    if total > 8 and head[8:9] != b"{":
        raise PayloadError("not-safetensors", "no JSON header after the 8-byte length")
    if 8 + size > total:
        raise PayloadError("truncated", f"header claims {size} bytes, {total - 8} present")
    try:
        header = json.loads(head[8 : 8 + size])
        end = max(
            (v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0
        )
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as err:
        raise PayloadError("not-safetensors", f"bad header: {err}") from None
    if not isinstance(end, int):
        raise PayloadError("not-safetensors", f"bad data offsets in header: {end!r}")
    if end > total - 8 - size:
        raise PayloadError("truncated", f"data needs {end} bytes, {total - 8 - size} present")
    return header


def _check_tensor(
    key: str, parts: dict[str, torch.Tensor], meta: PayloadMeta, expected: Expected | None
) -> SparseTensor:
    """Validate one matrix group; order: names, shape, bitmask, values, then the plan."""
    for part, reason in meta.parts.items():
        if part not in parts:
            raise PayloadError(reason, f"{key}: no {part} tensor")
    shape_t, values = parts["shape"], parts["values"]
    if shape_t.dtype != torch.int64 or shape_t.dim() != 1 or not 0 < shape_t.numel() <= 8:
        raise PayloadError("shape", f"{key}: shape must be 1-8 int64, got {shape_t}")
    shape = tuple(shape_t.tolist())
    if min(shape) < 1:
        raise PayloadError("shape", f"{key}: non-positive dimension in {shape}")
    if expected is not None:
        if key not in expected.shapes:
            raise PayloadError("unknown-tensor", f"{key!r} is not a prunable tensor of this model")
        if shape != tuple(expected.shapes[key]):
            raise PayloadError("shape", f"{key}: {shape}, model has {tuple(expected.shapes[key])}")
    tokens = meta.expert_tokens.get(key)
    if tokens is not None and (len(shape) != 3 or len(tokens) != shape[0]):
        raise PayloadError("metadata", f"{key}: {len(tokens)} expert token counts for {shape}")
    layer = layer_index(key)
    if layer not in meta.layers:
        raise PayloadError("metadata", f"{key}: layer {layer} is not in the claimed {meta.layers}")
    if expected is not None and expected.layers is not None and layer not in expected.layers:
        raise PayloadError("unassigned-layer", f"{key}: layer {layer} was not assigned this round")

    cols = shape[-1]
    rows = math.prod(shape) // cols
    bits = parts["bitmask"] if "bitmask" in parts else _receiver_bits(key, shape, expected)
    if bits.dtype != torch.uint8 or tuple(bits.shape) != (rows, (cols + 7) // 8):
        raise PayloadError(
            "bitmask",
            f"{key}: want uint8 {(rows, (cols + 7) // 8)}, got {bits.dtype} {tuple(bits.shape)}",
        )
    if cols % 8 and bool((bits[:, -1] >> (cols % 8)).any()):
        raise PayloadError("bitmask", f"{key}: padding bits past column {cols} are set")
    if values.dtype not in FLOAT_DTYPES:
        raise PayloadError("dtype", f"{key}: values are {values.dtype}, not floating point")
    if expected is not None and expected.dtype is not None and values.dtype != expected.dtype:
        raise PayloadError("dtype", f"{key}: values are {values.dtype}, expected {expected.dtype}")
    kept = int(np.bitwise_count(bits.numpy()).sum(dtype=np.int64))
    if values.dim() != 1 or values.numel() != kept:
        raise PayloadError(
            "value-count", f"{key}: bitmask keeps {kept}, values has shape {tuple(values.shape)}"
        )
    # in blocks: a full-size bool temporary raises glibc's mmap threshold, and the heap then
    # keeps tens of MB per decoded client (measured in benchmarks/bench_core.py)
    if not all(torch.isfinite(values[i : i + 2**20]).all() for i in range(0, kept, 2**20)):
        raise PayloadError("non-finite", f"{key}: NaN or Inf among the kept values")
    if expected is not None and expected.sparsity is not None:
        limit = 1.0 - expected.sparsity + expected.density_slack
        if kept > limit * rows * cols:
            raise PayloadError(
                "density", f"{key}: keeps {kept / (rows * cols):.3f} of weights, limit {limit:.3f}"
            )
    return SparseTensor(shape, bits, values)


def _receiver_bits(key: str, shape: tuple[int, ...], expected: Expected | None) -> torch.Tensor:
    """The receiver's packed mask of ``key``, which a maskless payload's values fill."""
    if expected is None or expected.masks is None:
        raise PayloadError("bitmask", f"{key}: a refine payload is read against the job's masks")
    mask = expected.masks(key)
    if tuple(mask.shape) != shape or mask.dtype != torch.bool:
        raise PayloadError("bitmask", f"{key}: the receiver has no {shape} mask for it")
    return pack_bits(mask)


def _check_assignment(keys: set[str], meta: PayloadMeta, expected: Expected) -> None:
    """Claimed layers must be assigned and complete, so a layer is never half aggregated."""
    for layer in meta.layers:
        if expected.layers is not None and layer not in expected.layers:
            raise PayloadError("unassigned-layer", f"layer {layer} was not assigned this round")
        missing = sorted(k for k in expected.shapes if layer_index(k) == layer and k not in keys)
        if missing:
            raise PayloadError("missing-tensor", f"layer {layer} lacks {missing}")
