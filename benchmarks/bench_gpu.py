"""Time the sequential driver on the CUDA path with random-weight models of real shapes.

Pruning time does not depend on the weights' values, so a randomly initialised model with a
real architecture gives the time a real checkpoint would take (quality is measured elsewhere,
on CPU with the real SmolLM2). Usage::

    python benchmarks/bench_gpu.py --shape smollm2-135m --nsamples 32 --seqlen 512
    python benchmarks/bench_gpu.py --shape llama-7b --layers 2 --nsamples 128 --seqlen 2048
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pruning.driver import PruneConfig, prune_layers
from pruning.evaluate import sparsity_report
from pruning.sparsity import Target

SHAPES = {  # published configurations of the two families we time
    "smollm2-135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
    "llama-7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    ),
}


def cpu_agreement(columns: int, rows: int, device: str) -> dict:
    """Prune one random weight on CPU and on ``device`` with the same inputs: masks must agree
    up to float rounding and the output errors must match."""
    from pruning.pruners import SparseGPTPruner

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4096, columns, generator=gen) @ torch.randn(columns, columns, generator=gen)
    w = torch.randn(rows, columns, generator=gen)
    results = {}
    for dev in ("cpu", device):
        pruner = SparseGPTPruner(columns, torch.device(dev))
        pruner.add_batch(x.to(dev))
        out = pruner.prune(w.to(dev), Target(0.5))
        err = ((out.weight.cpu() - w) @ x.t()).norm() / (w @ x.t()).norm()
        results[dev] = (out.mask.cpu(), float(err))
    same = float((results["cpu"][0] == results[device][0]).float().mean())
    return {
        "mask_agreement": same,
        "rel_error_cpu": results["cpu"][1],
        "rel_error_device": results[device][1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=SHAPES, default="smollm2-135m")
    parser.add_argument("--layers", type=int, default=None, help="build only this many layers")
    parser.add_argument("--method", default="sparsegpt")
    parser.add_argument("--pattern", default=None)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    config = dict(SHAPES[args.shape])
    if args.layers:
        config["num_hidden_layers"] = args.layers
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**config)).to(getattr(torch, args.dtype)).eval()
    calib = torch.randint(0, config["vocab_size"], (args.nsamples, args.seqlen))
    cfg = PruneConfig(args.method, 0.5, args.pattern)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    report = prune_layers(
        model, calib, range(config["num_hidden_layers"]), cfg, args.device, progress=False
    )
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else None
    print(
        json.dumps(
            {
                "shape": args.shape,
                "layers": config["num_hidden_layers"],
                "method": args.method,
                "pattern": args.pattern,
                "dtype": args.dtype,
                "device": args.device,
                "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
                "calibration": f"{args.nsamples}x{args.seqlen}",
                "seconds": round(seconds, 2),
                "seconds_per_layer": round(seconds / config["num_hidden_layers"], 3),
                "peak_gpu_gib": peak and round(peak, 2),
                "sparsity": round(sparsity_report(model)["overall"], 6),
                "max_rel_error": round(max(r.rel_error for r in report.layers.values()), 4),
                **(
                    cpu_agreement(config["hidden_size"], config["intermediate_size"], args.device)
                    if args.device != "cpu"
                    else {}
                ),
            }
        )
    )


if __name__ == "__main__":
    main()
