"""Shared fixtures: the offline corpora and tiny random LLaMA / OPT models built once a session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import corpus_dir, make_tiny_model


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared corpora folder (``$FEDSPALLM_DATA``, default ``../shared/data``)."""
    path = corpus_dir()
    if not (path / "wikitext2" / "wiki.valid.tokens").is_file():
        pytest.skip(f"corpora not found in {path}: set FEDSPALLM_DATA to the shared data folder")
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """A tiny random LLaMA ``save_pretrained`` directory with its tokenizer (seed 0)."""
    return make_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_opt_dir(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """A tiny random OPT ``save_pretrained`` directory with its tokenizer (seed 0)."""
    return make_tiny_model("opt", tmp_path_factory.mktemp("tiny-opt"))


@pytest.fixture(scope="session", params=["llama", "opt"])
def tiny_model_dir(request: pytest.FixtureRequest) -> Path:
    """Each tiny family in turn, for tests that must hold for every supported architecture."""
    return request.getfixturevalue(f"tiny_{request.param}_dir")


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run torch on one thread: on tiny tensors thread hand-offs cost more than they save, and on
    a busy 2-core machine they make tiny-model tests 30x slower. Opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
