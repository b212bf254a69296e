"""Peak memory of the server and the clients in a real `flwr run` as the number of clients grows.

Each simulated client gets the same work (``sim-max-layers`` equal for all), so going from 4 to 8
clients doubles the payloads the server receives. Replies are checked and written to the payload
store as they arrive and merged one tensor at a time, so the server's peak should not grow.
Peaks are high-water marks (``VmHWM``), polled until the run ends: the server's is that of the
``flwr-simulation`` process, which runs the ServerApp; a client's, that of the Ray worker
process that runs its ClientApp (one worker serves several simulated nodes in turn).

    FEDSPALLM_DATA=../shared/data python benchmarks/bench_server_memory.py --clients 4 8 \\
        --run-config "sim-max-layers='8' nsamples=8 eval-max-windows=4"

``--random-llama`` runs a random-weight LLaMA of about 1.1B parameters (22 layers, hidden 2048,
intermediate 5632, 32 heads, 4 key/value heads, SmolLM2's tokenizer) saved in bfloat16, loaded
and pruned in bfloat16 (the scale benchmark of issue 10):

    FEDSPALLM_DATA=../shared/data python benchmarks/bench_server_memory.py --clients 4 8 \\
        --random-llama /tmp/llama-1.1b --run-config "nsamples=8 seqlen=256 eval-max-windows=2"
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
import torch

ROOT = Path(__file__).resolve().parents[1]


def random_llama(path: Path) -> Path:
    """A random LLaMA of about 1.1B parameters in bfloat16 at ``path`` (made once, seed 0)."""
    if (path / "config.json").exists():
        return path
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from pruning.models import fetch_model

    tokenizer = AutoTokenizer.from_pretrained(fetch_model("smollm2-135m"))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _role(cmd: str) -> str | None:
    """Which part of the simulation a process runs: the server, a client, or neither."""
    if "flwr-simulation" in cmd:
        return "server"
    if cmd.startswith("ray::") and "Actor" in cmd:
        return "client"
    return None


def _watch_peak(stop: threading.Event, peaks: dict[int, tuple[str, int]]) -> None:
    """Record the VmHWM of every server and client process until ``stop`` is set."""
    while not stop.is_set():
        for proc in psutil.process_iter(["cmdline"]):
            role = _role(" ".join(proc.info["cmdline"] or []))
            if role is None:
                continue
            try:
                status = Path(f"/proc/{proc.pid}/status").read_text()
            except OSError:
                continue
            hwm = next(int(line.split()[1]) for line in status.splitlines() if "VmHWM" in line)
            peaks[proc.pid] = (role, max(peaks.get(proc.pid, (role, 0))[1], hwm * 1024))
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

    def peak(role: str) -> float:
        return max((b for r, b in peaks.values() if r == role), default=0) / 2**20

    return {
        "clients": clients,
        "payloads": len(uploads),
        "upload_mib": report["bytes"]["total_up"] / 2**20,
        "download_mib": report["bytes"]["total_down"] / 2**20,
        "server_peak_mib": peak("server"),
        "client_peak_mib": peak("client"),
        "wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--run-config", default="sim-max-layers='8' nsamples=8 eval-max-windows=4")
    parser.add_argument("--repo", type=Path, default=ROOT, help="app directory to run")
    parser.add_argument("--random-llama", type=Path, default=None, help="the 1.1B model's folder")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    config = args.run_config
    if args.random_llama:
        model = random_llama(args.random_llama)
        config = f"model='{model}' dtype='bfloat16' {config}"
    rows = [run(n, config, args.repo) for n in args.clients]
    print(
        "| clients | payloads | upload MiB | download MiB | server peak MiB | client peak MiB "
        "| wall s |\n|---|---|---|---|---|---|---|"
    )
    for r in rows:
        print(
            f"| {r['clients']} | {r['payloads']} | {r['upload_mib']:.1f} | "
            f"{r['download_mib']:.1f} | {r['server_peak_mib']:.0f} | "
            f"{r['client_peak_mib']:.0f} | {r['wall_s']:.0f} |"
        )
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
