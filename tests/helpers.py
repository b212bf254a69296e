"""Builders of tiny, random, fully offline models for the tests (no hub, no network).

Import as ``from helpers import make_tiny_model`` (pytest puts ``tests/`` on ``sys.path``) or use
the session fixtures ``tiny_llama_dir`` / ``tiny_opt_dir`` of ``conftest.py``.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

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


# the architecture matrix: every family the README lists as supported, as a tiny random config
# (hidden 64, 4 heads of 16, 2 key/value heads where the family has them; every linear's input
# width a multiple of 8, so 2:4 and 4:8 both apply; MoE: 4 experts, top 2)
_ATTN = {"hidden_size": 64, "num_attention_heads": 4, "max_position_embeddings": 256}
_GQA = {**_ATTN, "num_key_value_heads": 2, "intermediate_size": 128}
_MOE = {"num_experts_per_tok": 2, "intermediate_size": 64}
ARCHITECTURES = {
    "llama": ("LlamaConfig", _GQA),
    "mistral": ("MistralConfig", _GQA),
    "qwen2": ("Qwen2Config", _GQA),
    "qwen3": ("Qwen3Config", {**_GQA, "head_dim": 16}),
    "gemma2": ("Gemma2Config", {**_GQA, "head_dim": 16}),
    "phi3": ("Phi3Config", _GQA),
    "opt": ("OPTConfig", {**_ATTN, "ffn_dim": 128, "word_embed_proj_dim": 64}),
    "mixtral": ("MixtralConfig", {**_GQA, **_MOE, "num_local_experts": 4}),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        {**_GQA, **_MOE, "num_experts": 4, "moe_intermediate_size": 64, "head_dim": 16},
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        {**_GQA, **_MOE, "num_experts": 4, "moe_intermediate_size": 64}
        | {"shared_expert_intermediate_size": 64},
    ),
    "gpt_neox": ("GPTNeoXConfig", {**_ATTN, "intermediate_size": 128}),
    "falcon": ("FalconConfig", {**_ATTN, "num_kv_heads": 2, "new_decoder_architecture": True}),
    "gpt2": ("GPT2Config", {"n_embd": 64, "n_head": 4, "n_positions": 256}),
}
FAMILIES = tuple(ARCHITECTURES)


def tiny_config(family: str, tokenizer, num_layers: int = 4):
    """A tiny random config of ``family`` for ``tokenizer``'s vocabulary."""
    import transformers

    if family not in ARCHITECTURES:
        raise ValueError(f"unknown tiny family {family!r} (choose from {', '.join(FAMILIES)})")
    name, kwargs = ARCHITECTURES[family]
    layers = "n_layer" if family == "gpt2" else "num_hidden_layers"
    return getattr(transformers, name)(
        **kwargs,
        **{layers: num_layers},
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        use_cache=False,
    )


@functools.lru_cache(maxsize=1)
def tiny_tokenizer():
    """The tiny models' tokenizer, trained once per process."""
    text = (corpus_dir() / "wikitext2" / "wiki.valid.tokens").read_text(encoding="utf-8")
    return make_tokenizer(text[:TOKENIZER_TEXT_CHARS])


def make_tiny_model(family: str, path: Path, seed: int = 0, num_layers: int = 4) -> Path:
    """Save a tiny random ``family`` model and its tokenizer into ``path`` and return it.

    The same ``seed`` writes the same bytes, so tests can compare runs across processes.
    """
    from transformers import AutoModelForCausalLM

    tokenizer = tiny_tokenizer()
    config = tiny_config(family, tokenizer, num_layers)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def reference_plan(cfg, num_layers: int, budgets: list[int]) -> dict[int, list[int]]:
    """Which simulated partition prunes which layers in round 1 of ``cfg``'s method."""
    from pruning.sampling import assign_layers

    layers = list(range(num_layers))
    if cfg.method.startswith("fedspallm"):
        plan = assign_layers({str(p): b for p, b in enumerate(budgets)}, layers, cfg.seed, 1)
        return {int(p): v for p, v in sorted(plan.per_client.items())}
    return {p: layers for p in range(1 if cfg.method == "centralized" else len(budgets))}


def reference_run(cfg, worker, data, held: dict, rnd: int = 1, down=None) -> dict:
    """What each partition uploads for its ``held`` layers, computed directly from the engine:
    ``{partition: Decoded payload}`` (``data(p)`` gives a partition's data; ``down(p)`` the
    merged layers sent to it, for a refine round)."""
    from pruning.federated import Job
    from pruning.payload import Expected, decode_payload

    union, phase = cfg.method == "centralized", "refine" if down else "prune"
    out = {}
    for p, v in sorted(held.items()):
        blob = worker.run(Job.plan(cfg, rnd, v, union, phase), data(p), down(p) if down else None)
        masks = decode_payload(down(p), Expected(worker.shapes)).masks if down else None
        out[p] = decode_payload(blob[0], Expected(worker.shapes, masks=masks and masks.get))
    return out


def reference_weights(cfg, payloads: dict, merge: str, base=None) -> dict[str, torch.Tensor]:
    """Each pruned tensor merged over the partitions that uploaded it, in partition order."""
    from pruning.aggregate import merge_tensor
    from pruning.federated import GlobalModel

    base = base or GlobalModel(cfg.model, cfg.dtype)
    out = {}
    for key, shape in base.shapes.items():
        holders = [p for p in payloads.values() if key in p.sparse]
        dense = base.params[key].detach()
        sources = [(lambda h=h, k=key: h.update(k)) for h in holders]
        tokens = [h.meta.expert_tokens.get(key) for h in holders]
        experts = shape[0] if len(shape) == 3 else 0
        out[key], _ = merge_tensor(
            merge,
            sources,
            cfg.target(),
            dense=lambda d=dense: d,
            tokens=tokens if experts and None not in tokens else None,
            experts=experts,
        )
    return out


def reference_output(cfg, worker, data, budgets: list[int]) -> dict[str, torch.Tensor]:
    """The merged model of ``cfg``'s method, composed from client jobs and merges without the
    server: one round, or for the two-phase fedspallm presets a prune round (l0) and a refine
    round on the merged model (mean of the values) by every partition (``fedspallm``) or by the
    partitions that pruned each layer (``fedspallm-sampled``)."""
    from pruning.federated import GlobalModel

    held = reference_plan(cfg, worker.num_layers, budgets)
    merge = {"fedprllm": "mask-vote", "fedavg": "fedavg"}
    first = reference_weights(
        cfg, reference_run(cfg, worker, data, held), merge.get(cfg.method, "l0")
    )
    if cfg.method not in ("fedspallm", "fedspallm-sampled"):
        return first
    base = GlobalModel(cfg.model, cfg.dtype)
    for key, weight in first.items():
        base.write(key, weight)

    if cfg.method == "fedspallm":
        held = dict.fromkeys(held, list(range(worker.num_layers)))

    def down(p: int) -> bytes:
        below = list(range(max(held[p]) + 1))
        return base.encode(below, 2, cfg.sparsity, cfg.pattern)

    refined = reference_run(cfg, worker, data, held, 2, down)
    return reference_weights(cfg, refined, "l0", base)
