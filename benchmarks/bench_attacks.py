"""Poisoning attacks on the default federated run, against the server's payload checks and
screening.

SmolLM2-135M with 4 non-IID clients as in the default ``flwr run`` (partitions 0-1: shards of
WikiText-2 valid, 2-3: shards of PTB valid; budgets 24/16/12/8 layers; ``fedspallm``, 50%), in
one process: ``FederatedRun`` plans, checks, screens and merges, ``ClientWorker`` runs every job
(no Flower transport). One run is clean; in each other run one client (``--attacker``,
partition 1) poisons every payload it sends with one attack of ``pruning.attacks``. Reported:
union perplexity (geometric mean over WikiText-2 test and PTB test, first ``--eval-windows``
windows of 512 tokens), its ratio to the clean run, the check that caught the attacker and the
clients dropped, and the largest deviation the screening accepted (honest clients' margin).

    FEDSPALLM_DATA=../shared/data python benchmarks/bench_attacks.py --out runs/bench_attacks.md
    ... --run-config "screen=false aggregator='l0-median'"   # another defence, same attacks
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import tempfile
import time
from pathlib import Path

import torch

from pruning.attacks import ATTACKS, poison
from pruning.config import RunConfig
from pruning.federated import ClientData, ClientWorker, GlobalModel
from pruning.server import FederatedRun, RunState, Task


def federated(
    cfg: RunConfig, worker: ClientWorker, attack: str, attacker: int, layers: int, out: Path
) -> FederatedRun:
    """The run with every node in this process (node id = partition id); only the first
    ``layers`` layers are pruned if given."""
    run = FederatedRun(cfg, GlobalModel(cfg.model, cfg.dtype), out)
    if layers:
        run.state = RunState(layers, list(range(layers)))
    budgets = cfg.sim_max_layers
    data = {
        p: ClientData(sources=list(cfg.calib_sources), partition_id=p, num_partitions=len(budgets))
        for p in range(len(budgets))
    }
    for p, budget in enumerate(budgets):
        run.add_node(p, {"max-layers": budget, "partition-id": p})

    def work(task: Task) -> tuple[bytes, dict]:
        down = task.downlink()
        blob, metrics = worker.run(task.job, data[task.node], down)
        if attack and task.node == attacker:
            blob = poison(blob, attack, worker.base, down=down)
        return blob, metrics

    run.drive(work)
    return run


def measure(cfg: RunConfig, worker: ClientWorker, attack: str, args) -> dict:
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        run = federated(cfg, worker, attack, args.attacker, args.layers, Path(out))
        ppl = run.evaluate()
    dropped = [
        {"round": r.round, "partition": n, "reason": e.reason}
        for r in run.state.rounds
        for n, e in r.replies.items()
        if not e.ok
    ]
    accepted = [
        (r.phase, e.deviation) for r in run.state.rounds for e in r.replies.values() if e.ok
    ]
    row = {
        "attack": attack or "none (clean)",
        "perplexity": ppl,
        "union": math.exp(sum(math.log(v) for v in ppl.values()) / len(ppl)),
        "dropped": dropped,
        "complete": not run.state.remaining,
        "max_accepted_deviation": {
            phase: max((d for p, d in accepted if p == phase), default=0.0)
            for phase in ("prune", "refine")
        },
        "seconds": time.perf_counter() - start,
    }
    print(json.dumps(row), flush=True)
    return row


def defence(row: dict) -> str:
    """The check that refused the attacker's first payload, from its reason."""
    if not row["dropped"]:
        return "–"
    reason = row["dropped"][0]["reason"]
    if reason.startswith("outlier"):
        return f"screening ({'bound' if 'bound' in reason else 'pool'})"
    return f"payload check ({reason.split(':')[0]})"


def table(rows: list[dict]) -> str:
    clean = rows[0]["union"]
    lines = [
        "| attack | defence | union ppl | x clean | dropped "
        "| largest accepted deviation (prune / refine) |",
        "|---|---|---:|---:|---|---|",
    ]
    for r in rows:
        who = ", ".join(f"partition {d['partition']} (round {d['round']})" for d in r["dropped"])
        devs = " / ".join(f"{v:.3f}" for v in r["max_accepted_deviation"].values())
        lines.append(
            f"| {r['attack']} | {defence(r)} | {r['union']:.2f} | {r['union'] / clean:.3f} | "
            f"{who or '–'}{'' if r['complete'] else ' (incomplete)'} | {devs} |"
        )
    return "\n".join(lines)


def _value(text: str):
    """A run-config value as ``flwr run --run-config`` reads it: true/false, a number, or text."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument(
        "--attacks", default=",".join(ATTACKS), help="comma-separated ('': the clean run only)"
    )
    parser.add_argument("--attacker", type=int, default=1, help="the attacker's partition")
    parser.add_argument("--layers", type=int, default=0, help="prune only the first N (0: all)")
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: its default)")
    parser.add_argument("--run-config", default="", help='more run config, e.g. "screen=false"')
    parser.add_argument("--out", type=Path, default=None, help="markdown table; JSON beside it")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    extra = dict(item.split("=", 1) for item in shlex.split(args.run_config))
    cfg = RunConfig.parse(
        {k: _value(v) for k, v in extra.items()}
        | {"model": args.model, "nsamples": args.nsamples, "eval-max-windows": args.eval_windows}
    )
    worker = ClientWorker(cfg.model, cfg.dtype)
    rows = [measure(cfg, worker, a, args) for a in ["", *filter(None, args.attacks.split(","))]]
    print(table(rows))
    if args.out:
        args.out.write_text(table(rows) + "\n")
        args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
