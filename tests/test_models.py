"""Model loading, family adapters and layer state I/O (pruning/models.py)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from pruning.models import (
    DTYPES,
    BaseWeights,
    LayoutError,
    ModelError,
    check_layout,
    checkpoint_files,
    classify,
    get_adapter,
    layer_state,
    linear_groups,
    load_layer_state,
    load_model,
    num_layers,
    prunable_shapes,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# hidden 64, intermediate 128, 4 heads of 16, LLaMA with 2 key/value heads
SHAPES = {
    "llama": {
        "self_attn.q_proj": (64, 64),
        "self_attn.k_proj": (32, 64),
        "self_attn.v_proj": (32, 64),
        "self_attn.o_proj": (64, 64),
        "mlp.gate_proj": (128, 64),
        "mlp.up_proj": (128, 64),
        "mlp.down_proj": (64, 128),
    },
    "opt": {
        "self_attn.q_proj": (64, 64),
        "self_attn.k_proj": (64, 64),
        "self_attn.v_proj": (64, 64),
        "self_attn.out_proj": (64, 64),
        "fc1": (128, 64),
        "fc2": (64, 128),
    },
}
PREFIX = {"llama": "model.layers.", "opt": "model.decoder.layers."}
SEQUENTIAL_GROUPS = {  # linears that see the same input, in the order the inputs are computed
    "llama": [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ],
    "opt": [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        ["self_attn.out_proj"],
        ["fc1"],
        ["fc2"],
    ],
}


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path):
    return load_model(str(tiny_model_dir))


def family(model: nn.Module) -> str:
    return model.config.model_type


def test_load_model(loaded) -> None:
    model, tokenizer = loaded
    assert not model.training and model.config.use_cache is False
    assert next(model.parameters()).dtype == torch.float32
    assert tokenizer.eos_token == "<eos>" and len(tokenizer) == model.config.vocab_size


def test_load_model_dtype(tiny_llama_dir: Path) -> None:
    model, _ = load_model(str(tiny_llama_dir), dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16


def test_adapter(loaded) -> None:
    model = loaded[0]
    adapter = get_adapter(model)
    assert adapter.family == family(model)
    assert adapter.prefix(3) == f"{PREFIX[adapter.family]}3."
    assert adapter.layers(model) is model.get_submodule(PREFIX[adapter.family][:-1])
    assert num_layers(model) == 4


def test_prunable_shapes(loaded) -> None:
    model = loaded[0]
    shapes = prunable_shapes(model)
    prefix, expected = PREFIX[family(model)], SHAPES[family(model)]
    assert sorted(shapes) == [0, 1, 2, 3]
    for i, layer in shapes.items():
        assert layer == {f"{prefix}{i}.{name}.weight": shape for name, shape in expected.items()}
    state = model.state_dict()
    assert all(tuple(state[k].shape) == s for layer in shapes.values() for k, s in layer.items())


def labels(groups) -> list[list[str]]:
    return [[w.label for w in g] for g in groups]


def test_linear_groups(loaded) -> None:
    model = loaded[0]
    adapter = get_adapter(model)
    layer = copy.deepcopy(adapter.layers(model)[0])
    assert labels(linear_groups(layer, adapter, False)) == [list(SHAPES[family(model)])]
    assert labels(linear_groups(layer, adapter, True)) == SEQUENTIAL_GROUPS[family(model)]
    layer.extra = nn.Linear(64, 64)  # a variant the table does not know still gets pruned
    assert labels(linear_groups(layer, adapter, True))[-1] == ["extra"]
    assert labels(linear_groups(layer, adapter, False))[0][-1] == "extra"


def test_layer_state_round_trip(loaded) -> None:
    model = copy.deepcopy(loaded[0])
    saved = {k: v.clone() for k, v in layer_state(model, [2, 1, 2]).items()}
    shapes = prunable_shapes(model)
    assert set(saved) == set(shapes[1]) | set(shapes[2])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    halved = {k: (v / 2).double() for k, v in saved.items()}  # other dtypes are cast on load
    load_layer_state(model, halved)
    after = model.state_dict()
    for key, value in after.items():
        expected = halved[key].float() if key in halved else before[key]
        assert value.dtype == before[key].dtype and torch.equal(value, expected), key
    load_layer_state(model, saved)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_base_weights_are_read_back_from_the_checkpoint(tiny_llama_dir: Path, dtype: str) -> None:
    """A lean client restores its base weights from the safetensors files, bit for bit, in
    the dtype it runs in, after pruning has overwritten them; no weight is copied in RAM."""
    model, _ = load_model(str(tiny_llama_dir), dtype)
    every = range(num_layers(model))
    loaded = {k: v.clone() for k, v in layer_state(model, every).items()}
    base = BaseWeights(model, checkpoint_files(str(tiny_llama_dir)))
    assert base.from_checkpoint == len(base) == len(loaded) and not base._copies
    load_layer_state(model, {k: torch.zeros_like(v) for k, v in loaded.items()})
    load_layer_state(model, base)
    for key, value in layer_state(model, every).items():
        assert value.dtype == DTYPES[dtype] and torch.equal(value, loaded[key]), key


def test_base_weights_keep_a_copy_of_what_the_file_does_not_hold(
    tmp_path: Path, tiny_llama_dir: Path
) -> None:
    """A weight missing from the files, or different there from what was loaded (a conversion
    on load), is kept in RAM: restoring never changes the base model."""
    from safetensors.torch import load_file, save_file

    model, _ = load_model(str(tiny_llama_dir))
    tensors = load_file(tiny_llama_dir / "model.safetensors")
    changed, missing = "model.layers.1.mlp.up_proj.weight", "model.layers.2.self_attn.q_proj.weight"
    tensors[changed] = tensors[changed] + 1
    del tensors[missing]
    save_file(tensors, tmp_path / "model.safetensors")
    base = BaseWeights(model, [tmp_path / "model.safetensors"])
    assert set(base._copies) == {changed, missing} and base.from_checkpoint == len(base) - 2
    assert torch.equal(base[changed], layer_state(model, [1])[changed])


def test_base_weights_of_conv1d_are_in_the_pruners_orientation(tmp_path: Path) -> None:
    model = tiny_gpt2()
    model.save_pretrained(tmp_path)
    base = BaseWeights(model, checkpoint_files(str(tmp_path)))
    key = "transformer.h.1.mlp.c_fc.weight"
    assert base.from_checkpoint == len(base) and base[key].shape == (128, 32)
    assert torch.equal(base[key], layer_state(model, [1])[key])


def test_load_layer_state_rejects_unknown_keys(loaded) -> None:
    model = loaded[0]
    with pytest.raises(ModelError, match="not in the model: model.layers.99.mlp.up_proj.weight"):
        load_layer_state(model, {"model.layers.99.mlp.up_proj.weight": torch.zeros(1)})


def tiny_gpt2() -> GPT2LMHeadModel:
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100))


def test_gpt2_conv1d_is_seen_transposed() -> None:
    """GPT-2 keeps its layers in ``transformer.h`` and its Conv1D weights as ``[in, out]``: the
    pruners, payloads and merges see ``[out, in]``, and writes land in the stored layout."""
    model = tiny_gpt2()
    assert get_adapter(model).layers_path == "transformer.h"
    shapes = prunable_shapes(model)[1]
    assert shapes == {
        "transformer.h.1.attn.c_attn.weight": (96, 32),
        "transformer.h.1.attn.c_proj.weight": (32, 32),
        "transformer.h.1.mlp.c_fc.weight": (128, 32),
        "transformer.h.1.mlp.c_proj.weight": (32, 128),
    }
    key = "transformer.h.1.mlp.c_fc.weight"
    stored = model.get_parameter(key)
    assert tuple(stored.shape) == (32, 128)
    value = torch.arange(128 * 32, dtype=torch.float32).view(128, 32)
    load_layer_state(model, {key: value})
    assert torch.equal(stored, value.t()) and torch.equal(layer_state(model, [1])[key], value)


@pytest.mark.parametrize(
    ("make", "kind"), [(lambda: nn.Linear(4, 4), "'Linear'"), (lambda: nn.Sequential(), "'Seq")]
)
def test_unknown_architecture(make, kind: str) -> None:
    with pytest.raises(ModelError, match=f"unknown architecture {kind}.*no ModuleList"):
        get_adapter(make())


def test_unrecognised_weight_stops_unless_kept_dense(loaded) -> None:
    """A decoder weight matrix that no rule prunes is refused by name; ``keep_dense`` lets the
    run go on with it dense, and the sparsity report then lists it."""
    from pruning.evaluate import sparsity_report

    model = copy.deepcopy(loaded[0])
    layers = get_adapter(model).layers(model)
    for layer in layers:
        layer.register_parameter("scale_table", nn.Parameter(torch.ones(4, 64)))
    with pytest.raises(LayoutError, match=r"no rule prunes .*layers\.0\.scale_table.*keep-dense"):
        check_layout(model)
    for patterns in (["scale_table"], ["*.scale_table"], ["?.scale_tab*"]):
        check_layout(model, patterns)
    with pytest.raises(LayoutError, match="scale_table"):
        check_layout(model, ["mlp.up_proj.weight"])
    dense = sparsity_report(model)["dense"]
    assert all(dense[f"{get_adapter(model).prefix(i)}scale_table"] == 256 for i in range(4))


def test_load_model_refuses_an_unrecognised_layout(tmp_path: Path, tiny_llama_dir: Path) -> None:
    """Mamba's decoder blocks hold a state matrix and a depthwise convolution that no rule
    prunes: loading refuses it, naming both, unless they are listed as keep-dense."""
    from transformers import MambaConfig, MambaForCausalLM

    MambaForCausalLM(
        MambaConfig(hidden_size=32, num_hidden_layers=2, vocab_size=768)
    ).save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((tiny_llama_dir / name).read_bytes())
    with pytest.raises(LayoutError, match=r"'mamba'.*backbone\.layers\.0\.mixer\.A_log"):
        load_model(str(tmp_path))
    model, _ = load_model(str(tmp_path), keep_dense=["mixer.A_log", "mixer.conv1d.weight"])
    assert "backbone.layers.1.mixer.in_proj.weight" in prunable_shapes(model)[1]


@pytest.mark.parametrize(
    ("files", "spec", "match"),
    [
        ([], "./no/such/dir", "no such model directory"),
        ([], "{tmp}", "no config.json and not exactly one .gguf"),
        (["a.gguf", "b.gguf"], "{tmp}", "no config.json and not exactly one .gguf"),
    ],
)
def test_load_model_rejects_bad_specs(
    tmp_path: Path, files: list[str], spec: str, match: str
) -> None:
    for name in files:
        (tmp_path / name).touch()
    with pytest.raises(ModelError, match=match):
        load_model(spec.format(tmp=tmp_path))


def test_load_model_rejects_unknown_dtype(tiny_llama_dir: Path) -> None:
    with pytest.raises(ModelError, match="dtype 'int8' is not one of float32"):
        load_model(str(tiny_llama_dir), dtype="int8")


def test_transposed_fused_experts_are_refused_with_the_reason() -> None:
    """GPT-OSS keeps its experts as ``[experts, in, out]`` with biases: refused, by name and
    reason; its router and fused biases are dense by rule."""
    from transformers import GptOssConfig, GptOssForCausalLM

    config = GptOssConfig(
        hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, num_local_experts=2, num_experts_per_tok=1,
        vocab_size=64,
    )  # fmt: skip
    model = GptOssForCausalLM(config)
    dense = classify(get_adapter(model).layers(model)[0])[1]
    assert dense["mlp.router.weight"] == "router" and dense["mlp.experts.down_proj_bias"] == "bias"
    with pytest.raises(LayoutError, match=r"gate_up_proj \(fused experts stored transposed"):
        check_layout(model)
    check_layout(model, ["mlp.experts.*_proj"])  # kept dense on request
