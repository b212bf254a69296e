"""Federated merge algorithms against centralized SparseGPT: a quality ablation.

Everything runs in one process, layer by layer: each client keeps the hidden states of its own
calibration windows entering the current decoder layer (a ``Stream``) and pushes them through
each layer once that layer is settled, so several protocols can be simulated without re-running
the whole model for every round. Per layer, a client that holds the layer accumulates its
SparseGPT Hessian once and may solve it several times (its own mask in round A, the server's
fixed mask in round B): the Hessian never leaves the client.

Protocols (``--variants``; the first three are the baselines):

* ``central``: one plain SparseGPT over all clients' windows, every layer (the app's
  ``prune_layers``); ``central+refit=10``: the same with 10 conjugate-gradient refit steps per
  weight (the app's default ``refit``: the same-solver centralized baseline).
* ``local``: each client prunes every layer on its own windows (one model per client);
  ``local+refit=10`` with refit steps, as ``central``.
* ``oneshot``: one pass where every client propagates through its own pruned layers and the
  dense others (the app's ``scope=assigned``). It yields ``paper`` (l0 mean + count-then-|W|
  expansion, the app's ``merge_tensor``), ``act`` (count-then-|W|^2*sum_k E_k expansion),
  ``soft`` (score (count/n)*|W|^2*E, no count-first) and round-B refinements of the paper and
  act masks: the same clients re-solve their layers with ``Target.fixed(mask)`` from the dense
  weights on the same inputs, the server takes the mean (``mean``) or the per-column
  energy-weighted mean (``energy``) of their values. Tokens are equal across clients here, so
  a token-weighted mean is the plain mean.
* ``<src>+B-seqin`` (``paper+B-seqin``: the app's ``fedspallm-sampled``): round B where each
  holder's inputs flow through the round-A merged model below the layer; ``-mean`` takes the
  plain mean (the app's merge), without it the energy mean; ``-all``: every client re-solves
  every layer (``central+B-seqin-all``: on the centralized model's masks, a bound). The source
  may be any stored row: ``merge-l0+B-seqin-all-mean`` refines the masks of the four local
  models' l0 merge, ``local-1+B-seqin-all-mean`` those of client 1 alone.
* ``app-<method>``: the app itself, in process: ``pruning.server.FederatedRun`` planning,
  checking and merging real payloads of ``ClientWorker`` jobs on these clients' windows, with
  the same budgets and the run config's defaults (so ``refit=10``); upload and client seconds as
  the run reports them. ``+key=value`` adds run-config keys (``app-fedspallm+refit=0``: plain
  SparseGPT; ``app-fedspallm-paper+refit=0``: the paper exactly).
* ``merge-<merge>[+refit=N]``: the ``local[+refit=N]`` models merged layer by layer with the
  app's merge (``merge-fedavg``: the app's ``fedavg``; ``merge-mask-vote``: ``fedprllm``;
  ``merge-l0``: the paper's merge with every client on every layer). When every
  client prunes every layer on its own propagation its payloads are its local model, so this
  is those methods without pruning again (values at fp32 here, bf16 in the app).

Calibration: non-IID (4 clients: 2 shards of WikiText-2 valid, 2 of PTB valid, 32x512 each,
budgets 24/16/12/8) or IID (8 clients, each 4 windows from shard k/8 of each corpus, budgets
12/8/6/4/12/8/6/4). DEV perplexity: aligned 512-token windows of the *validation* files that
overlap no calibration window of either split; TEST: the first ``--test-windows`` windows of
the test files. Decisions are taken on DEV only. Intermediate models are cached under
``--cache``; result rows go to the markdown ``--out`` and a JSON file beside it.

    export FEDSPALLM_DATA=../shared/data PY=.venv/bin/python
    $PY benchmarks/bench_quality.py --sparsity 0.5 --variants dense,central,local
    $PY benchmarks/bench_quality.py --sparsity 0.5 --variants oneshot
    $PY benchmarks/bench_quality.py --sparsity 0.5 --variants paper+B-seqin,paper+B-seqin-mean
    $PY benchmarks/bench_quality.py --sparsity 0.5 --variants local
    $PY benchmarks/bench_quality.py --sparsity 0.7 --threads 2 --variants \
        dense,central,central+refit=10,local+refit=10,app-fedspallm,app-fedspallm-paper+refit=0
    $PY benchmarks/bench_quality.py --pattern 2:4 --threads 2 --variants ...   # the same list
    $PY benchmarks/bench_quality.py --split iid --threads 2 --variants ...     # the same list
    $PY benchmarks/bench_quality.py --threads 2 --variants \
        app-fedspallm,app-fedspallm+transport-dtype=float32
    $PY benchmarks/bench_quality.py --sparsity 0.5 --eval test --variants \
        dense,central,paper,paper+B-mean,paper+B-seqin,paper+B-seqin-mean,local
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from pruning.aggregate import merge_tensor
from pruning.config import RunConfig
from pruning.data import load_text, partition, tokenize
from pruning.driver import PruneConfig, _forward, capture_inputs, prune_layers
from pruning.evaluate import perplexity
from pruning.federated import ClientWorker, GlobalModel
from pruning.models import get_adapter, layer_state, linear_groups, load_layer_state, load_model
from pruning.pruners import Pruner, make_pruner
from pruning.report import bytes_totals
from pruning.sampling import assign_layers
from pruning.server import FederatedRun, Task
from pruning.sparsity import Target, as_int, parse_pattern

WIKI, PTB = "wikitext2/wiki.valid.tokens", "ptb/ptb.valid.txt"
TEST = {"wiki": "wikitext2/wiki.test.raw", "ptb": "ptb/ptb.test.txt"}
DEV = {"wiki": WIKI, "ptb": PTB}
SEQLEN, SEED, CPU = 512, 0, torch.device("cpu")
ONESHOT = [
    "paper",
    "act",
    "soft",
    "paper+B-mean",
    "paper+B-energy",
    "act+B-mean",
    "act+B-energy",
]
State = dict[str, torch.Tensor]


# ----------------------------------------------------------------------------- setting, data


@dataclass
class Setting:
    split: str
    sparsity: float
    pattern: str | None

    @property
    def tag(self) -> str:
        return f"{self.split}-{self.pattern or self.sparsity}"

    def target(self) -> Target:
        return Target.of(self.sparsity, self.pattern)


def _starts(tokens: int, nsamples: int, seed: int) -> list[int]:
    """Offsets ``sample_windows`` draws (same generator calls)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, tokens - SEQLEN, (nsamples,), generator=gen).tolist()


def shard_windows(tokens: torch.Tensor, index: int, count: int, n: int) -> tuple[list, list]:
    """Calibration windows of one shard (as ``get_calibration``) and their global token starts."""
    bounds = torch.linspace(0, tokens.numel(), count + 1, dtype=torch.float64).round().long()
    shard = partition(tokens, index, count)
    starts = _starts(shard.numel(), n, SEED)
    return [shard[s : s + SEQLEN] for s in starts], [int(bounds[index]) + s for s in starts]


def split_clients(split: str, corpora: dict[str, torch.Tensor]) -> tuple[list, dict]:
    """Per-client calibration ``[N, 512]`` and every calibration start per corpus."""
    calib, used = [], {name: [] for name in corpora}
    if split == "noniid":
        for c in range(4):
            name = "wiki" if c < 2 else "ptb"
            wins, starts = shard_windows(corpora[name], c % 2, 2, 32)
            calib.append(torch.stack(wins))
            used[name] += starts
    else:
        for c in range(8):
            wins = []
            for name in ("wiki", "ptb"):
                w, starts = shard_windows(corpora[name], c, 8, 4)
                wins += w
                used[name] += starts
            calib.append(torch.stack(wins))
    return calib, used


def dev_windows(tokens: torch.Tensor, used: list[int], count: int) -> torch.Tensor:
    """``count`` aligned windows overlapping no calibration window, spread over the file."""
    free = [
        a
        for a in range(tokens.numel() // SEQLEN)
        if all(s + SEQLEN <= a * SEQLEN or s >= (a + 1) * SEQLEN for s in used)
    ]
    if len(free) < count:
        raise RuntimeError(f"only {len(free)} free dev windows")
    picks = [free[round(i * (len(free) - 1) / max(1, count - 1))] for i in range(count)]
    return torch.cat([tokens[a * SEQLEN : (a + 1) * SEQLEN] for a in picks])[None]


# ----------------------------------------------------------------------------- per-layer work


@dataclass
class Stream:
    """A client's calibration hidden states entering the current layer."""

    inps: list[torch.Tensor]
    kwargs: dict
    seconds: float = 0.0


@torch.no_grad()
def collect(layer: torch.nn.Module, names: list[str], stream: Stream) -> dict[str, Pruner]:
    """SparseGPT statistics of every linear of ``layer`` on ``stream`` (shared inputs share)."""
    t0 = time.perf_counter()
    pruners: dict[str, Pruner] = {}
    seen: list[tuple[torch.Tensor, str]] = []

    def hook(name: str) -> Callable:
        def fn(module, args, output) -> None:
            first = next((n for t, n in seen if t is args[0]), None)
            if first is None:
                if name not in pruners:
                    pruners[name] = make_pruner("sparsegpt", args[0].shape[-1], CPU)
                pruners[name].add_batch(args[0])
                seen.append((args[0], name))
            else:
                pruners[name] = pruners[first]

        return fn

    handles = [layer.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        for x in stream.inps:
            seen.clear()
            _forward(layer, [x], stream.kwargs)
    finally:
        for h in handles:
            h.remove()
    stream.seconds += time.perf_counter() - t0
    return pruners


def solve(
    pruner: Pruner, weight: torch.Tensor, target: Target
) -> tuple[torch.Tensor, torch.Tensor]:
    result = pruner.prune(weight, target)
    return result.weight, result.mask


def advance(layer: torch.nn.Module, stream: Stream) -> None:
    t0 = time.perf_counter()
    stream.inps = _forward(layer, stream.inps, stream.kwargs)
    stream.seconds += time.perf_counter() - t0


def act_mask(
    count: torch.Tensor, score: torch.Tensor, target: Target, count_first: bool = True
) -> torch.Tensor:
    """Keep mask ranking by keep-count first (when asked), then by a non-negative score."""
    bits = as_int(score.float().contiguous()).long()
    key = (count.long() << 32) | bits if count_first else bits
    return target.select(key)


def energy_of(pruner: Pruner) -> torch.Tensor:
    """Per-input-column Σ x² over the calibration tokens (H = 2/n Σ x xᵀ)."""
    return torch.diag(pruner.H) * (pruner.nsamples / 2)


def energy_mean(values: list[torch.Tensor], energy: list[torch.Tensor]) -> torch.Tensor:
    """Per-column energy-weighted mean of same-mask client values."""
    num = sum(e[None, :] * v for v, e in zip(values, energy, strict=True))
    den = sum(energy)[None, :]
    return num / den.clamp(min=1e-30)


def l0_values(
    updates: list[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    total = sum(torch.where(m, w, 0) for w, m in updates)
    count = sum(m.to(torch.uint8) for _, m in updates)
    return total / count.clamp(min=1), count


# ----------------------------------------------------------------------------- the lab


@dataclass
class Lab:
    setting: Setting
    cache: Path
    dev_count: int
    test_count: int
    max_layers: int | None = None  # debug: prune only the first layers
    model: torch.nn.Module = field(init=False)

    def __post_init__(self) -> None:
        self.model, self.tokenizer = load_model("smollm2-135m")
        self.model.config.use_cache = False
        self.adapter = get_adapter(self.model)
        self.layers = self.adapter.layers(self.model)
        self.n = min(len(self.layers), self.max_layers or len(self.layers))
        every = range(len(self.layers))
        self.base = {k: v.clone() for k, v in layer_state(self.model, every).items()}
        corpora = {k: tokenize(load_text(s), self.tokenizer) for k, s in DEV.items()}
        self.calib, _ = split_clients(self.setting.split, corpora)
        used = {k: [] for k in corpora}
        for split in ("noniid", "iid"):  # dev windows avoid both splits' calibration
            for k, v in split_clients(split, corpora)[1].items():
                used[k] += v
        self.dev = {k: dev_windows(corpora[k], used[k], self.dev_count) for k in corpora}
        self.clients = list(range(len(self.calib)))
        budgets = [24, 16, 12, 8] if self.setting.split == "noniid" else [12, 8, 6, 4] * 2
        self.budgets = budgets
        self.plan = self.assignment(budgets)
        self.dir = self.cache / self.setting.tag
        self.dir.mkdir(parents=True, exist_ok=True)

    def assignment(self, budgets: list[int]) -> dict[int, list[int]]:
        """Holders per layer from ``assign_layers`` (round 1, seed 0)."""
        plan = assign_layers({str(c): b for c, b in enumerate(budgets)}, range(self.n), SEED, 1)
        return {
            i: [c for c in self.clients if i in plan.per_client.get(str(c), [])]
            for i in range(self.n)
        }

    def keys(self, i: int) -> list[str]:
        return [f"{self.adapter.prefix(i)}{n}.weight" for n in self.names(i)]

    def names(self, i: int) -> list[str]:
        """The linears' module paths (SmolLM2 has plain ``nn.Linear`` weights only)."""
        return [w.module for w in linear_groups(self.layers[i], self.adapter, False)[0]]

    def restore(self) -> None:
        load_layer_state(self.model, self.base)

    def streams(self, calibs: list[torch.Tensor]) -> list[Stream]:
        self.restore()
        return [Stream(*capture_inputs(self.model, c, CPU, 8)) for c in calibs]

    # ------------------------------------------------------------------ bytes

    def numel(self, i: int) -> int:
        return sum(self.base[k].numel() for k in self.keys(i))

    def up_bytes(self, i: int, values: bool, mask: bool) -> float:
        kept = self.numel(i) * (1 - self.setting.sparsity)
        cols = sum(self.base[k].shape[1] for k in self.keys(i))
        return (4 * kept if values else 0) + (self.numel(i) / 8 if mask else 0) + 4 * cols

    def paper_bytes(self) -> float:
        return sum(len(h) * self.up_bytes(i, True, True) for i, h in self.plan.items())

    # ------------------------------------------------------------------ caching

    def saved(self, name: str) -> Path:
        return self.dir / f"{name.replace('/', '_')}.pt"

    def store(self, name: str, state: State, meta: dict) -> None:
        tmp = self.saved(name).with_suffix(".tmp")
        torch.save({"state": state, "meta": meta}, tmp)
        tmp.rename(self.saved(name))

    def load(self, name: str) -> tuple[State, dict] | None:
        path = self.saved(name)
        if not path.exists():
            return None
        blob = torch.load(path, weights_only=False)
        return blob["state"], blob["meta"]

    # ------------------------------------------------------------------ protocols

    def central(self, name: str) -> None:
        """``central[+refit=N]``."""
        if self.saved(name).exists():
            return
        self.restore()
        t0 = time.perf_counter()
        cfg = self.cfg(refit_steps(name))
        rep = prune_layers(
            self.model, torch.cat(self.calib), range(self.n), cfg, CPU, progress=False
        )
        state = {k: v.clone() for k, v in layer_state(self.model, range(self.n)).items()}
        n = sum(self.up_bytes(i, True, True) for i in range(self.n))
        self.store(
            name,
            state,
            {
                "upload": n,
                "seconds": time.perf_counter() - t0,
                "err": [rep.layers[i].rel_error for i in range(self.n)],
            },
        )

    def local(self, refit: str = "") -> None:
        """``local[+refit=N]``: each client alone, every layer (``local-<c>[+refit=N]``)."""
        for c in self.clients:
            name = f"local-{c}{refit}"
            if self.saved(name).exists():
                continue
            self.restore()
            t0 = time.perf_counter()
            cfg = self.cfg(refit_steps(refit))
            prune_layers(self.model, self.calib[c], range(self.n), cfg, CPU, progress=False)
            state = {k: v.clone() for k, v in layer_state(self.model, range(self.n)).items()}
            n = sum(self.up_bytes(i, True, True) for i in range(self.n))
            self.store(name, state, {"upload": n, "seconds": time.perf_counter() - t0})

    def cfg(self, refit: int = 0) -> PruneConfig:
        """SparseGPT at the setting's target, with ``refit`` refit steps."""
        return PruneConfig("sparsegpt", self.setting.sparsity, self.setting.pattern, refit=refit)

    @torch.no_grad()
    def oneshot(self) -> None:
        """Paper-style round A (own propagation) with its merges and round-B re-solves."""
        if all(self.saved(v).exists() for v in ONESHOT):
            return
        target = self.setting.target()
        streams = self.streams(self.calib)
        out: dict[str, State] = {v: {} for v in ONESHOT}
        for i in range(self.n):
            log(f"oneshot layer {i}")
            layer, holders, names = self.layers[i], self.plan[i], self.names(i)
            prefix = self.adapter.prefix(i)
            load_layer_state(self.model, {k: self.base[k] for k in self.keys(i)})
            pr = {c: collect(layer, names, streams[c]) for c in holders}
            own: dict[int, State] = {}
            for c in holders:
                t0 = time.perf_counter()
                own[c] = {}
                for n in names:
                    key = f"{prefix}{n}.weight"
                    own[c][key], own[c][key + ".mask"] = solve(pr[c][n], self.base[key], target)
                streams[c].seconds += time.perf_counter() - t0
            for n in names:
                key = f"{prefix}{n}.weight"
                ups = [(own[c][key], own[c][key + ".mask"]) for c in holders]
                energy = [energy_of(pr[c][n]) for c in holders]
                sources = [(lambda u=u: u) for u in ups]
                w, paper_mask = merge_tensor("l0", sources, target)
                out["paper"][key] = w
                mean, count = l0_values(ups)
                score = mean.pow(2) * sum(energy)[None, :]
                masks = {"paper": paper_mask, "act": act_mask(count, score, target)}
                out["act"][key] = mean * masks["act"]
                soft = act_mask(count, score * count / len(holders), target, count_first=False)
                out["soft"][key] = mean * soft
                for m in ("paper", "act"):
                    t0 = time.perf_counter()
                    vals = [
                        solve(pr[c][n], self.base[key], Target.fixed(masks[m]))[0] for c in holders
                    ]
                    streams[holders[0]].seconds += time.perf_counter() - t0
                    out[f"{m}+B-mean"][key] = sum(vals) / len(vals)
                    out[f"{m}+B-energy"][key] = energy_mean(vals, energy) * masks[m]
            for c in self.clients:  # own pruned layer if held, else dense
                if i > max(j for j in range(self.n) if c in self.plan[j]):
                    continue
                load_layer_state(
                    self.model,
                    {k: own[c][k] if c in holders else self.base[k] for k in self.keys(i)},
                )
                advance(layer, streams[c])
        a = self.paper_bytes()
        b = sum(len(h) * self.up_bytes(i, True, False) for i, h in self.plan.items())
        secs = sum(s.seconds for s in streams)
        for v in ONESHOT:
            up = a + (b if "+B" in v else 0)
            self.store(v, out[v], {"upload": up, "seconds": secs})

    @torch.no_grad()
    def refine_seq(self, name: str) -> None:
        """Round B on the inputs of the round-A merged model: ``<src>+B-seqin``."""
        if self.saved(name).exists():
            return
        src = name.split("+")[0]
        if (source := self.load(src)) is None:
            raise SystemExit(f"{name}: run {src} first (list it before {name} in --variants)")
        state_a, meta_a = source
        every = name.endswith("-all")  # every client re-solves every layer
        streams = self.streams(self.calib)
        out: State = {}
        for i in range(self.n):
            log(f"{name} layer {i}")
            layer, names = self.layers[i], self.names(i)
            holders = self.clients if every else self.plan[i]
            prefix = self.adapter.prefix(i)
            load_layer_state(self.model, {k: self.base[k] for k in self.keys(i)})
            pr = {c: collect(layer, names, streams[c]) for c in holders}
            for n in names:
                key = f"{prefix}{n}.weight"
                mask = state_a[key] != 0
                vals = [solve(pr[c][n], self.base[key], Target.fixed(mask))[0] for c in holders]
                energy = [energy_of(pr[c][n]) for c in holders]
                out[key] = energy_mean(vals, energy) * mask
                out[key + "#mean"] = sum(vals) / len(vals) * mask
            load_layer_state(self.model, {k: state_a[k] for k in self.keys(i)})
            for c in self.clients:
                advance(layer, streams[c])
        b = sum(
            (len(self.clients) if every else len(h)) * self.up_bytes(i, True, False)
            for i, h in self.plan.items()
        )
        up = meta_a["upload"] + b
        self.store(name, {k: v for k, v in out.items() if "#" not in k}, {"upload": up})
        self.store(
            name + "-mean",
            {k[:-5]: v for k, v in out.items() if k.endswith("#mean")},
            {"upload": up},
        )

    def merged_locals(self, spec: str) -> None:
        """``merge-<merge>[+refit=N]``: the local models (``local-<c>[+refit=N]``) merged layer
        by layer with the app's merge (``pruning.aggregate.MERGES``). When every client prunes
        every layer on its own propagation, its payloads are its local model, so this is the
        app's ``fedavg`` (``merge-fedavg``) and ``fedprllm`` (``merge-mask-vote``) without
        re-pruning."""
        name = f"merge-{spec}"
        if self.saved(name).exists():
            return
        merge, refit = split_refit(spec)
        self.local(refit)
        states = [self.load(f"local-{c}{refit}")[0] for c in self.clients]
        target, out = self.setting.target(), {}
        for i in range(self.n):
            for key in self.keys(i):
                sources = [(lambda st=st, k=key: (st[k], st[k] != 0)) for st in states]
                dense = partial(self.base.__getitem__, key)
                out[key], _ = merge_tensor(merge, sources, target, dense)
        n = sum(self.up_bytes(i, True, True) for i in range(self.n)) * len(self.clients)
        self.store(name, out, {"upload": n})

    def app(self, spec: str) -> None:
        """``app-<method>[+key=value...]``: a whole federated run of the engine on these
        clients, with run-config overrides (e.g. ``app-fedspallm+transport-dtype=float32``)."""
        name = f"app-{spec}"
        if self.saved(name).exists():
            return
        method, *overrides = spec.split("+")
        s = self.setting
        cfg = RunConfig.parse(
            {
                "method": method,
                "sparsity": s.sparsity,
                "pattern": s.pattern or "",
                "nsamples": len(self.calib[0]),
                "seed": SEED,
                **dict(o.split("=", 1) for o in overrides),
            }
        )
        worker = ClientWorker("smollm2-135m")
        run = FederatedRun(cfg, GlobalModel("smollm2-135m"), self.dir / f"{name}.run")
        for c, budget in enumerate(self.budgets):
            run.add_node(c + 1, {"partition-id": c, "max-layers": budget})

        def work(task: Task) -> tuple[bytes, dict]:
            log(f"{name} round {len(run.state.rounds)}: node {task.node} {task.job.layers}")
            return worker.run(task.job, Calib(self.calib[task.node - 1]), task.downlink())

        run.drive(work)
        moved = bytes_totals(run.state.to_dict()["rounds"])
        state = {
            k: v.detach().clone() for k, v in layer_state(run.model.model, range(self.n)).items()
        }
        seconds = sum(
            e.metrics.get("seconds", 0) for r in run.state.rounds for e in r.replies.values()
        )
        self.store(
            name,
            state,
            {"upload": moved["total_up"], "download": moved["total_down"], "seconds": seconds},
        )

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self, state: State | None, split: str) -> dict[str, float]:
        self.restore()
        if state:
            load_layer_state(self.model, state)
        if split == "dev":
            ppl = {k: perplexity(self.model, t, SEQLEN, CPU) for k, t in self.dev.items()}
        else:
            if not hasattr(self, "test_tokens"):
                self.test_tokens = {
                    k: tokenize(load_text(s, "evaluation"), self.tokenizer)[None]
                    for k, s in TEST.items()
                }
            ppl = {
                k: perplexity(self.model, t, SEQLEN, CPU, self.test_count)
                for k, t in self.test_tokens.items()
            }
        ppl["union"] = math.sqrt(ppl["wiki"] * ppl["ptb"])
        return ppl


@dataclass
class Calib:
    """A client's calibration windows, in place of ``ClientData`` (IID clients mix corpora)."""

    windows: torch.Tensor

    def calibration(self, tokenizer, job) -> torch.Tensor:
        return self.windows


def split_refit(name: str) -> tuple[str, str]:
    """``name`` as its base and its ``+refit=N`` suffix (``""`` without one)."""
    base, sep, steps = name.partition("+refit=")
    return base, sep + steps


def refit_steps(name: str) -> int:
    """N of a row named ``...+refit=N`` (0 without the suffix)."""
    return int(split_refit(name)[1].removeprefix("+refit=") or 0)


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


# ----------------------------------------------------------------------------- results


def record(row: dict, out: Path) -> None:
    """Add/replace one result row (locked: several runs may write) and re-render the table."""
    rows_file = out.with_suffix(".json")
    with open(out.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows = json.loads(rows_file.read_text()) if rows_file.exists() else []
        rows = [
            r
            for r in rows
            if (r["setting"], r["variant"], r["eval"])
            != (row["setting"], row["variant"], row["eval"])
        ]
        rows.append(row)
        rows_file.write_text(json.dumps(rows, indent=1))
        out.write_text(render(rows))


def render(rows: list[dict]) -> str:
    lines = ["# Federated merge quality ablation (benchmarks/bench_quality.py)", ""]
    for setting in sorted({r["setting"] for r in rows}):
        for ev in ("dev", "test"):
            sel = [r for r in rows if r["setting"] == setting and r["eval"] == ev]
            if not sel:
                continue
            central = next((r for r in sel if r["variant"] == "central"), None)
            paper_up = sel[0].get("paper_upload") or 1
            lines += [
                f"## {setting}, {ev}",
                "",
                "| variant | wiki ppl | ptb ppl | union ppl | x central | upload MiB "
                "| x paper upload | download MiB | client s |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
            ]
            for r in sorted(sel, key=lambda r: r["ppl"]["union"]):
                p = r["ppl"]
                ratio = f"{p['union'] / central['ppl']['union']:.3f}" if central else "-"
                up = r.get("upload", 0)
                lines.append(
                    f"| {r['variant']} | {p['wiki']:.2f} | {p['ptb']:.2f} | {p['union']:.2f} "
                    f"| {ratio} | {up / 2**20:.1f} | {up / paper_up:.2f} "
                    f"| {r.get('download', 0) / 2**20:.1f} | {r.get('seconds', 0):.0f} |"
                )
            lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--pattern", default=None, help="N:M, e.g. 2:4 (sets sparsity)")
    parser.add_argument("--split", choices=("noniid", "iid"), default="noniid")
    parser.add_argument("--variants", default="dense,central,local,oneshot,paper+B-seqin")
    parser.add_argument("--eval", choices=("dev", "test"), default="dev")
    parser.add_argument("--dev-windows", type=int, default=16)
    parser.add_argument("--test-windows", type=int, default=64)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/q9cache"))
    parser.add_argument("--out", type=Path, default=Path("runs/quality_results.md"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--layers", type=int, default=None, help="debug: first layers only")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    pattern = parse_pattern(args.pattern)
    sparsity = pattern.sparsity if pattern else args.sparsity
    setting = Setting(args.split, sparsity, str(pattern) if pattern else None)
    lab = Lab(setting, args.cache, args.dev_windows, args.test_windows, args.layers)
    for variant in args.variants.split(","):
        base, refit = split_refit(variant)  # refit: the suffix of central and local rows
        groups = {"local": [f"local-{c}{refit}" for c in lab.clients], "oneshot": ONESHOT}
        for name in groups.get(base, [variant]):
            log(f"{setting.tag} {name}")
            if "+B-seqin" in name:  # first: its source may be any of the others
                lab.refine_seq(name.removesuffix("-mean"))
            elif name.startswith("central"):
                lab.central(name)
            elif name.startswith("local-"):
                lab.local(refit)
            elif name in ONESHOT:
                lab.oneshot()
            elif name.startswith("merge-"):
                lab.merged_locals(name.removeprefix("merge-"))
            elif name.startswith("app-"):
                lab.app(name.removeprefix("app-"))
            elif name != "dense":
                raise SystemExit(f"unknown variant {name}")
            state, meta = lab.load(name) if name != "dense" else ({}, {"upload": 0})
            ppl = lab.evaluate(state, args.eval)
            row = {
                "setting": setting.tag,
                "variant": name,
                "eval": args.eval,
                "ppl": ppl,
                "upload": meta.get("upload", 0),
                "download": meta.get("download", 0),
                "seconds": meta.get("seconds", 0),
                "paper_upload": lab.paper_bytes(),
            }
            record(row, args.out)
            log(json.dumps(row))


if __name__ == "__main__":
    main()
