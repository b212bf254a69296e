"""Builders of tiny, random, fully offline models for the tests (no hub, no network).

Import as ``from helpers import make_tiny_model`` (pytest puts ``tests/`` on ``sys.path``) or use
the session fixtures ``tiny_llama_dir`` / ``tiny_opt_dir`` of ``conftest.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

FAMILIES = ("llama", "opt")
TOKENIZER_VOCAB = 768
TOKENIZER_TEXT_CHARS = 300_000
SPECIAL_TOKENS = {"pad_token": "<pad>", "eos_token": "<eos>", "unk_token": "<unk>"}


def corpus_dir() -> Path:
    """The shared corpora (``$FEDSPALLM_DATA``), also used to train the tiny tokenizer."""
    return Path(os.environ.get("FEDSPALLM_DATA", Path(__file__).parents[2] / "shared" / "data"))


def make_tokenizer(text: str):
    """A byte-level BPE tokenizer trained on ``text``: lossless on any input, deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text.splitlines(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=1 << 20, **SPECIAL_TOKENS)


def _config(family: str, tokenizer):
    """Tiny config: every linear's input width is a multiple of 8, so 2:4 and 4:8 both apply."""
    from transformers import LlamaConfig, OPTConfig

    ids = {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.eos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    if family == "llama":
        return LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            use_cache=False,
            **ids,
        )
    if family == "opt":
        return OPTConfig(
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            word_embed_proj_dim=64,
            max_position_embeddings=256,
            use_cache=False,
            **ids,
        )
    raise ValueError(f"unknown tiny family {family!r} (choose from {', '.join(FAMILIES)})")


def make_tiny_model(family: str, path: Path, seed: int = 0) -> Path:
    """Save a tiny random ``family`` model and its tokenizer into ``path`` and return it.

    The same ``seed`` writes the same bytes, so tests can compare runs across processes.
    """
    from transformers import AutoModelForCausalLM

    text = (corpus_dir() / "wikitext2" / "wiki.valid.tokens").read_text(encoding="utf-8")
    tokenizer = make_tokenizer(text[:TOKENIZER_TEXT_CHARS])
    config = _config(family, tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
