"""Calibration windows, client partitions and the local corpus readers (pruning/data.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from pruning import data
from pruning.data import (
    DataError,
    get_calibration,
    get_eval_tokens,
    load_text,
    partition,
    sample_windows,
    tokenize,
)

ROWS = ["first row", "", "second row", "   ", "third row"]


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """32 kB of WikiText-2: a few thousand tokens, tokenized in milliseconds."""
    text = (data_dir / "wikitext2" / "wiki.valid.tokens").read_text(encoding="utf-8")
    path = tmp_path_factory.mktemp("text") / "wiki-slice.txt"
    path.write_text(text[:32_768], encoding="utf-8")
    return path


def shards(tokens: torch.Tensor, count: int) -> list[torch.Tensor]:
    return [partition(tokens, i, count) for i in range(count)]


@settings(max_examples=60, deadline=None)
@given(length=st.integers(0, 500), count=st.integers(1, 12))
def test_partition_is_contiguous_balanced_and_covering(length: int, count: int) -> None:
    tokens = torch.arange(length)
    parts = shards(tokens, count)
    assert torch.equal(torch.cat(parts), tokens)
    sizes = [p.numel() for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_partition_covers_streams_beyond_float32_precision() -> None:
    """2**24 + 1 is not a float32: float32 bounds dropped the last token."""
    tokens = torch.empty(2**24 + 1, dtype=torch.uint8)
    parts = shards(tokens, 3)
    assert sum(p.numel() for p in parts) == tokens.numel()
    assert max(p.numel() for p in parts) - min(p.numel() for p in parts) <= 1
    ends = [tokens.data_ptr()] + [p.data_ptr() + p.numel() for p in parts]
    assert [p.data_ptr() for p in parts] == ends[:-1]  # each shard starts where the last ended


@pytest.mark.parametrize(("index", "count"), [(3, 3), (-1, 3), (0, 0)])
def test_partition_rejects_bad_index(index: int, count: int) -> None:
    with pytest.raises(DataError):
        partition(torch.arange(10), index, count)


def test_windows_are_seeded_slices_of_the_stream() -> None:
    tokens = torch.arange(1000)
    windows = sample_windows(tokens, 16, 50, seed=3)
    assert windows.shape == (16, 50)
    starts = windows[:, 0]
    assert torch.equal(windows, starts[:, None] + torch.arange(50))  # contiguous slices
    assert bool((starts >= 0).all() and (starts + 50 <= 1000).all())
    assert torch.equal(windows, sample_windows(tokens, 16, 50, seed=3))
    assert not torch.equal(windows, sample_windows(tokens, 16, 50, seed=4))


@pytest.mark.parametrize("length", [10, 50])
def test_windows_need_more_tokens_than_seqlen(length: int) -> None:
    with pytest.raises(DataError, match="cannot give windows of 50"):
        sample_windows(torch.arange(length), 4, 50, seed=0)


def test_calibration_windows_come_from_their_partition(text_file: Path, tokenizer) -> None:
    tokens = tokenize(load_text(str(text_file)), tokenizer)
    for index, shard in enumerate(shards(tokens, 3)):
        calib = get_calibration(
            str(text_file), tokenizer, 6, 16, seed=0, partition_id=index, num_partitions=3
        )
        assert calib.shape == (6, 16) and calib.dtype == torch.long
        candidates = shard.unfold(0, 16, 1)
        for window in calib:
            assert bool((candidates == window).all(1).any()), f"window not in shard {index}"


def test_calibration_is_seeded(text_file: Path, tokenizer) -> None:
    first, again, other = (
        get_calibration(str(text_file), tokenizer, 4, 32, seed=s) for s in (0, 0, 1)
    )
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_too_short_text_is_a_data_error(tmp_path: Path, tokenizer) -> None:
    path = tmp_path / "short.txt"
    path.write_text("only a few words\n", encoding="utf-8")
    with pytest.raises(DataError, match="cannot give windows"):
        get_calibration(str(path), tokenizer, 4, 64)


@pytest.mark.parametrize(("name", "joiner"), [("corpus.txt", "\n\n"), ("ptb.sample.txt", " ")])
def test_txt_rows_joined_by_corpus_convention(tmp_path: Path, name: str, joiner: str) -> None:
    path = tmp_path / name
    path.write_text("\n".join(ROWS) + "\n", encoding="utf-8")
    assert load_text(str(path)) == joiner.join(["first row", "second row", "third row"])


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n", encoding="utf-8")
    return path


def test_jsonl_reads_the_field(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "c.jsonl", [{"body": "a b", "id": 1}, {"body": "c"}])
    assert load_text(str(path), field="body") == "a b\n\nc"


@pytest.mark.parametrize(
    ("records", "match"),
    [
        ([{"text": "ok"}, {"body": "no text"}], r"c\.jsonl:2: no JSON object with field 'text'"),
        ([["a list"]], "no JSON object"),
        ([{"text": 5}], "is not a string"),
        ([{"text": None}], "is not a string"),
    ],
)
def test_jsonl_errors(tmp_path: Path, records: list, match: str) -> None:
    path = write_jsonl(tmp_path / "c.jsonl", records)
    with pytest.raises(DataError, match=match):
        load_text(str(path))


def test_jsonl_rejects_broken_json(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "fine"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(DataError, match="c.jsonl:2"):
        load_text(str(path))


def test_parquet_reads_the_column_and_drops_empty_rows(tmp_path: Path) -> None:
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"content": ["x y", None, "", "z"], "n": [1, 2, 3, 4]}), path)
    assert load_text(str(path), field="content") == "x y\n\nz"
    with pytest.raises(DataError, match=r"no column 'text' \(columns: \['content', 'n'\]\)"):
        load_text(str(path))


def test_paths_resolve_relative_to_the_data_dir(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("alpha\nbeta\n", encoding="utf-8")
    monkeypatch.setenv("FEDSPALLM_DATA", str(tmp_path))
    assert load_text("corpus/a.txt") == "alpha\n\nbeta"


@pytest.mark.parametrize("source", ["no/such/file.txt", "wikitext103"])
def test_unknown_source(source: str) -> None:
    with pytest.raises(DataError, match="neither a readable file nor a corpus name"):
        load_text(source)


def test_non_utf8_text(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes("café\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        load_text(str(path))


def test_eval_tokens_are_the_whole_stream(text_file: Path, tokenizer) -> None:
    tokens = get_eval_tokens(str(text_file), tokenizer)
    assert tokens.shape[0] == 1 and tokens.shape[1] > 1000
    assert torch.equal(tokens[0], tokenize(load_text(str(text_file), "evaluation"), tokenizer))
    assert tokenizer.decode(tokens[0]) == load_text(str(text_file))  # byte-level: lossless


def _corpus_folder(tmp_path: Path) -> Path:
    """A data folder in the shared layout holding WikiText-2's two files (PTB's are absent)."""
    (tmp_path / "wikitext2").mkdir()
    (tmp_path / "wikitext2" / "wiki.valid.tokens").write_text("calib one\n\ncalib two\n")
    (tmp_path / "wikitext2" / "wiki.test.raw").write_text("test one\ntest two\n")
    return tmp_path


@pytest.fixture
def hub_calls(monkeypatch) -> list[tuple[str, str]]:
    """Record hub loads instead of making them: each returns two rows and an empty one."""
    calls: list[tuple[str, str]] = []

    def fake(corpus: data.Corpus, role: str) -> list[str]:
        calls.append((corpus.hub_id, corpus.hub_split[role]))
        return ["hub a", "", "hub b"]

    monkeypatch.setattr(data, "hub_rows", fake)
    return calls


@pytest.mark.parametrize(
    ("role", "expected"),
    [("calibration", "calib one\n\ncalib two"), ("evaluation", "test one\n\ntest two")],
)
def test_a_corpus_name_reads_its_local_file_without_the_hub(
    tmp_path: Path, monkeypatch, hub_calls: list, role: str, expected: str
) -> None:
    monkeypatch.setenv("FEDSPALLM_DATA", str(_corpus_folder(tmp_path)))
    assert load_text("wikitext2", role) == expected
    assert hub_calls == []


def test_the_run_configs_data_dir_comes_before_fedspallm_data(
    tmp_path: Path, monkeypatch, hub_calls: list
) -> None:
    monkeypatch.setenv("FEDSPALLM_DATA", str(tmp_path / "elsewhere"))
    assert load_text("wikitext2", root=_corpus_folder(tmp_path)) == "calib one\n\ncalib two"
    assert hub_calls == []


@pytest.mark.parametrize(
    ("source", "role", "hub"),
    [
        ("ptb", "calibration", ("ptb-text-only/ptb_text_only", "train")),
        ("ptb", "evaluation", ("ptb-text-only/ptb_text_only", "test")),
        ("c4", "evaluation", ("allenai/c4", "validation")),
    ],
)
def test_a_corpus_without_a_local_file_comes_from_the_hub_with_sparsegpts_split(
    tmp_path: Path, monkeypatch, hub_calls: list, source: str, role: str, hub: tuple
) -> None:
    monkeypatch.setenv("FEDSPALLM_DATA", str(_corpus_folder(tmp_path)))
    joiner = data.CORPORA[source].joiner
    assert load_text(source, role) == joiner.join(["hub a", "", "hub b"])  # every row, as SparseGPT
    assert hub_calls == [hub]


def test_an_explicit_path_is_read_as_a_file_even_if_named_like_a_corpus(
    tmp_path: Path, monkeypatch, hub_calls: list
) -> None:
    (tmp_path / "ptb").write_text("own text\nmore\n")
    monkeypatch.chdir(tmp_path)
    assert load_text("ptb") == "own text more"  # its name has "ptb": PTB's joiner
    assert hub_calls == []


def test_no_local_file_and_no_hub_is_one_line_naming_fedspallm_data(
    tmp_path: Path, monkeypatch
) -> None:
    def offline(corpus: data.Corpus, role: str) -> list[str]:
        raise ConnectionError("Couldn't reach 'ptb-text-only/ptb_text_only' on the Hub\nretry")

    monkeypatch.setattr(data, "hub_rows", offline)
    monkeypatch.setenv("FEDSPALLM_DATA", str(tmp_path))
    with pytest.raises(DataError) as err:
        load_text("ptb", "evaluation")
    message = str(err.value)
    assert "\n" not in message
    assert f"no ptb/ptb.test.txt under FEDSPALLM_DATA={tmp_path}" in message
    assert "ConnectionError: Couldn't reach" in message and "retry" not in message
    monkeypatch.delenv("FEDSPALLM_DATA")
    with pytest.raises(DataError, match=r"under FEDSPALLM_DATA \(unset, so ./data\)"):
        load_text("ptb")


def test_the_cli_reports_an_unreachable_corpus_in_one_line(
    tmp_path: Path, monkeypatch, capsys, tiny_llama_dir: Path
) -> None:
    from pruning.cli import main

    def offline(corpus: data.Corpus, role: str) -> list[str]:
        raise ConnectionError("no network")

    monkeypatch.setattr(data, "hub_rows", offline)
    monkeypatch.setenv("FEDSPALLM_DATA", str(tmp_path))
    assert main(["eval", "--model", str(tiny_llama_dir), "--data", "ptb"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: corpus 'ptb'")
    assert "FEDSPALLM_DATA" in err


def test_the_run_config_default_sources_are_corpus_names() -> None:
    from pruning.config import RunConfig

    cfg = RunConfig()
    assert set(cfg.calib_sources) | set(cfg.eval_data) <= set(data.CORPORA)
