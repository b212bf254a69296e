"""ServerApp: build the global model, run FedSpaLLMStrategy, save the model and the report."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from pruning.federated import GlobalModel, evaluate_sources
from pruning.report import bytes_totals, plot_report, write_report
from server_app.strategy import PRESETS, FedSpaLLMStrategy, Settings

log = logging.getLogger("fedspallm.server")
app = ServerApp()


def _csv(value: str) -> list[str]:
    return [v.strip() for v in str(value).split(",") if v.strip()]


@app.main()
def main(grid: Grid, context: Context) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    for name in ("fedspallm", "pruning", "server_app"):
        logging.getLogger(name).setLevel(logging.INFO)
    cfg = context.run_config
    if cfg.get("data-dir"):
        os.environ["FEDSPALLM_DATA"] = str(cfg["data-dir"])
    settings = Settings.from_run_config(cfg)
    start = time.perf_counter()
    model = GlobalModel(
        str(cfg["model"]),
        settings.sparsity,
        settings.pattern,
        PRESETS[settings.method] or "l0",
        str(cfg.get("dtype", "float32")),
        bool(cfg.get("vote-scaling", False)),
    )
    out = Path(str(cfg.get("out-dir", "runs"))).expanduser().resolve()
    out = out / f"{settings.method}-{context.run_id}"
    eval_sources = _csv(cfg.get("eval-data", ""))
    max_windows = int(cfg.get("eval-max-windows", 0)) or None

    def evaluate(m: GlobalModel) -> dict[str, float]:
        return evaluate_sources(m.model, m.tokenizer, eval_sources, settings.seqlen, max_windows)

    perplexity = {"dense": evaluate(model) if cfg.get("eval-dense", True) else {}}

    strategy = FedSpaLLMStrategy(model, settings)
    strategy.summary()
    strategy.run(grid)

    saved = model.save(out) if settings.method != "local-only" else {}
    if settings.method == "local-only":
        per_client = {
            str(n): model.evaluate_alone(p, eval_sources, settings.seqlen, max_windows)
            for n, p in strategy.local.items()
        }
        perplexity["clients"] = per_client
        perplexity["pruned"] = (
            {s: sum(c[s] for c in per_client.values()) / len(per_client) for s in eval_sources}
            if per_client
            else {}
        )
    else:
        perplexity["pruned"] = evaluate(model)
    rounds = [
        {
            **asdict(r),
            "assignment": {str(n): v for n, v in r.assignment.items()},
            "replies": {str(n): v for n, v in r.replies.items()},
        }
        for r in strategy.rounds
    ]
    report = {
        "model": cfg["model"],
        "config": dict(cfg),
        "num_layers": model.num_layers,
        "nodes": {
            str(n): {"budget": strategy.reported_budgets.get(n, 0), "resources": r}
            for n, r in strategy.resources.items()
        },
        "rounds": rounds,
        "complete": not strategy.remaining,
        "unpruned_layers": strategy.remaining,
        "bytes": bytes_totals(rounds),
        "perplexity": perplexity,
        **saved,
        "seconds": time.perf_counter() - start,
        "out": str(out),
    }
    out.mkdir(parents=True, exist_ok=True)
    write_report(out, report)
    plot_report(out, report)
    log.info("done in %.0fs: pruned model, report.json and plots in %s", report["seconds"], out)
    log.info("perplexity %s", perplexity)
    if strategy.remaining:
        raise RuntimeError(f"layers {strategy.remaining} were not pruned; see {out}/report.json")
