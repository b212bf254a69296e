"""The compose demo end to end: `docker/demo.sh` builds the image, brings up a SuperLink and
three SuperNodes, runs the real SmolLM2-135M, checks the outputs and takes everything down.

It needs a Docker engine and minutes (4-13 on 2 busy CPU cores: docs/benchmarks.md), so it
runs only on demand (``-s`` shows demo.sh's summary: timings, perplexities):

    FEDSPALLM_DOCKER_TEST=1 .venv/bin/python -m pytest -q -s tests/test_docker_demo.py

``FEDSPALLM_DOCKER_ARGS`` adds options of `demo.sh` (``--tls``, a base image, a proxy CA, a
local wheel folder: docs/benchmarks.md has the ones used on the reference machine); ``DOCKER``
picks the docker CLI for the build.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
from pathlib import Path

import pytest
from deploy_helpers import REPO_ROOT
from safetensors import safe_open

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get("FEDSPALLM_DOCKER_TEST") != "1",
        reason="builds and runs the Docker demo: set FEDSPALLM_DOCKER_TEST=1",
    ),
]

DEMO = REPO_ROOT / "docker" / "demo.sh"
PROJECT = "fedspallm-demo"


def _demo_containers(docker: str) -> list[str]:
    cmd = [docker, "ps", "-a", "-q", "--filter", f"label=com.docker.compose.project={PROJECT}"]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()


def test_compose_demo_prunes_smollm2_and_leaves_nothing_running(tmp_path: Path) -> None:
    docker = os.environ.get("DOCKER", "docker")
    out = tmp_path / "outputs"
    args = shlex.split(os.environ.get("FEDSPALLM_DOCKER_ARGS", ""))
    proc = subprocess.run(
        [str(DEMO), "-o", str(out), *args], capture_output=True, text=True, timeout=3 * 3600
    )
    assert proc.returncode == 0, f"demo.sh failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    print(*(line for line in proc.stdout.splitlines() if line.startswith("demo:")), sep="\n")
    assert not _demo_containers(docker), "compose down left containers behind"

    (run_dir,) = out.glob("fedspallm-*")
    report = json.loads((run_dir / "report.json").read_text())
    assert report["complete"] and not report["unpruned_layers"]
    assert len(report["nodes"]) == 3  # three SuperNodes, each with its own calibration file
    assert report["sparsity"]["overall"] == pytest.approx(0.5, abs=0.01)
    dense, pruned = report["perplexity"]["dense"], report["perplexity"]["pruned"]
    assert set(dense) == set(pruned) and pruned
    for source, value in pruned.items():
        assert math.isfinite(value) and value > dense[source]  # 50% sparsity costs quality
    assert (run_dir / "perplexity.png").stat().st_size > 0
    with safe_open(run_dir / "model" / "model.safetensors", "pt") as f:
        weight = f.get_tensor("model.layers.0.mlp.down_proj.weight")
    assert (weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)
