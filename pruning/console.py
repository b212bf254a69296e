"""What the apps print: one line per step of ours, tagged with who does it, and a closing
summary; not every library's progress bars and warnings from every process.

In a simulation each client process prints the same model-loading bars and library warnings,
and ``flwr run --stream`` interleaves them all. The apps call :func:`setup` before each job: a
simulation process runs the jobs of several clients, so the tag is set anew each time.
"""

from __future__ import annotations

import logging
import os
import sys

OUR_LOGGERS = ("fedspallm", "pruning", "server_app")


class _Tag(logging.Filter):
    """Puts the current tag (e.g. ``client 2``) in front of every line of ours."""

    text = ""

    def filter(self, record: logging.LogRecord) -> bool:
        record.tag = f"{self.text}: " if self.text else ""
        return True


_TAG = _Tag()


class _Handler(logging.StreamHandler):
    """Marks the handler :func:`setup` installed, so a second call adds no second one."""


def setup(tag: str = "") -> None:
    """Our loggers at INFO on stderr, each line with a short time stamp and ``tag`` (Flower's
    own logging is left as it is); the libraries' progress bars and warnings off."""
    _TAG.text = tag
    if not any(isinstance(h, _Handler) for h in logging.getLogger(OUR_LOGGERS[0]).handlers):
        handler = _Handler(sys.stderr)
        handler.addFilter(_TAG)
        handler.setFormatter(logging.Formatter("%(asctime)s %(tag)s%(message)s", "%H:%M:%S"))
        for name in OUR_LOGGERS:
            logger = logging.getLogger(name)
            logger.setLevel(logging.INFO)
            logger.addHandler(handler)
            logger.propagate = False  # not twice through a root handler someone else set up
    # a process forked after a tokenizer ran warns once per fork unless this is set
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # read when datasets loads
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    disable_progress_bars()  # hub downloads: every client would draw its own bars
    hf_logging.disable_progress_bar()  # "Loading weights" / "Writing model shards" bars
    hf_logging.set_verbosity_error()


def summary(report: dict, wall_seconds: float) -> str:
    """The closing block of a run: quality, traffic, time and where the outputs are."""
    cfg, ppl = report["config"], report["perplexity"]
    rule = "-" * 72
    lines = [
        rule,
        f"FedSpaLLM run finished: method {cfg['method']}, sparsity {cfg['sparsity']}"
        + (f" ({cfg['pattern']})" if cfg.get("pattern") else "")
        + (f" (measured {report['sparsity']['overall']:.4f})" if "sparsity" in report else "")
        + f", {report['num_layers'] - len(report['unpruned_layers'])}/{report['num_layers']} "
        f"layers, {len(report['rounds'])} rounds, {len(report['nodes'])} nodes",
    ]
    pruned = ppl.get("pruned", {})
    label = "perplexity (dense -> pruned)" if ppl.get("dense") else "perplexity (pruned)"
    for source, value in pruned.items():
        dense = ppl.get("dense", {}).get(source)
        before = f"{dense:9.2f} -> " if dense is not None else ""
        lines.append(f"  {label:30s} {source:12s} {before}{value:9.2f}")
        label = ""
    totals = report["bytes"]
    lines.append(
        f"  {'bytes up / down':30s} {_size(totals['total_up'])} / {_size(totals['total_down'])}"
    )
    if report["dropped"]:
        lines.append(f"  {'dropped payloads':30s} {len(report['dropped'])} (see report.json)")
    lines.append(f"  {'wall time':30s} {wall_seconds:.0f} s")
    lines.append(f"  {'outputs':30s} {report['out']}")
    files = "model/, model.sparse.safetensors, " if "sparse_bytes" in report else ""
    lines.append(f"  {'':30s} {files}report.json, *.png")
    lines.append(rule)
    return "\n".join(lines)


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    return f"{n / 1024:.1f} KiB" if n < 2**20 else f"{n / 2**20:.1f} MiB"
