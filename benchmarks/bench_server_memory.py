"""Peak memory of the server process in a real `flwr run` as the number of clients grows.

Each simulated client gets the same work (``sim-max-layers`` equal for all), so going from 4 to 8
clients doubles the payloads the server receives. Replies are checked and written to the payload
store as they arrive and merged one tensor at a time, so the server's peak should not grow.
The peak is the high-water mark (``VmHWM``) of the ``flwr-simulation`` process, which runs the
ServerApp (the ClientApps run in Ray worker processes), polled until the run ends.

    FEDSPALLM_DATA=../shared/data python benchmarks/bench_server_memory.py --clients 4 8 \\
        --run-config "sim-max-layers='8' nsamples=8 eval-max-windows=4"
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def _watch_peak(stop: threading.Event, peaks: dict[int, int]) -> None:
    """Record the VmHWM of every flwr-simulation process until ``stop`` is set."""
    while not stop.is_set():
        for proc in psutil.process_iter(["cmdline"]):
            cmd = " ".join(proc.info["cmdline"] or [])
            if "flwr-simulation" not in cmd:
                continue
            try:
                status = Path(f"/proc/{proc.pid}/status").read_text()
            except OSError:
                continue
            hwm = next(int(line.split()[1]) for line in status.splitlines() if "VmHWM" in line)
            peaks[proc.pid] = max(peaks.get(proc.pid, 0), hwm * 1024)
        time.sleep(0.5)


def run(clients: int, run_config: str, repo: Path) -> dict:
    out = Path(tempfile.mkdtemp(prefix="bench-server-"))
    env = {
        **os.environ,
        "NUM_SUPERNODES": str(clients),
        "FLWR_HOME": str(out / "flwr-home"),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
    }
    config = f"min-nodes={clients} out-dir='{out}' {run_config}"
    stop, peaks = threading.Event(), {}
    watcher = threading.Thread(target=_watch_peak, args=(stop, peaks), daemon=True)
    watcher.start()
    start = time.perf_counter()
    proc = subprocess.run(
        [str(repo / "scripts/run_simulation.sh"), "--run-config", config],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - start
    stop.set()
    watcher.join()
    if proc.returncode:
        raise SystemExit(proc.stdout[-3000:] + proc.stderr[-3000:])
    report = json.loads(next(out.glob("*/report.json")).read_text())
    uploads = [r for rnd in report["rounds"] for r in rnd["replies"].values() if r["ok"]]
    return {
        "clients": clients,
        "payloads": len(uploads),
        "upload_mib": report["bytes"]["total_up"] / 2**20,
        "server_peak_mib": max(peaks.values()) / 2**20,
        "wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--run-config", default="sim-max-layers='8' nsamples=8 eval-max-windows=4")
    parser.add_argument("--repo", type=Path, default=ROOT, help="app directory to run")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rows = [run(n, args.run_config, args.repo) for n in args.clients]
    print("| clients | payloads | upload MiB | server peak MiB | wall s |\n|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['clients']} | {r['payloads']} | {r['upload_mib']:.1f} | "
            f"{r['server_peak_mib']:.0f} | {r['wall_s']:.0f} |"
        )
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
