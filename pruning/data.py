"""Calibration windows and evaluation token streams (the SparseGPT protocol).

A *source* is a local file (``.txt``, ``.jsonl`` with a text field, ``.parquet``) or a corpus
name (``wikitext2``, ``ptb``, ``c4``). A path is tried as given, then under :func:`data_dir`. A
corpus name resolves to its local file under :func:`data_dir` when that folder holds it (the
layout of :data:`CORPORA`, so machines without network access run the same defaults), else to
the Hugging Face Hub with the splits SparseGPT uses (train for calibration; test for
evaluation, validation for C4). Texts are joined the way SparseGPT does: WikiText rows with
``"\\n\\n"``, PTB sentences and C4 documents with ``" "``. A local ``.txt`` file is read one row
per line (empty lines dropped) and joined with ``" "`` when its name contains ``ptb``, else with
``"\\n\\n"``.

Calibration draws ``nsamples`` windows of ``seqlen`` tokens at seeded random offsets. For the
federated simulation one corpus is cut into ``num_partitions`` contiguous token shards and each
client draws from its own shard only.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

ROLES = ("calibration", "evaluation")


@dataclass(frozen=True)
class Corpus:
    """Where a named corpus is read from: a local file per role, else a hub dataset."""

    local: dict[str, str]  # role -> path under the data folder
    hub_id: str
    hub_config: str | None
    hub_split: dict[str, str]  # role -> split
    column: str
    joiner: str
    hub_files: dict[str, str] | None = None  # split -> data file (C4: one shard, not the corpus)
    max_rows: dict[str, int] | None = None  # role -> rows kept from the hub split (None: all)


CORPORA = {
    "wikitext2": Corpus(
        local={
            "calibration": "wikitext2/wiki.valid.tokens",
            "evaluation": "wikitext2/wiki.test.raw",
        },
        hub_id="Salesforce/wikitext",
        hub_config="wikitext-2-raw-v1",
        hub_split={"calibration": "train", "evaluation": "test"},
        column="text",
        joiner="\n\n",
    ),
    "ptb": Corpus(
        local={"calibration": "ptb/ptb.valid.txt", "evaluation": "ptb/ptb.test.txt"},
        hub_id="ptb-text-only/ptb_text_only",
        hub_config="penn_treebank",
        hub_split={"calibration": "train", "evaluation": "test"},
        column="sentence",
        joiner=" ",
    ),
    "c4": Corpus(  # SparseGPT reads the first shard of each split, and 1100 validation documents
        local={"calibration": "c4/c4-train.jsonl", "evaluation": "c4/c4-validation.jsonl"},
        hub_id="allenai/c4",
        hub_config=None,
        hub_split={"calibration": "train", "evaluation": "validation"},
        column="text",
        joiner=" ",
        hub_files={
            "train": "en/c4-train.00000-of-01024.json.gz",
            "validation": "en/c4-validation.00000-of-00008.json.gz",
        },
        max_rows={"calibration": 5000, "evaluation": 1100},
    ),
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


def hub_rows(corpus: Corpus, role: str) -> list[str]:
    """The rows of a corpus's hub split (needs network access or the datasets cache).

    The hub client's per-retry warnings are muted: a failure is reported once, by the caller.
    """
    from datasets import load_dataset

    split = corpus.hub_split[role]
    files = {split: corpus.hub_files[split]} if corpus.hub_files else None
    log.info(
        "reading %s split %r from the Hugging Face Hub (cached after the first time)",
        corpus.hub_id,
        split,
    )
    loggers = [logging.getLogger(name) for name in ("huggingface_hub", "datasets")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        ds = load_dataset(corpus.hub_id, corpus.hub_config, data_files=files, split=split)
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
    if corpus.max_rows:
        ds = ds.select(range(min(len(ds), corpus.max_rows[role])))
    return list(ds[corpus.column])


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
    if _resolve_path(source, root) is None and source not in CORPORA:
        raise DataError(
            f"{source!r} is neither a readable file nor a corpus name ({', '.join(CORPORA)})"
        )


def _folder(root: str | Path | None) -> str:
    """The data folder as the user set it, for error messages."""
    if root:
        return f"data-dir {root}"
    env = os.environ.get("FEDSPALLM_DATA")
    return f"FEDSPALLM_DATA={env}" if env else "FEDSPALLM_DATA (unset, so ./data)"


def load_text(
    source: str, split: str = "calibration", field: str = "text", root: str | Path | None = None
) -> str:
    """The whole text of ``source`` joined by its corpus convention; ``split`` is the role,
    ``calibration`` or ``evaluation``, which picks a corpus's file or hub split."""
    if split not in ROLES:
        raise DataError(f"split {split!r} is not one of {', '.join(ROLES)}")
    path = _resolve_path(source, root)
    if path is not None:
        rows = [r for r in _read_rows(path, field) if r.strip()]
        return (" " if "ptb" in path.name.lower() else "\n\n").join(rows)
    check_source(source)
    corpus = CORPORA[source]
    local = data_dir(root) / corpus.local[split]
    if local.is_file():
        return corpus.joiner.join(r for r in _read_rows(local, "text") if r.strip())
    try:
        rows = hub_rows(corpus, split)
    except Exception as err:  # the hub raises many types (network, missing config, ...)
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        raise DataError(
            f"corpus {source!r}: no {corpus.local[split]} under {_folder(root)}, and the Hugging "
            f"Face Hub failed ({type(err).__name__}: {reason}); point FEDSPALLM_DATA at a folder "
            "holding that file, or give a file path"
        ) from None  # the reason is in the message; the hub client's traceback only hides it
    return corpus.joiner.join(rows)  # as SparseGPT: every row, empty ones included


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
