"""ServerApp: build the global model, run FedSpaLLMStrategy, save the model and the report."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from pruning import console
from pruning.checkpoint import Checkpoint
from pruning.config import RunConfig
from pruning.evaluate import describe_sparsity
from pruning.federated import GlobalModel
from pruning.report import plot_report, write_report
from pruning.server import FederatedRun
from server_app.strategy import FedSpaLLMStrategy

log = logging.getLogger("fedspallm.server")
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    start = time.perf_counter()
    console.setup("server")
    cfg = RunConfig.parse(context.run_config)
    out = Path(cfg.out_dir).expanduser().resolve() / f"{cfg.method}-{context.run_id}"
    saved = None
    if cfg.resume:  # continue an interrupted run in its own directory (checked before loading)
        out = Path(cfg.resume).expanduser().resolve()
        saved = Checkpoint(out).read_state(cfg)
    run = FederatedRun(cfg, GlobalModel(cfg.model, cfg.dtype, cfg.keep_dense), out, saved)
    dense = run.evaluate() if cfg.eval_dense else {}
    strategy = FedSpaLLMStrategy(run)
    strategy.summary()
    strategy.run(grid)  # restores a resumed run's state and layers once the nodes reported
    report = run.finish(dense)
    write_report(out, report)
    plot_report(out, report)
    log.info("summary\n%s", console.summary(report, time.perf_counter() - start))
    for line in describe_sparsity(report["sparsity"]) if "sparsity" in report else ():
        log.info("%s", line)
    if not report["complete"]:
        raise RuntimeError(
            f"layers {report['unpruned_layers']} were not pruned; see {out}/report.json"
        )
