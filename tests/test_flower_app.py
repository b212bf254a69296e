"""End to end: a real `flwr run` of the app in the local Ray simulation, tiny LLaMA, 3 clients."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from deploy_helpers import failure, simulate
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from pruning.payload import decode_payload


@pytest.fixture(scope="module")
def run_dir(tiny_llama_dir: Path, data_dir: Path, tmp_path_factory) -> Path:
    home, out = tmp_path_factory.mktemp("flwr-home"), tmp_path_factory.mktemp("runs")
    overrides = (
        f"model='{tiny_llama_dir}' out-dir='{out}' min-nodes=3 sim-max-layers='2,1,2' "
        "nsamples=8 seqlen=64 eval-max-windows=4"
    )
    proc = simulate(home, data_dir, overrides)
    runs = list(out.glob("fedspallm-*"))
    assert proc.returncode == 0 and len(runs) == 1, failure(proc)
    (out / "stream.log").write_text(proc.stdout + proc.stderr)  # what a user sees
    return runs[0]


def test_model_is_pruned_to_exact_sparsity_and_loads_in_transformers(run_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    for name, module in model.model.layers.named_modules():
        if isinstance(module, torch.nn.Linear):
            zeros, numel = int((module.weight == 0).sum()), module.weight.numel()
            assert abs(zeros - numel // 2) <= 1, name
    out = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(out).all()


def test_report_matches_what_was_sent(run_dir: Path) -> None:
    report = json.loads((run_dir / "report.json").read_text())
    assert report["complete"] and report["unpruned_layers"] == []
    for phase in ("prune", "refine"):  # the default method covers every layer in each phase
        rounds = [r for r in report["rounds"] if r["phase"] == phase]
        assert sorted(i for r in rounds for i in r["aggregated"]) == list(range(4)), phase
    budgets = {n: v["budget"] for n, v in report["nodes"].items()}
    assert sorted(budgets.values()) == [1, 2, 2]
    total = 0
    for rnd in report["rounds"]:
        for node, reply in rnd["replies"].items():
            assert reply["ok"], reply
            assert reply["bytes_up"] == reply["metrics"]["payload-bytes"] > 0
            assert reply["metrics"]["threads"] == 1  # CPUS_PER_CLIENT, set by the client
            # budgets bound the prune phase; in the refine phase every node takes every layer
            limit = budgets[node] if rnd["phase"] == "prune" else 4
            assert reply["metrics"]["layers"] == len(rnd["assignment"][node]) <= limit
            total += reply["bytes_up"]
    assert report["bytes"]["total_up"] == total
    pruned, dense = report["perplexity"]["pruned"], report["perplexity"]["dense"]
    assert set(pruned) == set(dense) and all(v > 1 for v in pruned.values())
    assert (run_dir / "perplexity.png").stat().st_size > 0
    assert (run_dir / "bytes_per_round.png").stat().st_size > 0


def test_output_equals_the_engine_reference(
    run_dir: Path, tiny_llama_dir: Path, data_dir: Path, one_thread: None
):
    """The real run's sparse output, bit for bit, equals the three partitions' payloads merged
    in-process without Flower (checks the whole server path, not a stored blob). One thread, as
    each simulated client has (CPUS_PER_CLIENT=1): float sums depend on the thread count."""
    from helpers import reference_output

    from pruning.config import RunConfig
    from pruning.federated import ClientData, ClientWorker

    report = json.loads((run_dir / "report.json").read_text())
    cfg = RunConfig.parse({k: v for k, v in report["config"].items()})
    worker = ClientWorker(str(tiny_llama_dir))

    def data(p: int) -> ClientData:
        return ClientData(
            sources=list(cfg.calib_sources), partition_id=p, num_partitions=3, root=data_dir
        )

    expected = reference_output(cfg, worker, data, [2, 1, 2])
    decoded = decode_payload((run_dir / "model.sparse.safetensors").read_bytes())
    assert sorted(decoded.sparse) == sorted(expected)
    assert all(torch.equal(decoded.weights[k], expected[k]) for k in expected)


def test_sparse_copy_decodes_to_the_saved_model(run_dir: Path) -> None:
    decoded = decode_payload((run_dir / "model.sparse.safetensors").read_bytes())
    assert decoded.meta.layers == [0, 1, 2, 3]
    model = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    params = dict(model.named_parameters())
    for key, weight in decoded.weights.items():
        assert torch.equal(weight, params[key].detach())


def test_a_run_stopped_after_round_1_resumes_to_the_uninterrupted_model(
    tiny_llama_dir: Path, data_dir: Path, tmp_path: Path, one_thread: None
) -> None:
    """One layer per node and round: the prune phase takes two rounds, the refine phase one.
    The ServerApp stops right after round 1 (``$FEDSPALLM_STOP_AFTER_ROUND``, as a crash
    would); a second `flwr run` with ``resume`` continues it in the same run directory, with
    new simulated nodes, and its model equals, bit for bit, that of the same config run
    without a stop (in process: the engine's output equals a real run's, see above). With
    ``max-message-mb=0.01`` every payload (40-150 KB) comes in 10 KiB parts, each its own
    Flower message, as a 7B model's would in 256 MiB parts."""
    from pruning.config import RunConfig
    from pruning.federated import ClientData, ClientWorker, GlobalModel
    from pruning.server import FederatedRun

    home, out = tmp_path / "flwr-home", tmp_path / "runs"
    common = (
        f"model='{tiny_llama_dir}' out-dir='{out}' min-nodes=3 sim-max-layers='1,1,1' "
        "nsamples=8 seqlen=64 eval-dense=false eval-max-windows=2 max-message-mb=0.01"
    )
    stopped = simulate(home, data_dir, common, FEDSPALLM_STOP_AFTER_ROUND="1")
    runs = list(out.glob("fedspallm-*"))
    assert len(runs) == 1 and stopped.returncode != 0, failure(stopped)
    (run,) = runs
    assert not (run / "report.json").exists()
    state = json.loads((run / "state.json").read_text())
    assert [r["phase"] for r in state["rounds"]] == ["prune"] and len(state["remaining"]) == 1
    assert len(list((run / "checkpoint").glob("layer-*.round-1.safetensors"))) == 3

    resumed = simulate(home, data_dir, f"{common} resume='{run}'")
    assert resumed.returncode == 0, failure(resumed)
    assert list(out.iterdir()) == [run], "a resumed run writes into its own folder"
    report = json.loads((run / "report.json").read_text())
    assert [r["phase"] for r in report["rounds"]] == ["prune", "prune", "refine"]
    assert report["complete"] and not (run / "checkpoint").exists()

    cfg = RunConfig.parse({**report["config"], "resume": ""})
    whole = FederatedRun(cfg, GlobalModel(cfg.model), tmp_path / "whole")
    worker = ClientWorker(cfg.model)
    for p in range(3):
        whole.add_node(p, {"max-layers": 1, "partition-id": p})

    def work(task):
        data = ClientData(
            sources=list(cfg.calib_sources), partition_id=task.node, num_partitions=3, root=data_dir
        )
        return worker.run(task.job, data, task.downlink())

    whole.drive(work)
    pid = {n: int(v["resources"]["partition-id"]) for n, v in report["nodes"].items()}
    played = [{pid[n]: v for n, v in r["assignment"].items()} for r in report["rounds"]]
    assert played == [r.assignment for r in whole.state.rounds]
    saved = load_file(run / "model" / "model.safetensors")
    assert all(torch.equal(saved[k], whole.model.params[k].detach()) for k in whole.model.shapes)


def test_the_stream_shows_each_clients_progress_and_ends_with_the_summary(run_dir: Path) -> None:
    stream = (run_dir.parent / "stream.log").read_text()
    for noise in ("options.` fields", "Loading weights", "Writing model shards", "repeated "):
        assert noise not in stream, noise
    assert "Traceback" not in stream and "Warning" not in stream.replace("WARNING", "")
    report = json.loads((run_dir / "report.json").read_text())
    for rnd in report["rounds"]:  # every job: its layers, one line per layer done, the upload
        for node, layers in rnd["assignment"].items():
            client = f"client {report['nodes'][node]['resources']['partition-id']}"
            assert f"{client}: round {rnd['round']} ({rnd['phase']}): layers {layers}" in stream
            for k in range(1, len(layers) + 1):
                assert re.search(rf"{client}: layer \d+ done \({k}/{len(layers)}\) in ", stream)
            assert f"{client}: round {rnd['round']}: done in " in stream
    summary = stream[stream.index("FedSpaLLM run finished") :]
    dense, pruned = report["perplexity"]["dense"], report["perplexity"]["pruned"]
    for source in pruned:
        assert re.search(rf"{source} +{dense[source]:.2f} -> +{pruned[source]:.2f}\n", summary)
    assert f"{report['bytes']['total_up'] / 1024:.1f} KiB / " in summary
    assert re.search(r"wall time +\d+ s", summary) and report["out"] in summary
