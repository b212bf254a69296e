"""Compare federated pruning methods on SmolLM2-135M with 4 non-IID clients.

The clients and the server run the app's own task code in one process (``ClientWorker.run``
builds each client's payload from its private shard, ``GlobalModel`` decodes and aggregates
it), without Flower's transport, so that work shared by several methods is done once:
fedprllm, fedavg, local-only and fedspallm with ``scope=all`` all start from each client pruning
every layer on its own data (the layers a fedspallm client uploads are then a subset, chosen by
the same ``assign_layers`` as the strategy). ``fedspallm`` (default ``scope=assigned``) and
``centralized`` (one client calibrated on all four shards) run their own jobs. The real
``flwr run`` of the default config is measured separately (docs/benchmarks.md).

    FEDSPALLM_DATA=../shared/data python benchmarks/bench_federated.py --out bench-fed.json
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from pruning.aggregate import merge_tensor
from pruning.config import RunConfig
from pruning.federated import ClientData, ClientWorker, GlobalModel, Job
from pruning.payload import decode_payload, encode_payload, layer_index
from pruning.sampling import assign_layers

SOURCES = ["wikitext2/wiki.valid.tokens", "ptb/ptb.valid.txt"]
EVAL = ["wikitext2/wiki.test.raw", "ptb/ptb.test.txt"]
MERGE = {"fedprllm": "mask-vote", "fedavg": "fedavg", "centralized": "l0"}


def merged(
    model: str, spec: RunConfig, merge: str, layers_of: dict, payloads: dict, windows: int
) -> dict[str, float]:
    """Merge ``payloads`` tensor by tensor (each over the clients holding it) and evaluate."""
    server = GlobalModel(model)
    decoded = {c: decode_payload(blob) for c, blob in payloads.items()}
    for key in server.shapes:
        holders = [decoded[c] for c, layers in layers_of.items() if layer_index(key) in layers]
        sources = [(lambda h=h, k=key: h.update(k)) for h in holders]
        dense = server.params[key].detach()
        weight, _ = merge_tensor(merge, sources, spec.target(), dense=lambda d=dense: d)
        server.write(key, weight)
    return server.evaluate(EVAL, spec.seqlen, windows)


def run_sparsity(
    model: str, worker: ClientWorker, spec: RunConfig, budgets: list[int], windows: int
) -> list[dict]:
    n = worker.num_layers
    clients = range(len(budgets))
    data = {
        c: ClientData(sources=SOURCES, partition_id=c, num_partitions=len(budgets)) for c in clients
    }
    rows, timing = [], {}

    def jobs(label: str, layers_of: dict, **kw) -> dict[int, bytes]:
        start = time.perf_counter()
        out = {c: worker.run(Job.plan(spec, 1, layers_of[c], **kw), data[c])[0] for c in layers_of}
        timing[label] = time.perf_counter() - start
        return out

    def row(method: str, ppl: dict, upload: int, **extra) -> None:
        rows.append(
            {
                "method": method,
                "sparsity": spec.sparsity,
                "perplexity": ppl,
                "upload_bytes": upload,
                **extra,
            }
        )
        print(json.dumps(rows[-1]), flush=True)

    every = {c: list(range(n)) for c in clients}
    full = jobs("full", every)
    plan = assign_layers(
        {str(c): budgets[c] for c in clients}, list(range(n)), spec.seed, 1
    ).per_client
    sampled = {int(c): layers for c, layers in plan.items()}
    own = jobs("assigned", sampled)
    central = jobs("central", {0: list(range(n))}, union=True)

    row(
        "fedspallm",
        merged(model, spec, "l0", sampled, own, windows),
        sum(map(len, own.values())),
        client_seconds=timing["assigned"],
    )
    sub = {c: worker_subset(full[c], sampled[c]) for c in sampled}
    row(
        "fedspallm (scope=all)",
        merged(model, spec, "l0", sampled, sub, windows),
        sum(map(len, sub.values())),
    )
    row(  # diagnostic: the l0 merge with every client on every layer (4 per layer, not ~2)
        "fedspallm (every client, every layer)",
        merged(model, spec, "l0", every, full, windows),
        sum(map(len, full.values())),
    )
    for method in ("fedprllm", "fedavg"):
        row(
            method,
            merged(model, spec, MERGE[method], every, full, windows),
            sum(map(len, full.values())),
            client_seconds=timing["full"],
        )
    server = GlobalModel(model)
    alone = {
        c: server.evaluate_alone(decode_payload(full[c]), EVAL, spec.seqlen, windows)
        for c in clients
    }
    mean = {s: sum(a[s] for a in alone.values()) / len(alone) for s in EVAL}
    row("local-only (mean)", mean, sum(map(len, full.values())), clients=alone)
    row(
        "centralized",
        merged(model, spec, "l0", {0: every[0]}, central, windows),
        len(central[0]),
        client_seconds=timing["central"],
    )
    return rows


def worker_subset(blob: bytes, layers: list[int]) -> bytes:
    """The payload a client would have sent for ``layers`` only (same codec, same values)."""
    decoded = decode_payload(blob)
    keys = [k for k in decoded.sparse if layer_index(k) in layers]
    meta = replace(decoded.meta, layers=sorted(layers))
    return encode_payload(
        {k: decoded.weights[k] for k in keys}, meta, {k: decoded.masks[k] for k in keys}
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sparsities", default="0.5,0.7")
    parser.add_argument("--budgets", default="24,16,12,8", help="layers per client and round")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    worker = ClientWorker(args.model)
    budgets = [int(b) for b in args.budgets.split(",")]
    server = GlobalModel(args.model)
    rows = [
        {
            "method": "dense",
            "sparsity": 0.0,
            "upload_bytes": 0,
            "perplexity": server.evaluate(EVAL, args.seqlen, args.eval_windows),
        }
    ]
    for sparsity in [float(s) for s in args.sparsities.split(",")]:
        spec = RunConfig(sparsity=sparsity, nsamples=args.nsamples, seqlen=args.seqlen)
        rows += run_sparsity(args.model, worker, spec, budgets, args.eval_windows)
    print("\n| sparsity | method | " + " | ".join(Path(s).name for s in EVAL) + " | upload MiB |")
    print("|---" * (len(EVAL) + 3) + "|")
    for r in rows:
        ppl = " | ".join(f"{r['perplexity'][s]:.2f}" for s in EVAL)
        print(f"| {r['sparsity']} | {r['method']} | {ppl} | {r['upload_bytes'] / 2**20:.1f} |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
