"""Benchmark of the pruning engine: perplexity, pruning wall time and peak memory per method.

Every configuration runs in a fresh subprocess, so its peak RSS is its own and no state leaks
between methods. Example (the figures in docs/benchmarks.md)::

    FEDSPALLM_DATA=../shared/data python benchmarks/bench_engine.py --max-windows 64 \\
        --out runs/bench_engine.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = [
    "dense",
    *(f"{m}/{t}" for t in ("0.5", "2:4") for m in ("sparsegpt", "wanda", "magnitude")),
]
EVAL_SOURCES = {"wikitext2": "wikitext2/wiki.test.raw", "ptb": "ptb/ptb.test.txt"}


def peak_rss_gib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_config(config: str, args: argparse.Namespace) -> dict:
    """Load, prune (unless dense) and evaluate one configuration in this process."""
    import torch

    from pruning.data import get_calibration, get_eval_tokens
    from pruning.driver import PruneConfig, prune_layers
    from pruning.evaluate import perplexity, sparsity_report
    from pruning.models import load_model, num_layers
    from pruning.sparsity import parse_pattern

    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model)
    row: dict = {"config": config, "threads": torch.get_num_threads()}
    row["load_1min_start"] = os.getloadavg()[0]  # other work on the machine skews the times
    row["rss_loaded_gib"] = peak_rss_gib()
    if config != "dense":
        method, target = config.split("/")
        pattern = parse_pattern(target) if ":" in target else None
        sparsity = pattern.sparsity if pattern else float(target)
        cfg = PruneConfig(method, sparsity, str(pattern) if pattern else None)
        calib = get_calibration(args.calib, tokenizer, args.nsamples, args.seqlen, args.seed)
        start = time.perf_counter()
        report = prune_layers(model, calib, range(num_layers(model)), cfg, args.device, False)
        row["prune_seconds"] = time.perf_counter() - start
        row["rss_pruned_gib"] = peak_rss_gib()
        row["mean_layer_rel_error"] = sum(r.rel_error for r in report.layers.values()) / len(
            report.layers
        )
        row["sparsity"] = sparsity_report(model)["overall"]
    max_windows = args.max_windows or None
    for name, source in EVAL_SOURCES.items():
        tokens = get_eval_tokens(source, tokenizer)
        windows = tokens.numel() // args.seqlen
        row[f"windows_{name}"] = min(windows, max_windows) if max_windows else windows
        start = time.perf_counter()
        row[f"ppl_{name}"] = perplexity(model, tokens, args.seqlen, args.device, max_windows)
        row[f"eval_seconds_{name}"] = time.perf_counter() - start
    row["rss_peak_gib"] = peak_rss_gib()
    row["load_1min_end"] = os.getloadavg()[0]
    return row


def machine() -> dict:
    """What the figures were measured on (they mean little without it)."""
    import psutil
    import torch
    import transformers

    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next(
        (line.split(":", 1)[1].strip() for line in lscpu.splitlines() if "Model name" in line),
        platform.processor(),
    )
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def fmt(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def table(rows: list[dict]) -> str:
    """Markdown table, one row per configuration."""
    head = (
        "| config | prune time (s) | peak RSS (GiB) | WikiText-2 ppl | PTB ppl | "
        "mean layer rel. error |\n|---|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['config']} | {fmt(r.get('prune_seconds'))} | {fmt(r['rss_peak_gib'], 2)} | "
            f"{fmt(r['ppl_wikitext2'], 2)} | {fmt(r['ppl_ptb'], 2)} | "
            f"{fmt(r.get('mean_layer_rel_error'), 3)} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--configs", nargs="+", default=CONFIGS, help="dense or METHOD/TARGET")
    parser.add_argument("--calib", default="wikitext2/wiki.valid.tokens")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--max-windows", type=int, default=64, help="evaluation windows per corpus; 0: all"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # one config, JSON on stdout
    return parser.parse_args(argv)


def worker_command(args: argparse.Namespace, config: str) -> list[str]:
    """This script, run on one configuration with the same settings."""
    shared = ("model", "calib", "nsamples", "seqlen", "seed", "max_windows", "device")
    flags = [x for k in shared for x in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]
    return [sys.executable, __file__, *flags, "--worker", config]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_config(args.worker, args)))
        return
    rows, load_before = [], os.getloadavg()
    for config in args.configs:
        print(f"running {config} ...", file=sys.stderr, flush=True)
        cmd = worker_command(args, config)
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    result = {
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "worker")},
        "results": rows,
    }
    print(table(rows))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
