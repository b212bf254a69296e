"""Calibration windows and evaluation token streams (the SparseGPT protocol).

A *source* is a local file (``.txt``, ``.jsonl`` with a text field, ``.parquet``) or a corpus
name (``wikitext2``, ``ptb``, ``c4``) loaded from the Hugging Face Hub. Texts are joined the way
SparseGPT does: WikiText rows with ``"\\n\\n"``, PTB sentences with ``" "``. A local ``.txt`` file
is read one row per line (empty lines dropped) and joined with ``" "`` when its name contains
``ptb``, else with ``"\\n\\n"``.

Calibration draws ``nsamples`` windows of ``seqlen`` tokens at seeded random offsets. For the
federated simulation one corpus is cut into ``num_partitions`` contiguous token shards and each
client draws from its own shard only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

# name -> (hub dataset id, config, text field, joiner, calibration split, evaluation split)
HUB_CORPORA = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "text", "\n\n", "train", "test"),
    "ptb": ("ptb_text_only", "penn_treebank", "sentence", " ", "train", "test"),
    "c4": ("allenai/c4", "en", "text", " ", "train", "validation"),
}


class DataError(ValueError):
    """A calibration or evaluation source that cannot be read or is too small."""


def data_dir(root: str | Path | None = None) -> Path:
    """Local corpora folder: ``root`` when given (the run config's ``data-dir``), else
    ``$FEDSPALLM_DATA`` (CI points it at ``../shared/data``), else ``./data``."""
    return Path(root) if root else Path(os.environ.get("FEDSPALLM_DATA", "data"))


def _resolve_path(source: str, root: str | Path | None = None) -> Path | None:
    """A local file for ``source``, also relative to :func:`data_dir`; ``None`` if not a path."""
    for candidate in (Path(source).expanduser(), data_dir(root) / source):
        if candidate.is_file():
            return candidate
    return None


def _read_rows(path: Path, field: str) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        with path.open(encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)[field]
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    raise DataError(f"{path}:{n}: no JSON object with field {field!r}") from err
                if not isinstance(value, str):
                    raise DataError(f"{path}:{n}: field {field!r} is not a string")
                rows.append(value)
        return rows
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if field not in table.column_names:
            raise DataError(f"{path}: no column {field!r} (columns: {table.column_names})")
        return [str(t) for t in table.column(field).to_pylist() if t]
    try:
        return [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text") from err


def check_source(source: str, root: str | Path | None = None) -> None:
    """Fail fast on a source that is neither a local file nor a known corpus name, so that a typo
    is reported before a large model is loaded."""
    if _resolve_path(source, root) is None and source not in HUB_CORPORA:
        raise DataError(
            f"{source!r} is neither a readable file nor a corpus name ({', '.join(HUB_CORPORA)})"
        )


def load_text(
    source: str, split: str = "calibration", field: str = "text", root: str | Path | None = None
) -> str:
    """The whole text of ``source`` joined by its corpus convention."""
    path = _resolve_path(source, root)
    if path is not None:
        rows = [r for r in _read_rows(path, field) if r.strip()]
        return (" " if "ptb" in path.name.lower() else "\n\n").join(rows)
    check_source(source)
    hub_id, config, column, joiner, calib_split, eval_split = HUB_CORPORA[source]
    from datasets import load_dataset

    try:
        split_name = calib_split if split == "calibration" else eval_split
        ds = load_dataset(hub_id, config, split=split_name)
    except Exception as err:  # the hub raises many types (network, missing config, ...)
        raise DataError(f"cannot load {source!r} from the Hugging Face Hub: {err}") from err
    if source == "c4":  # SparseGPT uses a few thousand documents, not the whole corpus
        ds = ds.select(range(min(len(ds), 5000)))
    return joiner.join(ds[column])


def tokenize(text: str, tokenizer) -> torch.Tensor:
    """Token ids ``[T]`` of a long text, without the model-length warning."""
    ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids
    return ids[0]


def partition(tokens: torch.Tensor, index: int, count: int) -> torch.Tensor:
    """The ``index``-th of ``count`` contiguous, near-equal shards of a token stream."""
    if not 0 <= index < count:
        raise DataError(f"partition {index} outside 0..{count - 1}")
    # float64: float32 bounds lose tokens past 2**24 (e.g. the last one of 2**24 + 1)
    bounds = torch.linspace(0, tokens.numel(), count + 1, dtype=torch.float64).round().long()
    return tokens[bounds[index] : bounds[index + 1]]


def sample_windows(tokens: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """``[nsamples, seqlen]`` windows at seeded uniform random offsets."""
    if tokens.numel() <= seqlen:
        raise DataError(f"{tokens.numel()} tokens cannot give windows of {seqlen} tokens")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seqlen, (nsamples,), generator=gen)
    return torch.stack([tokens[s : s + seqlen] for s in starts.tolist()])


def get_calibration(
    source: str,
    tokenizer,
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    partition_id: int = 0,
    num_partitions: int = 1,
    field: str = "text",
    root: str | Path | None = None,
) -> torch.Tensor:
    """Calibration windows ``[nsamples, seqlen]`` drawn from one partition of ``source``."""
    tokens = tokenize(load_text(source, "calibration", field, root), tokenizer)
    shard = partition(tokens, partition_id, num_partitions)
    return sample_windows(shard, nsamples, seqlen, seed)


def get_eval_tokens(
    source: str, tokenizer, field: str = "text", root: str | Path | None = None
) -> torch.Tensor:
    """The evaluation token stream ``[1, T]`` of ``source`` (its test split for hub corpora)."""
    return tokenize(load_text(source, "evaluation", field, root), tokenizer)[None, :]
