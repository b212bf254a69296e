"""``fedspallm``: fetch the embedded model, prune a model centrally, evaluate perplexity.

Bad input (missing file, sparsity outside [0, 1), a pattern that is not N:M, an unknown
architecture, a decoder weight no rule prunes) prints one ``error: ...`` line and exits with
status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from .config import PruneSpec
from .data import DataError
from .driver import MIN_EXPERT_TOKENS
from .models import DEFAULT_DTYPE, DEFAULT_MODEL, DTYPES, EMBEDDED, ModelError
from .pruners import METHODS
from .sparsity import SparsityError

USAGE_ERRORS = (DataError, ModelError, SparsityError, FileNotFoundError)


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="embedded name, dir, .gguf, hub id")
    p.add_argument("--dtype", default=DEFAULT_DTYPE, choices=sorted(DTYPES))
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if present)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per window")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def _add_eval(p: argparse.ArgumentParser, flag: str) -> None:
    p.add_argument(flag, nargs="*", default=[], metavar="PATH_OR_NAME", help="evaluation text(s)")
    p.add_argument("--max-windows", type=int, default=None, help="score only the first windows")


def _steps(value: str) -> int:
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"{value!r} is not a count of steps (0: off)")
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedspallm", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    fetch = sub.add_parser("fetch-model", help="download and convert an embedded model once")
    fetch.add_argument("name", choices=sorted(EMBEDDED))
    fetch.add_argument("--force", action="store_true", help="convert again even if cached")
    fetch.add_argument("--json", action="store_true")

    prune = sub.add_parser("prune", help="prune every decoder layer on calibration text")
    _add_model(prune)
    prune.add_argument("--method", default="sparsegpt", choices=METHODS)
    prune.add_argument("--sparsity", type=float, default=None, help="default 0.5 (or N:M's)")
    prune.add_argument("--pattern", default=None, help="N:M semi-structured, e.g. 2:4")
    prune.add_argument("--calib-data", default="wikitext2", help="file or corpus name")
    prune.add_argument("--nsamples", type=int, default=32)
    prune.add_argument("--seed", type=int, default=0)
    prune.add_argument("--layers", default=None, help="comma-separated layer indices (all)")
    prune.add_argument("--true-sequential", action="store_true")
    prune.add_argument(
        "--refit",
        type=_steps,
        default=PruneSpec.refit,
        metavar="N",
        help=f"sparsegpt: CG refit steps (default {PruneSpec.refit}; 0: plain SparseGPT)",
    )
    prune.add_argument(
        "--keep-dense",
        default="",
        metavar="PATTERNS",
        help="comma-separated decoder weights no rule prunes, to keep dense (e.g. mlp.foo.weight)",
    )
    prune.add_argument("--out", type=Path, required=True, help="output directory")
    _add_eval(prune, "--eval-data")

    ev = sub.add_parser("eval", help="perplexity and sparsity of a model")
    _add_model(ev)
    _add_eval(ev, "--data")
    return parser


def _evaluate(model, tokenizer, sources, seqlen, device, max_windows) -> dict[str, float]:
    from .data import get_eval_tokens
    from .evaluate import perplexity

    return {
        src: perplexity(model, get_eval_tokens(src, tokenizer), seqlen, device, max_windows)
        for src in sources
    }


def _cmd_fetch(args) -> dict:
    from .models import fetch_model

    return {"model": args.name, "path": str(fetch_model(args.name, force=args.force))}


def _cmd_prune(args) -> dict:
    from .data import check_source, get_calibration
    from .driver import PruneConfig, prune_layers
    from .evaluate import sparsity_report
    from .models import load_model, num_layers
    from .sparsity import parse_pattern

    pattern = parse_pattern(args.pattern)
    sparsity = args.sparsity
    if sparsity is None:
        sparsity = pattern.sparsity if pattern else 0.5
    cfg = PruneConfig(
        args.method, sparsity, args.pattern, refit=args.refit, true_sequential=args.true_sequential
    )
    cfg.target()  # validate before the slow parts
    if args.out.exists() and any(args.out.iterdir()):
        raise FileExistsError(f"{args.out} exists and is not empty")
    for source in (args.calib_data, *args.eval_data):
        check_source(source)
    keep_dense = [k.strip() for k in args.keep_dense.split(",") if k.strip()]
    model, tokenizer = load_model(args.model, args.dtype, keep_dense=keep_dense)
    layers = list(range(num_layers(model)))
    if args.layers:
        chosen = [int(i) for i in args.layers.split(",") if i.strip().isdigit()]
        if not chosen or set(chosen) - set(layers):
            raise ModelError(f"--layers {args.layers!r}: the model has layers 0..{layers[-1]}")
        layers = chosen
    calib = get_calibration(args.calib_data, tokenizer, args.nsamples, args.seqlen, args.seed)
    report = prune_layers(model, calib, layers, cfg, args.device, progress=not args.json)
    summary = {
        "model": args.model,
        "config": vars(cfg),
        "calibration": {
            "source": args.calib_data,
            "nsamples": args.nsamples,
            "seqlen": args.seqlen,
            "seed": args.seed,
            "tokens": report.tokens,
        },
        "seconds": report.seconds,
        "layer_errors": {i: r.rel_error for i, r in report.layers.items()},
        "expert_tokens": report.expert_tokens(),
        "expert_fallbacks": report.fallbacks(),
        "keep_dense": keep_dense,
        "sparsity": sparsity_report(model),
        "perplexity": _evaluate(
            model, tokenizer, args.eval_data, args.seqlen, args.device, args.max_windows
        ),
        "out": str(args.out),
    }
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    (args.out / "fedspallm-summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _cmd_eval(args) -> dict:
    from .data import check_source
    from .evaluate import sparsity_report
    from .models import load_model

    for source in args.data:
        check_source(source)
    model, tokenizer = load_model(args.model, args.dtype)
    return {
        "model": args.model,
        "sparsity": sparsity_report(model),
        "perplexity": _evaluate(
            model, tokenizer, args.data, args.seqlen, args.device, args.max_windows
        ),
    }


def _print_text(result: dict) -> None:
    for key in ("model", "path", "out", "seconds"):
        if key in result:
            print(f"{key}: {result[key]}")
    sparsity = result.get("sparsity")
    if isinstance(sparsity, dict):
        from .evaluate import describe_sparsity

        print("\n".join(describe_sparsity(sparsity)))
    elif sparsity is not None:
        print(f"sparsity: {sparsity:.4f}")
    for fb in result.get("expert_fallbacks", []):
        print(
            f"expert fallback (magnitude, {fb['tokens']} routed tokens < {MIN_EXPERT_TOKENS}): "
            f"{fb['weight']}[{fb['expert']}]"
        )
    for src, ppl in result.get("perplexity", {}).items():
        print(f"perplexity[{src}]: {ppl:.3f}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its weight-loading bar would bury our one error line
    commands = {"fetch-model": _cmd_fetch, "prune": _cmd_prune, "eval": _cmd_eval}
    start = time.perf_counter()
    try:
        result = commands[args.command](args)
    except (*USAGE_ERRORS, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result["wall_seconds"] = time.perf_counter() - start
    if args.json:
        print(json.dumps(result, default=str))
    else:
        _print_text(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
