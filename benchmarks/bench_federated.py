"""Compare federated pruning methods with real `flwr run` simulations on SmolLM2-135M.

Each (method, sparsity) cell is one run of ``scripts/run_simulation.sh`` (4 non-IID SuperNodes:
two on WikiText-2 valid, two on PTB valid) whose ``report.json`` gives perplexity on the
WikiText-2 and PTB test text and the bytes uploaded. Usage::

    FEDSPALLM_DATA=../shared/data python benchmarks/bench_federated.py --out bench-fed.json

Prints a markdown table; ``--out`` keeps every report's summary as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# row label -> run-config overrides
METHODS = {
    "fedspallm": "method='fedspallm'",
    "fedspallm (scope=all)": "method='fedspallm' scope='all'",
    "fedprllm": "method='fedprllm'",
    "fedavg": "method='fedavg'",
    "local-only (mean)": "method='local-only'",
    "centralized": "method='centralized'",
}


def run(label: str, sparsity: float, extra: str, home: Path, out: Path) -> dict:
    """One simulation; returns the figures of its report."""
    overrides = f"{METHODS[label]} sparsity={sparsity} out-dir='{out}' {extra}"
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }
    before = set(out.glob("*"))
    start = time.perf_counter()
    proc = subprocess.run(
        [str(ROOT / "scripts/run_simulation.sh"), "--run-config", overrides],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - start
    new = sorted(set(out.glob("*")) - before)
    if proc.returncode or not new:
        sys.exit(f"{label} @ {sparsity}: run failed\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    report = json.loads((new[0] / "report.json").read_text())
    return {
        "method": label,
        "sparsity": sparsity,
        "perplexity": report["perplexity"]["pruned"],
        "dense": report["perplexity"].get("dense", {}),
        "clients": report["perplexity"].get("clients", {}),
        "upload_bytes": report["bytes"]["total_up"],
        "download_bytes": report["bytes"]["total_down"],
        "rounds": len(report["rounds"]),
        "wall_seconds": wall,
        "complete": report["complete"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsities", default="0.5,0.7")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--extra", default="", help="more run-config overrides for every run")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        home, out = Path(tmp) / "flwr", Path(tmp) / "runs"
        out.mkdir()
        for sparsity in [float(s) for s in args.sparsities.split(",")]:
            for i, label in enumerate(args.methods.split(",")):
                dense = "eval-dense=true" if i == 0 else "eval-dense=false"
                rows.append(run(label, sparsity, f"{dense} {args.extra}", home, out))
                print(json.dumps(rows[-1]), flush=True)
    sources = list(rows[0]["perplexity"])
    print(
        "\n| sparsity | method | "
        + " | ".join(Path(s).name for s in sources)
        + " | upload MiB | rounds | wall s |"
    )
    print("|---" * (len(sources) + 5) + "|")
    for r in rows:
        ppl = " | ".join(f"{r['perplexity'][s]:.2f}" for s in sources)
        print(
            f"| {r['sparsity']} | {r['method']} | {ppl} | {r['upload_bytes'] / 2**20:.1f} | "
            f"{r['rounds']} | {r['wall_seconds']:.0f} |"
        )
    dense = next((r["dense"] for r in rows if r["dense"]), {})
    if dense:
        print("\ndense: " + ", ".join(f"{Path(s).name} {v:.2f}" for s, v in dense.items()))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
