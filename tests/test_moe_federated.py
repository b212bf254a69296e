"""Federated MoE: fused ``[experts, out, in]`` tensors in payloads, merged expert by expert
with each client's expert weighted by the tokens its router sent there, and a real `flwr run`
on a tiny Mixtral."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from deploy_helpers import failure, simulate
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

from pruning.aggregate import merge_tensor
from pruning.payload import Expected, PayloadError, PayloadMeta, decode_payload, encode_payload
from pruning.sparsity import Target, nm_valid, parse_pattern, prune_count

KEY = "model.layers.0.mlp.experts.down_proj"
SHAPE = (3, 8, 16)


def client(seed: int, sparsity: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(SHAPE, generator=g)
    mask = torch.rand(SHAPE, generator=g) >= sparsity
    return weight * mask, mask


def test_payload_carries_expert_tensors_and_their_token_counts() -> None:
    weight, mask = client(0)
    meta = PayloadMeta(1, [0], 0.5, expert_tokens={KEY: [5, 0, 7]})
    decoded = decode_payload(
        encode_payload({KEY: weight}, meta, {KEY: mask}), Expected({KEY: SHAPE})
    )
    assert decoded.meta.expert_tokens == {KEY: [5, 0, 7]}
    got, got_mask = decoded.update(KEY)
    assert torch.equal(got, weight) and torch.equal(got_mask, mask)
    assert decoded.sparse[KEY].bitmask.shape == (3 * 8, 2)  # the experts' rows, in turn
    for tokens, reason in (
        ({KEY: [1, 2]}, "2 expert token counts"),
        ({"x.1.y": [1]}, "not in the payload"),
    ):
        bad = PayloadMeta(1, [0], 0.5, expert_tokens=tokens)
        with pytest.raises(PayloadError, match=reason):
            decode_payload(encode_payload({KEY: weight}, bad, {KEY: mask}))
    strings = {**meta.to_strings(), "expert_tokens": json.dumps({KEY: [1, -1, 2]})}
    with pytest.raises(PayloadError, match="metadata: unparsable field: expert_tokens"):
        PayloadMeta.from_strings(strings)


@pytest.mark.parametrize("pattern", ["", "2:4"])
def test_every_expert_is_merged_to_exactly_the_target(pattern: str) -> None:
    sources = [lambda s=s: client(s) for s in range(3)]
    target = Target.of(0.5, pattern)
    weight, mask = merge_tensor("l0", sources, target, tokens=[[3, 1, 0]] * 3, experts=3)
    assert weight.shape == mask.shape == SHAPE
    for e in range(3):
        assert int((~mask[e]).sum()) == prune_count(8 * 16, 0.5)
        assert torch.equal(weight[e] != 0, mask[e] & (weight[e] != 0))
        if pattern:
            assert nm_valid(mask[e], parse_pattern(pattern))


@settings(max_examples=30, deadline=None)
@given(st.lists(st.lists(st.integers(0, 50), min_size=3, max_size=3), min_size=2, max_size=4))
def test_token_weighted_l0_mean_per_expert(tokens: list[list[int]]) -> None:
    """At 0% target (no expansion) expert ``e`` is ``Σ t·w / Σ t`` over the clients that kept a
    weight and routed tokens to ``e``; clients with no token there do not vote, unless none
    routed any (then all count, unweighted)."""
    updates = [client(10 + i, 0.3) for i in range(len(tokens))]
    sources = [lambda u=u: u for u in updates]
    weight, _ = merge_tensor("l0", sources, Target.of(0.0), tokens=tokens, experts=3)
    for e in range(3):
        t = torch.tensor([c[e] for c in tokens], dtype=torch.float32)
        if not t.any():
            t = torch.ones_like(t)
        w = torch.stack([u[0][e] for u in updates])
        kept = torch.stack([u[1][e] for u in updates]) & (t > 0)[:, None, None]
        num = (w * kept * t[:, None, None]).sum(0)
        den = (kept * t[:, None, None]).sum(0)
        expected = torch.where(den > 0, num / den.clamp(min=1e-30), 0)
        assert torch.allclose(weight[e], expected, atol=1e-6), e


def test_a_client_without_tokens_on_an_expert_does_not_vote() -> None:
    """Client 1 routed nothing to expert 0: its mask and values there are ignored, so expert 0
    is client 0's own; on expert 1 both vote."""
    a, b = client(0), client(1)
    weight, mask = merge_tensor(
        "l0", [lambda: a, lambda: b], Target.of(0.5), tokens=[[4, 4, 4], [0, 4, 4]], experts=3
    )
    alone = [merge_tensor("l0", [lambda e=e: (a[0][e], a[1][e])], Target.of(0.5)) for e in (0, 1)]
    assert torch.equal(weight[0], alone[0][0]) and torch.equal(mask[0], alone[0][1])
    assert not torch.equal(mask[1], alone[1][1])


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory, data_dir: Path) -> tuple[Path, str]:
    """A real `flwr run` of the default method on a tiny Mixtral: (run folder, its log)."""
    from helpers import make_tiny_model

    model = make_tiny_model("mixtral", tmp_path_factory.mktemp("tiny-mixtral"), num_layers=2)
    home, out = tmp_path_factory.mktemp("flwr-home"), tmp_path_factory.mktemp("runs")
    overrides = (
        f"model='{model}' out-dir='{out}' min-nodes=2 sim-max-layers='2,1' "
        "nsamples=4 seqlen=32 eval-max-windows=2 eval-dense=false"
    )
    proc = simulate(home, data_dir, overrides, nodes=2)
    runs = list(out.glob("fedspallm-*"))
    assert proc.returncode == 0 and len(runs) == 1, failure(proc)
    return runs[0], proc.stdout + proc.stderr


def test_flwr_run_prunes_every_expert_and_weights_by_tokens(
    moe_run: tuple[Path, str], data_dir: Path, one_thread: None
) -> None:
    """The default method (prune, then refine by both clients): the merged experts are exactly
    50% sparse each, and equal the clients' payloads merged per expert with their token counts
    (the engine reference, composed without Flower)."""
    from helpers import reference_output

    from pruning.config import RunConfig
    from pruning.federated import ClientData, ClientWorker

    run_dir, log = moe_run
    model = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    assert torch.isfinite(model(torch.tensor([[1, 2, 3, 4]])).logits).all()
    for i in range(2):
        experts = model.model.layers[i].mlp.experts
        for w in (experts.gate_up_proj, experts.down_proj):
            # as in test_flower_app: a merged value may come out exactly 0 (bf16 values, token
            # weights: 72 * -0.0086669921875 + 71 * 0.0087890625 == 0), one more zero than masked
            assert all(0 <= int((w[e] == 0).sum()) - w[e].numel() // 2 <= 1 for e in range(4))
    report = json.loads((run_dir / "report.json").read_text())
    assert report["complete"]
    assert "model.layers.0.mlp.gate.weight" in report["sparsity"]["dense"]
    assert "sparsity: 0.5000 over 122880 prunable decoder weights" in log  # the run's log says
    assert "model.layers.*.mlp.gate.weight (2 x 256)" in log  # what stayed dense, too

    cfg = RunConfig.parse(report["config"])
    worker = ClientWorker(cfg.model)

    def data(p: int) -> ClientData:
        return ClientData(
            sources=list(cfg.calib_sources), partition_id=p, num_partitions=2, root=data_dir
        )

    expected = reference_output(cfg, worker, data, [2, 1])
    got = dict(model.named_parameters())
    for key, weight in expected.items():
        assert torch.equal(got[key].detach(), weight.to(got[key].dtype)), key
