"""The architecture matrix: ``fedspallm prune`` on a tiny random model of every supported family
gives exactly the target in every prunable matrix (in every expert of an MoE), writes a model
plain transformers loads with finite logits, and reports what stayed dense."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import FAMILIES, make_tiny_model
from transformers import AutoModelForCausalLM

from pruning.cli import main
from pruning.models import prunable_weights
from pruning.sparsity import Pattern, nm_valid, prune_count

pytestmark = pytest.mark.usefixtures("one_thread")

MOE = {  # -> its routers
    "mixtral": ["mlp.gate.weight"],
    "qwen3_moe": ["mlp.gate.weight"],
    "qwen2_moe": ["mlp.gate.weight", "mlp.shared_expert_gate.weight"],
}
NSAMPLES, SEQLEN, TOP_K = 4, 32, 2


@pytest.fixture(scope="module")
def calib_text(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """A slice of WikiText-2 (tokenising the whole file would dominate these tiny runs)."""
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    text = (data_dir / "wikitext2" / "wiki.valid.tokens").read_text(encoding="utf-8")
    path.write_text(text[:40_000], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> dict[str, Path]:
    return {
        f: make_tiny_model(f, tmp_path_factory.mktemp(f"tiny-{f}"), num_layers=2) for f in FAMILIES
    }


def prune(model_dir: Path, out: Path, calib: Path, target: str, capsys, *extra: str) -> dict:
    flag = ["--pattern", target] if ":" in target else ["--sparsity", target]
    argv = ["prune", "--model", str(model_dir), "--calib-data", str(calib), *flag]
    argv += ["--nsamples", str(NSAMPLES), "--seqlen", str(SEQLEN), "--out", str(out), *extra]
    capsys.readouterr()
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    return json.loads(captured.out) if "--json" in extra else {"text": captured.out}


def matrices(weight: torch.Tensor, kind: str) -> list[torch.Tensor]:
    """The matrices a weight is pruned as, ``[out, in]``: each expert of a fused weight."""
    if kind == "conv1d":
        return [weight.t()]
    return list(weight) if kind == "experts" else [weight]


@pytest.mark.parametrize("target", ["0.5", "2:4"])
@pytest.mark.parametrize("family", FAMILIES)
def test_prune_every_architecture(
    family: str, target: str, model_dirs, calib_text: Path, tmp_path: Path, capsys
) -> None:
    summary = prune(model_dirs[family], tmp_path / "out", calib_text, target, capsys, "--json")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # plain transformers
    ids = torch.randint(
        0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0)
    )
    assert torch.isfinite(model(ids).logits).all()

    weights = {k: w for layer in prunable_weights(model).values() for k, (_, w) in layer.items()}
    assert weights, family
    params = dict(model.named_parameters())
    for key, w in weights.items():
        for e, matrix in enumerate(matrices(params[key].detach(), w.kind)):
            zeros = int((matrix == 0).sum())
            assert zeros == prune_count(matrix.numel(), 0.5), (key, e, zeros, matrix.numel())
            if target == "2:4":
                assert nm_valid(matrix != 0, Pattern(2, 4)), (key, e)

    report = summary["sparsity"]
    assert report["overall"] == 0.5
    assert report["pruned_params"] == sum(params[k].numel() for k in weights)
    assert report["dense"] == {n: p.numel() for n, p in params.items() if n not in weights}
    assert report["pruned_params"] + report["dense_params"] == sum(
        p.numel() for p in params.values()
    )
    if family in MOE:
        routers = {f"model.layers.{i}.{r}" for i in range(2) for r in MOE[family]}
        assert routers <= set(report["dense"])  # the router stays dense, and is named
        tokens = summary["expert_tokens"]
        assert {k for k, w in weights.items() if w.kind == "experts"} == set(tokens)
        assert all(sum(c) == NSAMPLES * SEQLEN * TOP_K for c in tokens.values()), tokens
        assert all(len(report["experts"][k]) == 4 for k in tokens)


def test_text_output_names_what_stayed_dense(model_dirs, calib_text: Path, tmp_path: Path, capsys):
    text = prune(model_dirs["mixtral"], tmp_path / "out", calib_text, "0.5", capsys)["text"]
    lines = {line.split(":")[0]: line for line in text.splitlines()}
    assert lines["sparsity"].startswith("sparsity: 0.5000 over 122880 prunable decoder weights")
    dense = lines["dense"]
    for name in (
        "model.embed_tokens.weight (1 x 49152)",
        "model.layers.*.mlp.gate.weight (2 x 256)",
    ):
        assert name in dense, dense
    assert main(["eval", "--model", str(tmp_path / "out")]) == 0  # eval says the same
    again = capsys.readouterr().out.splitlines()
    assert [lines["sparsity"], dense] == [x for x in again if x.startswith(("sparsity", "dense"))]


def test_federated_engine_keeps_gpt2_conv1d_orientation(model_dirs, calib_text: Path) -> None:
    """Clients and server exchange GPT-2's Conv1D weights as ``[out, in]`` (N:M along the
    input) and the merged weights land transposed back in the ``[in, out]`` parameters."""
    from helpers import reference_output

    from pruning.config import RunConfig
    from pruning.federated import ClientData, ClientWorker, GlobalModel

    cfg = RunConfig(
        model=str(model_dirs["gpt2"]), method="fedspallm-paper", pattern="2:4", nsamples=2
    )
    cfg.seqlen = SEQLEN
    worker = ClientWorker(cfg.model)

    def data(p: int) -> ClientData:
        return ClientData(sources=[str(calib_text)], partition_id=p, num_partitions=2)

    merged = reference_output(cfg, worker, data, [2, 1])
    server = GlobalModel(cfg.model)
    assert set(merged) == set(server.shapes)
    for key, weight in merged.items():
        server.write(key, weight)
        stored = server.model.get_parameter(key)
        assert tuple(stored.shape) == tuple(weight.shape)[::-1] == server.shapes[key][::-1]
        assert torch.equal(stored.detach().t(), weight.to(stored.dtype))
        assert nm_valid(weight != 0, Pattern(2, 4)), key
