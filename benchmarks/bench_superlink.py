"""One large message through a real SuperLink on loopback: time and peak memory per process.

Starts an insecure ``flower-superlink`` and one ``flower-supernode`` on private loopback ports
with the scripts in ``deploy/`` (as the deployment test does), then ``flwr run``s the app in
``benchmarks/bigmsg``: the ServerApp sends one job (with ``--down-mib`` MiB of random bytes) and
the ClientApp answers with one bytes ``Array`` of ``--up-mib`` MiB, both checked by SHA-256. A
sampler thread reads the resident memory of every process (the SuperLink, its ServerApp
subprocess, the SuperNode, its ClientApp subprocess) every 0.1 s and keeps each one's peak.
Not part of CI; the figures in docs/benchmarks.md come from::

    .venv/bin/python benchmarks/bench_superlink.py --up-mib 1024 --out runs/bench_superlink.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
APP = ROOT / "benchmarks" / "bigmsg"
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def role(proc: psutil.Process) -> str:
    """What a process of the deployment is, from its command line."""
    line = " ".join(proc.cmdline())
    names = ("flwr-serverapp", "flwr-clientapp", "flower-superexec", "flower-superlink")
    for name in (*names, "flower-supernode"):
        if name in line:
            return name
    return proc.name()


class Sampler(threading.Thread):
    """Peak RSS (MiB) per tree and role over the process trees of ``roots`` (the SuperLink's:
    itself, its SuperExec and the ServerApp; the SuperNode's: itself, its SuperExec and the
    ClientApp)."""

    def __init__(self, roots: list[int], limit_mib: float) -> None:
        super().__init__(daemon=True)
        self.roots, self.limit_mib = roots, limit_mib
        self.peaks: dict[str, float] = {}
        self.total = 0.0  # peak of the sum over all processes at one instant
        self.done, self.over = threading.Event(), False

    def run(self) -> None:
        while not self.done.is_set():
            now: dict[str, float] = {}
            for pid in self.roots:
                try:
                    root = psutil.Process(pid)
                    tree = [root, *root.children(recursive=True)]
                    top = role(root).removeprefix("flower-")
                except psutil.NoSuchProcess:
                    continue
                for proc in tree:
                    try:
                        key = f"{top}/{role(proc)}"
                        now[key] = now.get(key, 0.0) + proc.memory_info().rss / 2**20
                    except psutil.NoSuchProcess:
                        pass
            for key, mib in now.items():
                self.peaks[key] = max(self.peaks.get(key, 0.0), mib)
            self.total = max(self.total, sum(now.values()))
            if self.total > self.limit_mib:  # the machine is shared: stop before it hurts
                self.over = True
                for pid in self.roots:
                    stop(pid)
                return
            time.sleep(0.1)


def stop(pid: int) -> None:
    """End a process and everything it started (children first), TERM then KILL."""
    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    procs = [*root.children(recursive=True), root]
    for proc in procs:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=5)
    for proc in alive:
        proc.kill()


def started(cmd: list[str], env: dict, log: Path, ready: str, pids: list[int]) -> None:
    """Start a ``deploy/start-*.sh`` command (it ``exec``s the Flower process) in its own
    session, add its PID to ``pids`` and wait until ``ready`` shows in its ``log``."""
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=out, start_new_session=True)
    pids.append(proc.pid)
    deadline = time.monotonic() + 600  # a loaded machine (and nice) slows the start a lot
    while ready not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{cmd[0]} did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.25)


def measure(args: argparse.Namespace, work: Path) -> dict:
    env = {
        **os.environ,
        "FLWR_HOME": str(work / "flwr-home"),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PYTHONUNBUFFERED": "1",  # the readiness lines must reach the logs at once
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
    }
    port, runtime = free_port(), free_port()
    data = work / "data.txt"
    data.write_text("unused: the benchmark app reads no data\n")
    pids = []
    try:
        link = [str(DEPLOY / "start-superlink.sh"), "--insecure", "-H", "127.0.0.1"]
        database = str(work / "state.db") if args.database == "file" else ":flwr-in-memory:"
        link += ["-p", str(port), "-d", database]
        started(link, env, work / "superlink.log", "Uvicorn running", pids)
        node = [str(DEPLOY / "start-supernode.sh"), "--insecure", "-s", f"127.0.0.1:{port}"]
        node += ["-d", str(data), "-p", str(runtime)]
        started(node, env, work / "supernode.log", "SuperNode ID:", pids)
        add = [str(DEPLOY / "add-connection.sh"), "--insecure", "bench", f"127.0.0.1:{port}"]
        subprocess.run(add, env=env, check=True, capture_output=True, timeout=30)
        sampler = Sampler(pids, args.rss_limit_gib * 1024)
        sampler.start()
        result = work / "result.json"
        config = f"up-mib={args.up_mib} down-mib={args.down_mib} result='{result}'"
        start = time.perf_counter()
        run = subprocess.run(
            [str(BIN / "flwr"), "run", str(APP), "bench", "--run-config", config, "--stream"],
            env=env,
            capture_output=True,
            text=True,
            timeout=args.timeout,
        )
        wall = time.perf_counter() - start
        time.sleep(0.5)
        sampler.done.set()
        sampler.join()
        if sampler.over:
            raise RuntimeError(f"stopped: the processes held over {args.rss_limit_gib} GiB")
        if not result.exists():
            logs = "".join(
                (work / f).read_text()[-3000:] for f in ("superlink.log", "supernode.log")
            )
            raise RuntimeError(f"no result; flwr run said:\n{run.stdout[-3000:]}\n{logs}")
        return {
            **json.loads(result.read_text()),
            "flwr_run_wall_s": wall,
            "peak_rss_mib": {k: round(v) for k, v in sorted(sampler.peaks.items())},
            "peak_total_rss_mib": round(sampler.total),
        }
    finally:
        for pid in reversed(pids):
            stop(pid)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--up-mib", type=int, default=1024, help="size of the reply")
    parser.add_argument("--down-mib", type=int, default=0, help="size sent with the job")
    parser.add_argument(
        "--database",
        choices=("file", "memory"),
        default="file",
        help="the SuperLink's state (and message store): a SQLite file, as deploy/ runs it, or "
        "in memory",
    )
    parser.add_argument("--work", type=Path, help="keep logs and state here (default: a temp dir)")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument(
        "--rss-limit-gib", type=float, default=8.0, help="stop everything above this sum"
    )
    parser.add_argument("--out", type=Path, help="append the result as a JSON line")
    args = parser.parse_args()
    if args.work:
        args.work.mkdir(parents=True, exist_ok=True)
        row = measure(args, args.work)
    else:
        with tempfile.TemporaryDirectory(prefix="bench-superlink-") as tmp:
            row = measure(args, Path(tmp))
    row |= {
        "up_mib": args.up_mib,
        "database": args.database,
        "down_mib": args.down_mib,
        "machine": f"{platform.node()} {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}",
        "flwr": subprocess.check_output([str(BIN / "flwr"), "--version"], text=True).strip(),
    }
    print(json.dumps(row, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as fh:
            fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
