"""Peak memory of each step of a client job and of the server's model, one process per role.

``bench_server_memory.py`` gives the peaks of a whole ``flwr run``; this one says which step
makes them, without Flower: the high-water mark (``VmHWM``) is reset before each step
(``/proc/self/clear_refs``), so each line is that step's own peak, with the resident memory after
it split into anonymous and file-backed pages (a memory-mapped checkpoint or payload counts as
resident while its pages are mapped).

    FEDSPALLM_DATA=../shared/data python benchmarks/bench_memory_steps.py \\
        --model /tmp/llama-1.1b [--repo <another checkout>]

The client steps: load the model (``ClientWorker``), one prune job over ``--layers`` layers
(Wanda, 8x256 calibration windows) writing its payload to a file. The server steps: load the
model (``GlobalModel``), validate that payload as a received one (``StoredPayload``), save the
model and its sparse copy, evaluate 2 windows. ``--model`` is a bf16 ``save_pretrained``
folder, e.g. the random 1.1B LLaMA that ``bench_server_memory.py --random-llama`` makes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _step(name: str, start: float, rows: list[dict]) -> None:
    """Record the step that just ended, then reset the high-water mark for the next."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    mib = {k: int(status[k].split()[0]) // 1024 for k in ("VmHWM", "RssAnon", "RssFile")}
    rows.append({"step": name, "seconds": round(time.perf_counter() - start, 1), **mib})
    Path("/proc/self/clear_refs").write_text("5")


def client(model: str, layers: int, data: Path, payload: Path) -> list[dict]:
    from pruning.config import RunConfig
    from pruning.federated import ClientData, ClientWorker, Job

    rows: list[dict] = []
    _step("start (imports)", time.perf_counter(), rows)
    t = time.perf_counter()
    worker = ClientWorker(model, "bfloat16")
    _step("client: load model and base weights", t, rows)
    cfg = RunConfig.parse(
        {"model": model, "dtype": "bfloat16", "method": "fedspallm-paper", "pruner": "wanda"}
        | {"nsamples": 8, "seqlen": 256}
    )
    job = Job.plan(cfg, 1, list(range(layers)))
    t = time.perf_counter()
    with payload.open("wb") as sink:
        worker.run(job, ClientData(sources=["wikitext2"], root=data), None, sink)
    _step(f"client: prune {layers} layers, payload to a file", t, rows)
    return rows


def server(model: str, data: Path, payload: Path) -> list[dict]:
    from pruning.federated import GlobalModel
    from pruning.payload import StoredPayload

    rows: list[dict] = []
    _step("start (imports)", time.perf_counter(), rows)
    t = time.perf_counter()
    glob = GlobalModel(model, "bfloat16")
    _step("server: load model", t, rows)
    t = time.perf_counter()
    stored = StoredPayload(payload)
    _step(f"server: validate a {payload.stat().st_size / 2**20:.0f} MiB payload", t, rows)
    for key in stored.keys:  # the merge's source: one tensor at a time
        glob.write(key, stored.update(key)[0])
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        glob.save(Path(out), stored.meta.layers, 0.5, "")
    _step("server: save_pretrained and the sparse copy", t, rows)
    t = time.perf_counter()
    glob.evaluate(["wikitext2"], 256, 2, data)
    _step("server: evaluate 2 windows", t, rows)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--repo", type=Path, default=ROOT, help="checkout whose pruning/ to run")
    parser.add_argument("--role", choices=["client", "server"], default=None)
    parser.add_argument("--payload", type=Path, default=None)
    args = parser.parse_args()
    if args.role:  # one role in this process, the rows as JSON on the last line
        sys.path.insert(0, str(args.repo))
        if args.role == "client":
            rows = client(args.model, args.layers, args.data, args.payload)
        else:
            rows = server(args.model, args.data, args.payload)
        print(json.dumps(rows))
        return
    with tempfile.TemporaryDirectory() as tmp:
        payload = Path(tmp) / "payload.safetensors"
        rows = []
        for role in ("client", "server"):
            cmd = [sys.executable, __file__, "--role", role, "--payload", str(payload)]
            cmd += ["--model", args.model, "--layers", str(args.layers), "--data", str(args.data)]
            out = subprocess.run(cmd + ["--repo", str(args.repo)], capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(out.stderr[-3000:])
            rows += json.loads(out.stdout.splitlines()[-1])
    print("| step | s | peak MiB | anon MiB after | file MiB after |\n|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['step']} | {r['seconds']} | {r['VmHWM']} | {r['RssAnon']} | {r['RssFile']} |")


if __name__ == "__main__":
    main()
