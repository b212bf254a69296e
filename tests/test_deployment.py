"""Deployment test: a real SuperLink and three SuperNodes on loopback, TLS and node auth on.

Uses the scripts in deploy/ exactly as docs/deployment.md does. Every process is
started in its own session and ended (with its SuperExec and app subprocesses) in
finally-blocks, also when a hard timeout fires.
"""

from __future__ import annotations

import json
import re
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from deploy_helpers import (
    DEPLOY_DIR,
    REPO_ROOT,
    VENV_BIN,
    Managed,
    ProcessRegistry,
    flower_env,
    flwr_json,
    free_port,
    hard_timeout,
    run_cli,
    wait_until,
)
from safetensors.torch import load_file

NODES = ("alice", "bob", "carol")
CALIBRATION = {
    "alice": ("wikitext2/wiki.valid.tokens", 0),
    "bob": ("ptb/ptb.valid.txt", 0),
    "carol": ("wikitext2/wiki.valid.tokens", 1),
}
CALIBRATION_CHARS = 40_000
CONNECTION = "fedspallm-test"
SETUP_LIMIT_S = 90
RUN_LIMIT_S = 200
PAYLOAD_TOLERANCE = 0.05


@dataclass
class Deployment:
    """A running SuperLink with registered, connected SuperNodes."""

    root: Path
    registry: ProcessRegistry
    supernodes: dict[str, Managed]
    port: int
    cli_env: dict[str, str]

    def flwr(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return run_cli([str(VENV_BIN / "flwr"), *args], self.cli_env, timeout)

    def online_nodes(self) -> int:
        nodes = flwr_json(["supernode", "ls", CONNECTION], self.cli_env)["nodes"]
        return sum(1 for node in nodes if node["status"] == "online")

    def run_info(self, run_id: str) -> dict[str, Any]:
        runs = flwr_json(["ls", CONNECTION, "--run-id", run_id], self.cli_env)["runs"]
        return dict(runs[0])


def _script(name: str) -> str:
    return str(DEPLOY_DIR / name)


def _check(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, f"{result.args}\n{result.stdout}\n{result.stderr}"


def _private_text(data_dir: Path, name: str) -> str:
    """Each node's own calibration text: a different slice or corpus per node (non-IID)."""
    corpus, part = CALIBRATION[name]
    text = (data_dir / corpus).read_text(encoding="utf-8")
    return text[part * CALIBRATION_CHARS : (part + 1) * CALIBRATION_CHARS]


def _start_supernode(
    root: Path, registry: ProcessRegistry, name: str, port: int, text: str
) -> Managed:
    """Start SuperNode `name` (key `keys/<name>`) with its private calibration `text`."""
    data = root / "data" / f"{name}.txt"
    data.parent.mkdir(exist_ok=True)
    data.write_text(text, encoding="utf-8")
    cmd = [_script("start-supernode.sh"), "-s", f"127.0.0.1:{port}"]
    cmd += ["-k", str(root / "keys" / name), "-c", str(root / "certificates" / "ca.crt")]
    cmd += ["-d", str(data), "-L", "2", "-m", "4", "-p", str(free_port())]
    return registry.start(f"supernode-{name}", cmd, flower_env(root / f"home-{name}"))


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Iterator[Deployment]:
    """SuperLink + registered SuperNodes alice, bob, carol; key `mallory` made, not registered."""
    root = tmp_path_factory.mktemp("deployment")
    certs, keys = root / "certificates", root / "keys"
    registry = ProcessRegistry(log_dir=root)
    cli_env = flower_env(root / "home-cli")
    try:
        with hard_timeout(SETUP_LIMIT_S, "deployment setup"):
            _check(run_cli([_script("gen-certs.sh"), "-o", str(certs)], cli_env))
            _check(
                run_cli([_script("gen-node-keys.sh"), "-o", str(keys), *NODES, "mallory"], cli_env)
            )
            port = free_port()
            link_cmd = [_script("start-superlink.sh"), "-c", str(certs), "-H", "127.0.0.1"]
            link_cmd += ["-p", str(port), "-d", str(root / "state" / "link.db")]
            registry.start("superlink", link_cmd, flower_env(root / "home-superlink"))
            address = f"127.0.0.1:{port}"
            add = [_script("add-connection.sh"), CONNECTION, address, str(certs / "ca.crt")]
            _check(run_cli(add, cli_env))
            register = [_script("register-supernodes.sh"), CONNECTION]
            register += [str(keys / f"{name}.pub") for name in NODES]
            wait_until(
                lambda: run_cli(register, cli_env).returncode == 0,
                timeout=30,
                what="the SuperLink to accept registrations",
                interval=1.0,
            )
            supernodes = {
                name: _start_supernode(root, registry, name, port, _private_text(data_dir, name))
                for name in NODES
            }
            dep = Deployment(root, registry, supernodes, port, cli_env)
            wait_until(lambda: dep.online_nodes() == len(NODES), 60, "SuperNodes online", 1.0)
        yield dep
    finally:
        survivors = registry.stop_all()
        assert not survivors, f"processes survived cleanup: {survivors}"


def test_insecure_mode_refused_off_loopback(tmp_path: Path) -> None:
    env = flower_env(tmp_path)
    link = run_cli(
        [_script("start-superlink.sh"), "--insecure", "-H", "0.0.0.0"], env, cwd=tmp_path
    )
    assert link.returncode == 2 and "only allowed on a loopback" in link.stderr
    data = tmp_path / "calib.txt"
    data.write_text("x")
    node = run_cli(
        [_script("start-supernode.sh"), "--insecure", "-s", "10.1.2.3:9093", "-d", str(data)],
        env,
        cwd=tmp_path,
    )
    assert node.returncode == 2 and "only allowed with a loopback" in node.stderr


def test_superlink_speaks_only_tls(deployment: Deployment) -> None:
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{deployment.port}/health", timeout=10)
    wrong_ca = ssl.create_default_context()  # system CAs do not know our private CA
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        urllib.request.urlopen(
            f"https://127.0.0.1:{deployment.port}/health", timeout=10, context=wrong_ca
        )


def test_unregistered_supernode_is_refused(deployment: Deployment) -> None:
    with hard_timeout(90, "unregistered SuperNode check"):
        intruder = _start_supernode(
            deployment.root, deployment.registry, "mallory", deployment.port, "stolen text"
        )
        try:
            returncode = intruder.popen.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("SuperNode with an unregistered key was not refused within 60 s")
        log = intruder.log.read_text(errors="replace")
        assert returncode != 0
        assert "Failed to activate SuperNode" in log, log
        assert deployment.online_nodes() == len(NODES)


def _background_supernode(root: Path, key: Path, data: Path, port: int) -> list[str]:
    """`start-supernode.sh -b`: the script returns, the node lives on (or fails loudly)."""
    cmd = [_script("start-supernode.sh"), "-s", f"127.0.0.1:{port}", "-k", str(key)]
    cmd += ["-c", str(root / "certificates" / "ca.crt"), "-d", str(data)]
    return cmd + ["-p", str(free_port()), "-b", str(root / f"bg-{key.name}.log"), "-w", "60"]


def test_background_supernode_checks_its_data_file_first(tmp_path: Path) -> None:
    cmd = _background_supernode(tmp_path, tmp_path / "key", tmp_path / "missing.txt", 9)
    result = run_cli(cmd, flower_env(tmp_path))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"error: calibration file '{tmp_path / 'missing.txt'}' not readable"
    ]
    assert not (tmp_path / "bg-key.log").exists()  # nothing was started


def test_unregistered_supernode_in_the_background_fails_loudly(deployment: Deployment) -> None:
    """The refusal is the script's exit status and one stderr line, not only a log line."""
    root = deployment.root
    data = root / "data" / "mallory-bg.txt"
    data.parent.mkdir(exist_ok=True)
    data.write_text("stolen text")
    cmd = _background_supernode(root, root / "keys" / "mallory", data, deployment.port)
    env = deployment.registry.tagged_env(flower_env(root / "home-mallory-bg"))
    result = run_cli(cmd, env, timeout=90)
    assert result.returncode == 1, result
    [line] = result.stderr.splitlines()
    assert line.startswith("error: flower-supernode exited with status 1 before it was ready")
    assert "Exit Code: 305" in line and "Failed to activate SuperNode" in line, line
    assert deployment.online_nodes() == len(NODES)


def _log_has(node: Managed, text: str) -> bool:
    return text in node.log.read_text(errors="replace")


def test_fedspallm_run_survives_a_dead_supernode(
    deployment: Deployment, tiny_llama_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    """Prune the tiny LLaMA across the three SuperNodes; one of them dies mid-run."""
    out_dir = tmp_path / "out"
    run_config = (
        f"model='{tiny_llama_dir}' data-dir='{data_dir}' out-dir='{out_dir}' "
        "min-nodes=3 num-server-rounds=4 nsamples=4 seqlen=64 "
        "eval-data='wikitext2/wiki.test.raw' eval-max-windows=2 eval-dense=false "
        "round-timeout=150.0 node-wait-timeout=60.0"
    )
    started = time.monotonic()
    with hard_timeout(RUN_LIMIT_S, "deployment run"):
        result = deployment.flwr(
            "run", str(REPO_ROOT), CONNECTION, "--run-config", run_config, "--format", "json"
        )
        _check(result)
        run_id = json.loads(result.stdout[result.stdout.find("{") :])["run-id"]

        # Crash one SuperNode (with its ClientApp) while it holds a pruning job.
        victim = deployment.supernodes[NODES[-1]]
        wait_until(lambda: _log_has(victim, "Receiving: train message"), 90, "victim's job")
        ProcessRegistry.kill(victim, signal.SIGKILL)
        node_id = re.search(r"SuperNode ID: (\d+)", victim.log.read_text(errors="replace"))
        assert node_id, victim.log

        def finished() -> bool:
            return str(deployment.run_info(run_id)["status"]).startswith("finished")

        wait_until(finished, RUN_LIMIT_S - 30, f"run {run_id} to finish", 2.0)
    info = deployment.run_info(run_id)
    if info["status"] != "finished:completed":
        run_log = deployment.flwr("log", run_id, CONNECTION, "--show").stdout
        pytest.fail(f"{info}\n{run_log}\n{deployment.registry.logs()}")

    run_dir = out_dir / f"fedspallm-{run_id}"
    report = json.loads((run_dir / "report.json").read_text())
    assert report["complete"] and not report["unpruned_layers"], report
    assert report["rounds"][0]["replies"][node_id.group(1)]["ok"] is False, report["rounds"][0]
    assert (run_dir / "model.sparse.safetensors").stat().st_size == report["sparse_bytes"]
    weights = load_file(run_dir / "model" / "model.safetensors")
    pruned = {k: w for k, w in weights.items() if k.endswith("_proj.weight")}
    assert len(pruned) == 4 * 7
    for key, weight in pruned.items():
        assert abs(float((weight == 0).float().mean()) - 0.5) < 0.01, key

    traffic = info["network-traffic"]
    sent = report["bytes"]
    assert abs(traffic["inbound-bytes"] - sent["total_up"]) <= PAYLOAD_TOLERANCE * sent["total_up"]
    print(
        f"\nrun {run_id}: {time.monotonic() - started:.0f} s, {len(report['rounds'])} rounds; "
        f"bytes up: SuperLink {traffic['inbound-bytes']} vs report {sent['total_up']}; "
        f"bytes down: SuperLink {traffic['outbound-bytes']} vs report {sent['total_down']}"
    )
