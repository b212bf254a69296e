"""Mixture-of-experts pruning: each expert is calibrated on the tokens the router sends it.

On a tiny random Mixtral (transformers 5's fused ``[experts, out, in]`` parameters) and on a toy
MoE with one ``nn.Linear`` per expert: the routed-token counts equal the router's top-k choices,
SparseGPT's reconstruction error on each expert's routed tokens is below magnitude pruning's,
and an expert with too few tokens falls back to magnitude and is reported with its count.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from helpers import tiny_config
from torch import nn
from transformers import AutoModelForCausalLM

from pruning.driver import MIN_EXPERT_TOKENS, PruneConfig, prune_layers
from pruning.models import classify
from pruning.sparsity import prune_count

pytestmark = pytest.mark.usefixtures("one_thread")

EXPERTS, TOP_K, BATCH = 4, 2, 8


class Vocab:
    """Just what ``tiny_config`` reads from a tokenizer."""

    pad_token_id, eos_token_id = 0, 1

    def __len__(self) -> int:
        return 128


@pytest.fixture(scope="module")
def mixtral() -> nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config("mixtral", Vocab(), 2)).eval()


def calibration(n: int, seqlen: int) -> torch.Tensor:
    return torch.randint(0, 128, (n, seqlen), generator=torch.Generator().manual_seed(1))


def routed(model: nn.Module, calib: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hidden states, top-k expert ids)`` entering layer ``layer``'s experts in the dense
    model, read at the experts' own input, independently of the driver."""
    seen = []
    experts = model.model.layers[layer].mlp.experts
    handle = experts.register_forward_pre_hook(lambda m, args: seen.append((args[0], args[1])))
    try:
        with torch.no_grad():
            for batch in calib.split(BATCH):
                model(batch)
    finally:
        handle.remove()
    return torch.cat([s[0] for s in seen]), torch.cat([s[1] for s in seen])


def pruned(model: nn.Module, calib: torch.Tensor, method: str, layers: list[int]):
    copied = copy.deepcopy(model)
    cfg = PruneConfig(method, 0.5, batch_size=BATCH)
    return copied, prune_layers(copied, calib, layers, cfg, "cpu", progress=False)


@pytest.mark.parametrize("layer", [0, 1])
def test_routed_token_counts_are_the_routers_top_k_choices(mixtral, layer: int) -> None:
    calib = calibration(6, 32)
    _, choice = routed(mixtral, calib, layer)
    assert choice.shape == (6 * 32, TOP_K)
    expected = torch.bincount(choice.reshape(-1), minlength=EXPERTS).tolist()
    _, report = pruned(mixtral, calib, "sparsegpt", [layer])
    prefix = f"model.layers.{layer}.mlp.experts."
    tokens = report.expert_tokens()
    assert tokens == {f"{prefix}gate_up_proj": expected, f"{prefix}down_proj": expected}
    assert sum(expected) == 6 * 32 * TOP_K and min(expected) >= MIN_EXPERT_TOKENS
    assert report.fallbacks() == []


@torch.no_grad()
def test_sparsegpt_beats_magnitude_on_every_expert(mixtral) -> None:
    """Per expert, on the tokens routed to it: ‖X Wᵀ − X Ŵᵀ‖ of the gate/up projection, and of
    the down projection on its dense inputs (the driver's joint mode calibrates both on those)."""
    calib = calibration(6, 32)
    x, choice = routed(mixtral, calib, 0)
    dense = mixtral.model.layers[0].mlp.experts
    results = {
        m: pruned(mixtral, calib, m, [0])[0].model.layers[0].mlp.experts
        for m in ("sparsegpt", "magnitude")
    }
    for e in range(EXPERTS):
        xe = x[(choice == e).any(-1)]
        assert len(xe) >= MIN_EXPERT_TOKENS
        gate, up = (xe @ dense.gate_up_proj[e].T).chunk(2, -1)
        inputs = {"gate_up_proj": xe, "down_proj": dense.act_fn(gate) * up}
        for name, inp in inputs.items():
            ref = inp @ getattr(dense, name)[e].T
            err = {m: float((inp @ getattr(r, name)[e].T - ref).norm()) for m, r in results.items()}
            assert err["sparsegpt"] < err["magnitude"], (e, name, err)
            for r in results.values():
                w = getattr(r, name)[e]
                assert int((w == 0).sum()) == prune_count(w.numel(), 0.5)


def test_expert_with_too_few_tokens_falls_back_to_magnitude(mixtral) -> None:
    calib = calibration(1, 8)  # 16 routed slots over 4 experts per layer: some get < 8
    _, choice = routed(mixtral, calib, 0)
    counts = torch.bincount(choice.reshape(-1), minlength=EXPERTS).tolist()
    few = [e for e, c in enumerate(counts) if c < MIN_EXPERT_TOKENS]
    assert few
    sgpt, report = pruned(mixtral, calib, "sparsegpt", [0])
    mag, _ = pruned(mixtral, calib, "magnitude", [0])
    key = "model.layers.0.mlp.experts.gate_up_proj"
    fallbacks = [f for f in report.fallbacks() if f["weight"] == key]
    assert fallbacks == [{"weight": key, "expert": e, "tokens": counts[e]} for e in few]
    got, ref = sgpt.get_parameter(key), mag.get_parameter(key)
    for e in range(EXPERTS):
        assert torch.equal(got[e], ref[e]) == (e in few), e


class ToyMoE(nn.Module):
    """An MoE block with one ``nn.Linear`` per expert (the pre-transformers-5 layout)."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.gate = nn.Linear(hidden, EXPERTS, bias=False)
        self.experts = nn.ModuleList(nn.Linear(hidden, hidden, bias=False) for _ in range(EXPERTS))
        self.choices: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        top = self.gate(flat).topk(TOP_K, -1).indices
        self.choices.append(top)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            rows = (top == e).any(-1)
            if rows.any():
                out[rows] += expert(flat[rows])
        return x + out.view_as(x)


class ToyModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(model_type="toy-moe", use_cache=False)
        self.embed = nn.Embedding(128, 32)
        self.layers = nn.ModuleList([ToyMoE(), ToyMoE()])

    def forward(self, ids: torch.Tensor, **kw) -> torch.Tensor:
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return x


def test_per_expert_linears_are_calibrated_on_their_routed_tokens() -> None:
    torch.manual_seed(0)
    model = ToyModel().eval()
    weights, dense = classify(model.layers[0])
    assert [w.name for w in weights] == [f"experts.{e}.weight" for e in range(EXPERTS)]
    assert [w.expert for w in weights] == list(range(EXPERTS)) and dense == {
        "gate.weight": "router"
    }
    calib = calibration(4, 16)
    with torch.no_grad():
        for batch in calib.split(BATCH):
            model(batch)
    expected = torch.bincount(torch.cat(model.layers[0].choices).reshape(-1), minlength=EXPERTS)
    report = prune_layers(
        model, calib, [0], PruneConfig("sparsegpt", 0.5, batch_size=BATCH), "cpu", False
    )
    tokens = report.expert_tokens()
    assert tokens == {f"layers.0.experts.{e}.weight": [int(expected[e])] for e in range(EXPERTS)}
    assert all(
        int((m.weight == 0).sum()) == prune_count(m.weight.numel(), 0.5)
        for m in model.layers[0].experts
    )
    assert torch.count_nonzero(model.layers[0].gate.weight == 0) == 0  # the router stays dense
