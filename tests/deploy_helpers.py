"""Process and CLI helpers for the SuperLink/SuperNode deployment test.

Every process is started in its own session, with its output in a log file, and is
tracked so that `ProcessRegistry.stop_all` can end it together with everything it
spawned (SuperExec, ServerApp and ClientApp subprocesses), even after a timeout. Processes
that detach themselves (`start-supernode.sh -b`, the local SuperLink `flwr run` starts) are
found by an environment variable that every process of the registry inherits.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import psutil

REPO_ROOT = Path(__file__).resolve().parent.parent
DEPLOY_DIR = REPO_ROOT / "deploy"
VENV_BIN = Path(sys.executable).parent
TAG_VAR = "FEDSPALLM_TEST_PROCESS_TAG"


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def flower_env(flwr_home: Path) -> dict[str, str]:
    """Environment for Flower processes: private FLWR_HOME, no telemetry or installs."""
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        PYTHONUNBUFFERED="1",
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
    )
    return env


def tail(path: Path, lines: int = 40) -> str:
    """Last lines of a log file, for assertion messages."""
    if not path.exists():
        return f"<{path} missing>"
    text = path.read_text(errors="replace").splitlines()
    return f"--- {path.name} ---\n" + "\n".join(text[-lines:])


@contextmanager
def hard_timeout(seconds: int, what: str) -> Iterator[None]:
    """Raise TimeoutError in the main thread if the block runs longer than `seconds`."""

    def _expire(_signum: int, _frame: FrameType | None) -> None:
        raise TimeoutError(f"{what} exceeded its hard limit of {seconds} s")

    previous = signal.signal(signal.SIGALRM, _expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def wait_until(
    condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.5
) -> None:
    """Poll `condition` until it holds; raise TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


@dataclass
class Managed:
    """A started process, its log file and its name."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def descendants(self) -> list[psutil.Process]:
        """All live processes below this one (SuperExec, app subprocesses)."""
        try:
            return psutil.Process(self.popen.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []


@dataclass
class ProcessRegistry:
    """Starts processes in new sessions and guarantees they all end."""

    log_dir: Path
    started: list[Managed] = field(default_factory=list)
    tag: str = field(default_factory=lambda: uuid.uuid4().hex)

    def tagged_env(self, env: Mapping[str, str]) -> dict[str, str]:
        """`env` plus this registry's tag: whatever runs with it is ended by `stop_all`."""
        return {**env, TAG_VAR: self.tag}

    def tagged(self) -> list[psutil.Process]:
        """Live processes carrying this registry's tag, also those that left their session."""
        found = []
        for proc in psutil.process_iter():
            try:
                if proc.pid != os.getpid() and proc.environ().get(TAG_VAR) == self.tag:
                    found.append(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return found

    def start(
        self, name: str, cmd: list[str], env: Mapping[str, str], cwd: Path | None = None
    ) -> Managed:
        """Start `cmd` in its own session, logging to `<log_dir>/<name>.log`."""
        log = self.log_dir / f"{name}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.tagged_env(env),
                cwd=cwd,
                start_new_session=True,
            )
        managed = Managed(name=name, popen=popen, log=log)
        self.started.append(managed)
        return managed

    @staticmethod
    def kill(managed: Managed, sig: signal.Signals) -> None:
        """Send `sig` to the process, its session and every descendant (SIGKILL: a crash)."""
        victims = managed.descendants()
        try:
            os.killpg(managed.popen.pid, sig)
        except ProcessLookupError:
            pass
        for proc in victims:
            try:
                proc.send_signal(sig)
            except psutil.NoSuchProcess:
                pass

    def stop_all(self, grace: float = 5.0) -> list[int]:
        """End everything started and all descendants; return PIDs that survived.

        SIGTERM first (Flower shuts down cleanly), SIGKILL whatever is left after
        `grace` seconds.
        """
        victims: list[psutil.Process] = self.tagged()
        for managed in self.started:
            victims.extend(managed.descendants())
            try:
                victims.append(psutil.Process(managed.popen.pid))
            except psutil.NoSuchProcess:
                pass
        victims = list({proc.pid: proc for proc in victims}.values())
        for managed in self.started:
            self.kill(managed, signal.SIGTERM)
        for proc in victims:
            try:
                proc.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(victims, timeout=grace)
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(alive, timeout=grace)
        late = self.tagged()  # spawned while the others shut down
        for proc in late:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        _, late_alive = psutil.wait_procs(late, timeout=grace)
        for managed in self.started:
            if managed.popen.poll() is None:
                managed.popen.kill()
            managed.popen.wait(timeout=grace)
        return [proc.pid for proc in [*alive, *late_alive] if _alive(proc)]

    def logs(self) -> str:
        """Tails of all logs, for assertion messages."""
        return "\n".join(tail(m.log) for m in self.started)


def _alive(proc: psutil.Process) -> bool:
    """True if the process still runs (a zombie waiting to be reaped does not)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def run_cli(
    args: list[str], env: Mapping[str, str], timeout: float = 60.0, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a CLI command to completion; any exit status is returned, not raised.

    Raises subprocess.TimeoutExpired (after killing the command) past `timeout` seconds.
    """
    return subprocess.run(
        args,
        env=dict(env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def flwr_json(args: list[str], env: Mapping[str, str], timeout: float = 60.0) -> Any:
    """Run `flwr ... --format json` and return the parsed JSON output."""
    result = run_cli([str(VENV_BIN / "flwr"), *args, "--format", "json"], env, timeout)
    start = result.stdout.find("{")
    if result.returncode != 0 or start < 0:
        raise RuntimeError(f"flwr {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return json.loads(result.stdout[start:])


def simulate(
    home: Path, data_dir: Path, overrides: str, nodes: int = 3, **env: str
) -> subprocess.CompletedProcess:
    """``scripts/run_simulation.sh`` with ``nodes`` SuperNodes of one CPU each and ``overrides``."""
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FEDSPALLM_DATA": str(data_dir),
        "NUM_SUPERNODES": str(nodes),
        "CPUS_PER_CLIENT": "1",
        # a local SuperLink of our own: `flwr run` would reuse any other one on the default ports
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
        **env,
    }
    return subprocess.run(
        [str(REPO_ROOT / "scripts/run_simulation.sh"), "--run-config", overrides],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )


def failure(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout[-3000:] + proc.stderr[-3000:]
