"""Benchmarks of the federated core (issue 3): payload size and aggregation memory.

    python benchmarks/bench_core.py size      # payload bytes / dense bytes, one SmolLM2 layer
    python benchmarks/bench_core.py memory    # peak RSS of aggregating 8 clients, 4096 x 11008

``memory`` encodes the client payloads to a temporary folder in one subprocess, then measures
each aggregation in a fresh subprocess: peak RSS (``ru_maxrss``) minus the RSS just before the
aggregation step, which decodes one client at a time, accumulates, and expands the mask.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import safetensors.torch
import torch

from pruning.aggregate import merge_tensor
from pruning.payload import Expected, PayloadMeta, StoredPayload, decode_payload, encode_payload
from pruning.sparsity import Target, keep_nm, keep_topk, parse_pattern

SMOLLM2_LAYER = {
    "self_attn.q_proj": (576, 576),
    "self_attn.k_proj": (192, 576),
    "self_attn.v_proj": (192, 576),
    "self_attn.o_proj": (576, 576),
    "mlp.gate_proj": (1536, 576),
    "mlp.up_proj": (1536, 576),
    "mlp.down_proj": (576, 1536),
}
BIG_KEY, BIG_SHAPE = "model.layers.0.mlp.gate_proj.weight", (4096, 11008)


def machine() -> str:
    cpu = platform.processor() or "cpu"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return f"{os.cpu_count()} x {cpu}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def best_of(repeats: int, fn, *args) -> float:
    """Fastest of a few runs: the CPUs are shared, so the minimum is the least noisy figure."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return min(times)


def decode_all(blob: bytes, expected: Expected) -> list:
    decoded = decode_payload(blob, expected)
    return [decoded.update(key) for key in decoded.sparse]


def mask_for(scores: torch.Tensor, pattern: str) -> torch.Tensor:
    return keep_nm(scores, parse_pattern(pattern)) if pattern else keep_topk(scores, 0.5)


def bench_size() -> None:
    gen = torch.Generator().manual_seed(0)
    print(f"machine: {machine()}")
    print("| dtype | pattern | dense bytes | payload bytes | ratio | encode s | decode+unpack s |")
    print("|---|---|---|---|---|---|---|")
    for dtype, pattern in [(torch.float16, ""), (torch.float16, "2:4"), (torch.bfloat16, "")]:
        weights, masks = {}, {}
        for name, shape in SMOLLM2_LAYER.items():
            key = f"model.layers.0.{name}.weight"
            weights[key] = torch.randn(shape, generator=gen).to(dtype)
            masks[key] = mask_for(weights[key].abs().float(), pattern)
        meta = PayloadMeta(1, [0], 0.5, pattern, "bench", 0)
        blob = encode_payload(weights, meta, masks)
        expected = Expected({k: w.shape for k, w in weights.items()}, {0})
        encode_s = best_of(3, encode_payload, weights, meta, masks)
        decode_s = best_of(3, decode_all, blob, expected)
        dense = sum(w.numel() * w.element_size() for w in weights.values())
        print(
            f"| {str(dtype)[6:]} | {pattern or 'unstructured 50%'} | {dense} | {len(blob)} "
            f"| {len(blob) / dense:.4f} | {encode_s:.3f} | {decode_s:.3f} |"
        )


def prepare(folder: Path, clients: int, pattern: str) -> None:
    """Clients' payloads: a shared dense weight, per-client noise and ~50 % masks."""
    gen = torch.Generator().manual_seed(0)
    dense = torch.randn(BIG_SHAPE, generator=gen)
    safetensors.torch.save_file({BIG_KEY: dense.half()}, folder / "dense.st")
    for c in range(clients):
        weight = (dense + 0.01 * torch.randn(BIG_SHAPE, generator=gen)).half()
        scores = dense.abs() * torch.empty(BIG_SHAPE).uniform_(0.5, 1.5, generator=gen)
        mask = mask_for(scores, pattern)
        meta = PayloadMeta(1, [0], 0.5, pattern, "bench", 0)
        (folder / f"client{c}.st").write_bytes(
            encode_payload({BIG_KEY: weight}, meta, {BIG_KEY: mask})
        )


def aggregate_once(folder: Path, method: str, scope: str) -> dict:
    """The measured step; runs in a fresh process so ru_maxrss starts near the baseline."""
    pattern = parse_pattern(scope) if ":" in scope else None
    expected = Expected({BIG_KEY: BIG_SHAPE}, {0}, torch.float16, 0.5)
    dense = (
        safetensors.torch.load_file(folder / "dense.st")[BIG_KEY] if method == "mask-vote" else None
    )
    paths = sorted(folder.glob("client*.st"))

    before = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    # as the server does: validate each stored payload, then merge reading one tensor at a time
    sources = [functools.partial(StoredPayload(p, expected).update, BIG_KEY) for p in paths]
    weight, mask = merge_tensor(
        method,
        sources,
        Target(0.5, pattern),
        dense=(lambda: dense) if dense is not None else None,
        per_row=scope == "row",
    )
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    assert weight.numel() - int(torch.count_nonzero(mask)) == weight.numel() // 2
    return {"clients": len(paths), "peak_extra": peak - before, "seconds": seconds}


def bench_memory(clients: int, cases: list[tuple[str, str]]) -> None:
    fp32 = BIG_SHAPE[0] * BIG_SHAPE[1] * 4
    print(f"machine: {machine()}")
    print(f"one dense fp32 copy: {fp32 / 2**20:.1f} MiB; limit 3x = {3 * fp32 / 2**20:.1f} MiB")
    print("| method | scope | clients | peak extra RSS MiB | x fp32 copy | seconds |")
    print("|---|---|---|---|---|---|")
    me = [sys.executable, __file__]
    with tempfile.TemporaryDirectory() as tmp:
        # client payloads depend only on the mask pattern: "" for the global and row scopes
        folders = {
            pattern: Path(tmp) / (pattern.replace(":", "of") or "unstructured")
            for pattern in {scope if ":" in scope else "" for _, scope in cases}
        }
        for pattern, folder in folders.items():
            folder.mkdir()
            subprocess.run([*me, "_prepare", str(folder), str(clients), pattern], check=True)
        for method, scope in cases:
            folder = folders[scope if ":" in scope else ""]
            out = subprocess.run(
                [*me, "_aggregate", str(folder), method, scope], check=True, capture_output=True
            )
            r = json.loads(out.stdout)
            print(
                f"| {method} | {scope} | {r['clients']} | {r['peak_extra'] / 2**20:.1f} "
                f"| {r['peak_extra'] / fp32:.2f} | {r['seconds']:.1f} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["size", "memory", "_prepare", "_aggregate"])
    parser.add_argument("args", nargs="*")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--all", action="store_true", help="memory: also baselines and scopes")
    ns = parser.parse_args()
    if ns.what == "size":
        bench_size()
    elif ns.what == "memory":
        cases = [("l0", "global")]
        if ns.all:
            cases += [("l0", "row"), ("l0", "2:4"), ("fedavg", "global"), ("mask-vote", "global")]
        bench_memory(ns.clients, cases)
    elif ns.what == "_prepare":
        prepare(Path(ns.args[0]), int(ns.args[1]), ns.args[2] if len(ns.args) > 2 else "")
    else:
        print(json.dumps(aggregate_once(Path(ns.args[0]), ns.args[1], ns.args[2])))


if __name__ == "__main__":
    main()
