"""Run reports: ``report.json`` and two PNG plots (perplexity vs dense, bytes per round)."""

from __future__ import annotations

import json
from pathlib import Path


def bytes_totals(rounds: list[dict]) -> dict:
    """Upload/download bytes per node (report keys are strings) over the run, and totals."""
    up: dict[str, int] = {}
    down: dict[str, int] = {}
    for rnd in rounds:
        for node, entry in rnd["replies"].items():
            up[node] = up.get(node, 0) + entry.get("bytes_up", 0)
            down[node] = down.get(node, 0) + entry.get("bytes_down", 0)
    return {"up": up, "down": down, "total_up": sum(up.values()), "total_down": sum(down.values())}


def write_report(out: Path, report: dict) -> Path:
    path = out / "report.json"
    path.write_text(json.dumps(report, indent=2, default=str))
    return path


def plot_report(out: Path, report: dict) -> list[Path]:
    """Bar charts a reader checks first: did quality hold, and who sent how much."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    ppl = report.get("perplexity", {})
    if ppl.get("pruned"):
        sources = list(ppl["pruned"])
        fig, ax = plt.subplots(figsize=(6, 4))
        width = 0.38
        xs = range(len(sources))
        if ppl.get("dense"):
            ax.bar(
                [x - width / 2 for x in xs],
                [ppl["dense"][s] for s in sources],
                width,
                label="dense",
            )
        ax.bar(
            [x + width / 2 for x in xs],
            [ppl["pruned"][s] for s in sources],
            width,
            label=f"{report['config'].get('method', 'pruned')}",
        )
        ax.set_xticks(list(xs), [Path(s).name for s in sources])
        ax.set_ylabel("perplexity")
        ax.set_title(f"{report.get('model')}: sparsity {report['config'].get('sparsity')}")
        ax.legend()
        fig.tight_layout()
        paths.append(out / "perplexity.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)

    rounds = report.get("rounds", [])
    nodes = sorted({str(n) for r in rounds for n in r["replies"]})
    if rounds and nodes:
        fig, ax = plt.subplots(figsize=(6, 4))
        width = 0.8 / len(nodes)
        for j, node in enumerate(nodes):
            ax.bar(
                [r["round"] + (j - (len(nodes) - 1) / 2) * width for r in rounds],
                [r["replies"].get(node, {}).get("bytes_up", 0) / 2**20 for r in rounds],
                width,
                label=f"node {node[-6:]}",
            )
        ax.set_xlabel("round")
        ax.set_ylabel("upload (MiB)")
        ax.set_xticks([r["round"] for r in rounds])
        ax.legend(fontsize="small")
        fig.tight_layout()
        paths.append(out / "bytes_per_round.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths
