"""Payloads too large for one message: left on the node, fetched part by part.

A Flower message is held whole, several times over, by the process that receives it (about 4x
its size, docs/benchmarks.md), and a SuperLink with a SQLite state locks up while it stores a
message of a GiB. So a client whose payload exceeds ``max-message-mb`` writes it to a file on
its own disk (:class:`PartStore`) and answers the job with a :class:`Manifest`; the server then
asks for each part with one message and appends it to its spool file. The parts are byte
ranges of the same safetensors file, so the payload and all its checks stay as they are.
"""

from __future__ import annotations

import hashlib
import math
import re
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

_KEY = re.compile(r"[0-9a-f]{1,128}")


@dataclass(frozen=True)
class Manifest:
    """What a client says about a payload it keeps for the server to fetch."""

    key: str  # names the file on the node (random hex)
    size: int  # bytes in all
    part_bytes: int  # bytes per part (the last may be shorter)
    sha256: str

    @property
    def count(self) -> int:
        return math.ceil(self.size / self.part_bytes)

    def part_size(self, index: int) -> int:
        return min(self.part_bytes, self.size - index * self.part_bytes)

    def to_config(self) -> dict:
        return asdict(self)

    @classmethod
    def from_config(cls, config: dict) -> Manifest:
        manifest = cls(
            str(config["key"]), int(config["size"]), int(config["part_bytes"]), config["sha256"]
        )
        if manifest.size < 1 or manifest.part_bytes < 1 or not _KEY.fullmatch(manifest.key):
            raise ValueError(f"bad manifest {manifest}")
        return manifest


@dataclass(frozen=True)
class Parts:
    """A payload to fetch: its manifest and how to get part ``i`` (the strategy's messages)."""

    manifest: Manifest
    fetch: Callable[[int], bytes]


class PartStore:
    """A node's payloads waiting to be fetched, one file each; a file goes with its last part."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or Path(tempfile.gettempdir()) / "fedspallm-parts"

    def _path(self, key: str) -> Path:
        if not _KEY.fullmatch(key):
            raise ValueError(f"bad part key {key!r}")
        return self.root / f"{key}.safetensors"

    def new(self) -> tuple[str, Path]:
        """A fresh key and the path to write its payload to (then :meth:`seal` it)."""
        key = uuid.uuid4().hex
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        return key, path

    def seal(self, key: str, part_bytes: int) -> Manifest:
        """The manifest of a written payload (its hash read back in chunks, not held whole)."""
        digest, path = hashlib.sha256(), self._path(key)
        with path.open("rb") as fh:
            while chunk := fh.read(2**24):
                digest.update(chunk)
        return Manifest(key, path.stat().st_size, part_bytes, digest.hexdigest())

    def put(self, blob: bytes, part_bytes: int) -> Manifest:
        key, path = self.new()
        path.write_bytes(blob)
        return self.seal(key, part_bytes)

    def part(self, manifest: Manifest, index: int) -> bytes:
        """Part ``index`` of a stored payload; the file is removed once the last is read."""
        if not 0 <= index < manifest.count:
            raise ValueError(f"part {index} of {manifest.count}")
        path = self._path(manifest.key)
        with path.open("rb") as fh:
            fh.seek(index * manifest.part_bytes)
            data = fh.read(manifest.part_size(index))
        if index == manifest.count - 1:
            path.unlink()
        return data
