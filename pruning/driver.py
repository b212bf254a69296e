"""Sequential layer driver: prune chosen decoder layers one after another, as SparseGPT does.

The inputs of decoder layer 0 are captured once for every calibration window. Then each layer
up to the last chosen one is moved to the device, and, if chosen, its linears' inputs are
recorded with forward hooks, the linears are pruned, and the layer is run again so the next
layer sees the outputs of the *pruned* layer. Layers not chosen are only propagated. Only one
decoder layer is on the accelerator at a time.

A *refinement* (``start`` given) runs each chosen layer once, as it is loaded (the merged,
already sparse layer the server sent): that one pass records its weights' inputs and feeds the
next layer, so statistics and inputs are those of the merged model. Each weight then restarts
from ``start(key)`` (the dense base weight) and is solved for its fixed mask: one forward pass
per layer instead of two.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .models import LayoutError, Weight, default_device, get_adapter, linear_groups
from .payload import LazyMap, PackedMask
from .pruners import MagnitudePruner, Pruner, make_pruner
from .sparsity import Target

# an expert that saw fewer routed calibration tokens than this is pruned by magnitude (a
# Hessian or input norm from a handful of tokens fits those tokens, not the expert's inputs)
MIN_EXPERT_TOKENS = 8

log = logging.getLogger(__name__)


@dataclass
class PruneConfig:
    method: str = "sparsegpt"
    sparsity: float = 0.5
    pattern: str | None = None  # "2:4" etc.; None for unstructured
    blocksize: int = 128
    percdamp: float = 0.01
    refit: int = 0  # SparseGPT: conjugate-gradient steps re-solving the kept weights
    true_sequential: bool = False
    batch_size: int = 8  # calibration windows per forward call

    def target(self) -> Target:
        """The run-wide target (validated); a refinement passes per-weight fixed masks instead."""
        return Target.of(self.sparsity, self.pattern)


@dataclass
class LayerReport:
    index: int
    seconds: float
    # ‖Y_dense − Y_pruned‖ / ‖Y_dense‖ of the layer's output; None for a refinement, which
    # saves the extra forward pass that would measure it
    rel_error: float | None
    sparsity: dict[str, float] = field(default_factory=dict)  # weight name -> pruned fraction
    masks: dict[str, PackedMask] = field(default_factory=dict)  # state-dict key -> keep mask
    # state-dict key of an expert weight -> tokens routed to each of its experts
    expert_tokens: dict[str, list[int]] = field(default_factory=dict)
    # (state-dict key, expert, tokens) of each expert pruned by magnitude for want of tokens
    fallbacks: list[tuple[str, int | None, int]] = field(default_factory=list)


@dataclass
class PruneReport:
    layers: dict[int, LayerReport] = field(default_factory=dict)
    seconds: float = 0.0
    tokens: int = 0

    def masks(self) -> LazyMap:
        """Keep mask per state-dict key, unpacked when looked up."""
        packed = {k: m for r in self.layers.values() for k, m in r.masks.items()}
        return LazyMap(packed, lambda k: packed[k].unpack())

    def expert_tokens(self) -> dict[str, list[int]]:
        return {k: c for r in self.layers.values() for k, c in r.expert_tokens.items()}

    def fallbacks(self) -> list[dict]:
        """Every expert pruned by magnitude because too few tokens reached it."""
        return [
            {"weight": k, "expert": e, "tokens": c}
            for r in self.layers.values()
            for k, e, c in r.fallbacks
        ]


_ARGS = "__args__"  # where capture_inputs keeps the positional arguments of layer 0


class _Captured(Exception):
    """Raised by the layer-0 stand-in once it has seen its inputs."""


class _StopForward(Exception):
    """Raised by a hook once the modules of interest have run (saves the rest of the layer)."""


def _to(obj, device: torch.device):
    """Move tensors (possibly nested in tuples/lists/dicts) to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


@torch.no_grad()
def capture_inputs(
    model: nn.Module, calib: torch.Tensor, device: torch.device, batch_size: int
) -> tuple[list[torch.Tensor], dict[int, dict]]:
    """Hidden states entering decoder layer 0 (one tensor per batch) and the layer's other
    arguments.

    The whole model runs on its own device (CPU for large models) up to layer 0, where a
    stand-in records what it receives and aborts the forward pass. The arguments are kept per
    batch size: a shorter last batch needs its own (eager attention masks are ``[B, 1, L, L]``).
    Positional ones (GPT-2 passes its mask so) are kept under ``_ARGS``.
    """
    layers = get_adapter(model).layers(model)
    first = layers[0]
    seen: list[torch.Tensor] = []
    kwargs: dict[int, dict] = {}

    class Catcher(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention_type = getattr(first, "attention_type", None)

        def forward(self, hidden, *args, **kw):
            seen.append(hidden.to(device))
            kwargs.setdefault(hidden.shape[0], {**kw, _ARGS: args})
            raise _Captured

    layers[0] = Catcher()
    model_device = next(model.parameters()).device
    try:
        for batch in calib.split(batch_size):
            try:
                model(batch.to(model_device), use_cache=False)
            except _Captured:
                pass
    finally:
        layers[0] = first
    drop = ("past_key_value", "past_key_values", "layer_past", "cache", "use_cache")
    kwargs = {b: {k: v for k, v in kw.items() if k not in drop} for b, kw in kwargs.items()}
    return seen, _to(kwargs, device)


def _forward(
    layer: nn.Module, inps: list[torch.Tensor], kwargs: dict[int, dict]
) -> list[torch.Tensor]:
    outs = []
    for x in inps:
        kw = dict(kwargs[x.shape[0]])
        y = layer(x, *kw.pop(_ARGS, ()), **kw)
        outs.append(y[0] if isinstance(y, (tuple, list)) else y)
    return outs


@dataclass
class _Unit:
    """One matrix a pruner sees: a weight, or one expert of a fused expert weight."""

    weight: Weight
    expert: int | None  # index along a fused weight's first axis
    pruner: Pruner

    def matrix(self, layer: nn.Module) -> torch.Tensor:
        return self.part(self.weight.view(layer))

    def part(self, view: torch.Tensor) -> torch.Tensor:
        """This unit's matrix of a whole weight in the pruners' orientation."""
        return view if self.expert is None else view[self.expert]

    @property
    def is_expert(self) -> bool:
        return self.expert is not None or self.weight.expert is not None


class _ExpertTap(TorchFunctionMode):
    """Feeds each ``F.linear(x, W[e])`` on a fused expert parameter ``W`` to expert ``e``'s
    pruner. The eager expert loop calls it with exactly the tokens the router sent to ``e``."""

    def __init__(self, params: dict[str, torch.Tensor], feed: Callable) -> None:
        super().__init__()
        self.params, self.feed, self.calls = params, feed, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, w = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            for name, p in self.params.items():
                base = p.untyped_storage().data_ptr()
                if w.dim() == 2 and w.untyped_storage().data_ptr() == base:
                    self.feed(name, (w.storage_offset() - p.storage_offset()) // p.stride(0), x)
                    self.calls += 1
        return func(*args, **kwargs)


@contextmanager
def _tapped(layer: nn.Module, fused: list[Weight], feed: Callable):
    """Run the fused expert modules of ``fused`` eagerly (transformers 5 may dispatch them to a
    grouped matmul that never slices per expert) under an :class:`_ExpertTap`."""
    modules: dict[str, list[Weight]] = {}
    for w in fused:
        modules.setdefault(w.module, []).append(w)
    taps = []
    for path, weights in modules.items():
        module = layer.get_submodule(path)
        tap = _ExpertTap({w.name: layer.get_parameter(w.name) for w in weights}, feed)
        taps.append((path, tap))

        def forward(*args, _orig=module.forward, _tap=tap, _module=module, **kw):
            config = getattr(_module, "config", None)
            saved = getattr(config, "_experts_implementation", None)
            if config is not None:
                config._experts_implementation = "eager"
            try:
                with _tap:
                    return _orig(*args, **kw)
            finally:
                if config is not None:
                    config._experts_implementation = saved

        module.forward = forward
    try:
        yield
    finally:
        for path, _ in taps:
            del layer.get_submodule(path).forward
    for path, tap in taps:
        if tap.calls == 0:
            raise LayoutError(
                f"fused experts {path}: no per-expert F.linear call seen in the eager forward; "
                "this expert layout is not supported"
            )


@torch.no_grad()
def _prune_group(layer, weights, inps, kwargs, cfg, target_of, device, collect, start=None):
    """Record the inputs of ``weights`` over all calibration batches, then prune them.

    Experts (fused or per-expert linears) are calibrated on the tokens routed to them; one with
    fewer than ``MIN_EXPERT_TOKENS`` is pruned by magnitude instead. With ``collect`` the layer
    runs to the end and its (still dense) outputs are returned; otherwise the forward pass stops
    as soon as every plain weight of the group has seen its input. ``start`` maps a weight's
    name to the tensor its pruning starts from (default: the weight itself).
    Returns ``(masks, outs, tokens, fallbacks)``.
    """
    units = {
        (w.name, e): _Unit(
            w,
            e,
            make_pruner(cfg.method, w.shape[-1], device, cfg.blocksize, cfg.percdamp, cfg.refit),
        )
        for w in weights
        for e in (range(w.experts) if w.experts else [None])
    }
    plain = {w.name: w for w in weights if not w.experts}
    fused = [w for w in weights if w.experts]
    outs, ran = None, False
    if collect or any(u.pruner.needs_inputs for u in units.values()):
        fired: set[str] = set()
        seen: list[tuple[torch.Tensor, str]] = []  # weights fed the same tensor share statistics
        stop = not collect and not fused

        def hook(name):
            def fn(module, args, output):
                first = next((n for t, n in seen if t is args[0]), None)
                if first is None:
                    units[name, None].pruner.add_batch(args[0])
                    seen.append((args[0], name))
                else:
                    units[name, None].pruner = units[first, None].pruner
                fired.add(name)
                if stop and len(fired) == len(plain):
                    raise _StopForward

            return fn

        def feed(name, expert, x):
            units[name, expert].pruner.add_batch(x)

        handles = [
            layer.get_submodule(w.module).register_forward_hook(hook(n)) for n, w in plain.items()
        ]
        outs = []
        try:
            with _tapped(layer, fused, feed):
                for x in inps:
                    fired.clear()
                    seen.clear()
                    try:
                        outs.extend(_forward(layer, [x], kwargs))
                    except _StopForward:
                        pass
        finally:
            for h in handles:
                h.remove()
        ran = True
    masks, tokens, fallbacks = {}, {}, []
    for w in weights:
        parts, counts = [], []
        for e in range(w.experts) if w.experts else [None]:
            unit = units[w.name, e]
            pruner, count = unit.pruner, unit.pruner.nsamples if ran else None
            if unit.is_expert and count is not None:
                counts.append(count)
                if pruner.needs_inputs and count < MIN_EXPERT_TOKENS:
                    pruner = MagnitudePruner(w.shape[-1], device)
                    fallbacks.append((w.name, e if e is not None else w.expert, count))
            target = target_of(w.name)
            matrix = unit.matrix(layer)
            source = matrix if start is None else unit.part(start(w.name)).to(matrix)
            result = pruner.prune(source, target if e is None else target.part(e))
            matrix.copy_(result.weight)
            parts.append(result.mask.cpu())
        masks[w.name] = torch.stack(parts) if w.experts else parts[0]
        if counts:
            tokens[w.name] = counts
    return masks, outs, tokens, fallbacks


@torch.no_grad()
def prune_layers(
    model: nn.Module,
    calib: torch.Tensor,
    layer_ids: Iterable[int],
    cfg: PruneConfig,
    device: torch.device | str | None = None,
    progress: bool = True,
    targets: Callable[[str], Target] | None = None,
    start: Callable[[str], torch.Tensor] | None = None,
) -> PruneReport:
    """Prune the decoder layers in ``layer_ids`` in place; every other layer stays bit-identical.

    ``calib`` is a ``[N, seqlen]`` token tensor. Layers after the last chosen one are not run.
    ``targets`` maps a weight's state-dict key to its :class:`Target` (default: ``cfg``'s).
    """
    default = cfg.target()
    targets = targets or (lambda key: default)
    device = torch.device(device) if device is not None else default_device()
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    chosen = sorted(set(layer_ids))
    if chosen and not 0 <= chosen[0] <= chosen[-1] < len(layers):
        raise ValueError(f"layer indices {chosen} outside 0..{len(layers) - 1}")
    report = PruneReport(tokens=int(calib.numel()))
    if not chosen:
        return report
    began = time.perf_counter()
    use_cache = getattr(model.config, "use_cache", False)
    model.config.use_cache = False
    inps, kwargs = capture_inputs(model, calib, device, cfg.batch_size)
    bar = _progress(len(chosen), progress)
    try:
        for i in range(chosen[-1] + 1):
            layer = layers[i]
            home = next(layer.parameters()).device
            layer.to(device)
            if i in chosen:
                t0 = time.perf_counter()
                masks, dense = {}, None
                prefix = adapter.prefix(i)
                tokens, fallbacks = {}, []
                # a refinement records every weight in its one pass
                for weights in linear_groups(layer, adapter, cfg.true_sequential and not start):
                    group_masks, outs, group_tokens, group_fallbacks = _prune_group(
                        layer,
                        weights,
                        inps,
                        kwargs,
                        cfg,
                        lambda n, p=prefix: targets(f"{p}{n}"),
                        device,
                        collect=dense is None,
                        start=start and (lambda n, p=prefix: start(f"{p}{n}")),
                    )
                    masks.update(group_masks)
                    tokens.update(group_tokens)
                    fallbacks += group_fallbacks
                    dense = dense if dense is not None else outs
                rel_error = None
                if start is None:
                    inps = _forward(layer, inps, kwargs)
                    num = sum(
                        float((d - o).float().pow(2).sum())
                        for d, o in zip(dense, inps, strict=True)
                    )
                    den = sum(float(d.float().pow(2).sum()) for d in dense)
                    rel_error = (num / den) ** 0.5 if den else 0.0
                else:
                    inps = dense  # the outputs of the layer as loaded: the merged model's flow
                report.layers[i] = LayerReport(
                    index=i,
                    seconds=time.perf_counter() - t0,
                    rel_error=rel_error,
                    sparsity={n: 1.0 - float(m.float().mean()) for n, m in masks.items()},
                    masks={f"{prefix}{n}": PackedMask.pack(m) for n, m in masks.items()},
                    expert_tokens={f"{prefix}{n}": c for n, c in tokens.items()},
                    fallbacks=[(f"{prefix}{n}", e, c) for n, e, c in fallbacks],
                )
                bar(report.layers[i])
            else:
                inps = _forward(layer, inps, kwargs)
            layer.to(home)
    finally:
        model.config.use_cache = use_cache
        bar(None)
    report.seconds = time.perf_counter() - began
    return report


def _progress(total: int, enabled: bool):
    """A tqdm bar over pruned layers, with the last layer's time and error as postfix, and a
    log line per layer with the count done (what a Flower client shows instead of a bar)."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="pruning", unit="layer", disable=not enabled)
    done = 0  # a disabled bar counts nothing

    def update(layer: LayerReport | None) -> None:
        nonlocal done
        if layer is None:
            bar.close()
            return
        done += 1
        err = "-" if layer.rel_error is None else f"{layer.rel_error:.4f}"
        bar.set_postfix(layer=layer.index, sec=f"{layer.seconds:.1f}", err=err)
        bar.update()
        log.info(
            "layer %d done (%d/%d) in %.1fs, rel. error %s",
            layer.index,
            done,
            total,
            layer.seconds,
            err,
        )

    return update
