"""The run directory as a checkpoint: what an interrupted run needs to go on (``resume``).

After every round the server has written, in its run directory,

* ``checkpoint/layer-<i>.round-<r>.safetensors``: layer ``i`` as merged in round ``r``, a sparse
  payload (role ``global``) in the model's own dtype, so its values read back bit for bit;
* ``state.json``: the run config and the run state (rounds, assignments, budgets, done layers,
  bytes).

Every file is written under a temporary name and renamed, the layers before the state, so
``state.json`` never names a layer file that is incomplete. Once it is written, the older
versions of that round's layers are deleted: the folder holds one version of each merged layer
(plus, while a round is merged, that round's new ones). A layer is written as soon as it is
merged, so the server never holds more than one encoded layer.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from .config import ConfigError, RunConfig

STATE = "state.json"
LAYERS = "checkpoint"
# keys a resume may change: where files are, how long to wait, how many rounds at most, what is
# evaluated for the report; none of them changes a merged weight
HARMLESS = frozenset(
    {
        "resume",
        "out-dir",
        "data-dir",
        "round-timeout",
        "max-message-mb",
        "node-wait-timeout",
        "min-nodes",
        "num-server-rounds",
        "eval-data",
        "eval-max-windows",
        "eval-dense",
    }
)
# tests only: the server stops right after writing the checkpoint of this round, as a crash
# there would, so a resume can be tested at a known point
STOP_AFTER_ROUND = "FEDSPALLM_STOP_AFTER_ROUND"
_LAYER_FILE = re.compile(r"layer-(\d+)\.round-(\d+)\.safetensors")


class ResumeError(RuntimeError):
    """A run directory that cannot be continued; ``reason`` is a stable code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"cannot resume ({reason}): {detail}")
        self.reason, self.detail = reason, detail


class Stopped(RuntimeError):
    """The run stopped after the round named by ``$FEDSPALLM_STOP_AFTER_ROUND``."""


def _write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """``write(file)`` to ``path`` atomically: a reader finds the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as fh:
        write(fh)
    os.replace(tmp, path)


class Checkpoint:
    """``state.json`` and ``checkpoint/`` of one run directory."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def layer_path(self, layer: int, rnd: int) -> Path:
        return self.out / LAYERS / f"layer-{layer}.round-{rnd}.safetensors"

    def write_layer(self, layer: int, rnd: int, write: Callable[[BinaryIO], object]) -> None:
        """Save a merged layer; ``write(file)`` writes its payload."""
        _write(self.layer_path(layer, rnd), write)

    def write_state(self, cfg: RunConfig, state: dict, last: dict[int, int]) -> None:
        """Save the state after a round; ``last`` (layer -> round of its last merge) names the
        layer versions it builds on, and every other version is deleted."""
        data = json.dumps({"config": cfg.values(), **state}, indent=1).encode()
        _write(self.out / STATE, lambda fh: fh.write(data))
        self.keep(last)

    def keep(self, last: dict[int, int]) -> None:
        """Delete every layer file but the versions ``last`` names (and temporary files)."""
        folder = self.out / LAYERS
        for path in folder.iterdir() if folder.is_dir() else ():
            match = _LAYER_FILE.fullmatch(path.name)
            if not match or last.get(int(match[1])) != int(match[2]):
                path.unlink()

    def drop_layers(self) -> None:
        """Remove the layer files (at the end of a run, once ``model/`` holds the layers)."""
        shutil.rmtree(self.out / LAYERS, ignore_errors=True)

    def read_state(self, cfg: RunConfig) -> dict:
        """The saved state, if ``cfg`` may continue it: every key outside :data:`HARMLESS`
        must equal the saved run's (a changed one would make the rounds done and the rounds
        to come parts of two different runs)."""
        path = self.out / STATE
        try:
            data = json.loads(path.read_text())
            saved = RunConfig.parse(data["config"])
        except FileNotFoundError:
            raise ResumeError("no-state", f"{path} does not exist") from None
        except (ValueError, KeyError, TypeError, ConfigError) as err:
            raise ResumeError("state", f"{path} is unreadable: {err!r}") from None
        old, new = saved.values(), cfg.values()
        changed = [k for k in new if k not in HARMLESS and old[k] != new[k]]
        if changed:
            detail = ", ".join(f"{k} (saved {old[k]!r}, now {new[k]!r})" for k in changed)
            raise ResumeError("config", f"the run config differs from the saved run's: {detail}")
        return data

    def layer(self, layer: int, rnd: int) -> Path:
        path = self.layer_path(layer, rnd)
        if not path.is_file():
            raise ResumeError("checkpoint", f"{path} is missing")
        return path
