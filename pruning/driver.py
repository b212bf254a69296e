"""Sequential layer driver: prune chosen decoder layers one after another, as SparseGPT does.

The inputs of decoder layer 0 are captured once for every calibration window. Then each layer
up to the last chosen one is moved to the device, and, if chosen, its linears' inputs are
recorded with forward hooks, the linears are pruned, and the layer is run again so the next
layer sees the outputs of the *pruned* layer. Layers not chosen are only propagated. Only one
decoder layer is on the accelerator at a time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from .models import default_device, get_adapter, linear_groups
from .pruners import make_pruner
from .sparsity import Target

log = logging.getLogger(__name__)


@dataclass
class PruneConfig:
    method: str = "sparsegpt"
    sparsity: float = 0.5
    pattern: str | None = None  # "2:4" etc.; None for unstructured
    blocksize: int = 128
    percdamp: float = 0.01
    true_sequential: bool = False
    batch_size: int = 8  # calibration windows per forward call

    def target(self) -> Target:
        """The run-wide target (validated); a refinement passes per-weight fixed masks instead."""
        return Target.of(self.sparsity, self.pattern)


@dataclass
class LayerReport:
    index: int
    seconds: float
    rel_error: float  # ‖Y_dense − Y_pruned‖ / ‖Y_dense‖ of the layer's output
    sparsity: dict[str, float] = field(default_factory=dict)  # linear name -> pruned fraction
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # state-dict key -> keep mask


@dataclass
class PruneReport:
    layers: dict[int, LayerReport] = field(default_factory=dict)
    seconds: float = 0.0
    tokens: int = 0

    def masks(self) -> dict[str, torch.Tensor]:
        return {k: m for r in self.layers.values() for k, m in r.masks.items()}


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
    """Hidden states entering decoder layer 0 (one tensor per batch) and the layer's kwargs.

    The whole model runs on its own device (CPU for large models) up to layer 0, where a
    stand-in records what it receives and aborts the forward pass. The kwargs are kept per
    batch size: a shorter last batch needs its own (eager attention masks are ``[B, 1, L, L]``).
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
            kwargs.setdefault(hidden.shape[0], kw)
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
    drop = ("past_key_value", "cache", "use_cache")
    kwargs = {b: {k: v for k, v in kw.items() if k not in drop} for b, kw in kwargs.items()}
    return seen, _to(kwargs, device)


def _forward(
    layer: nn.Module, inps: list[torch.Tensor], kwargs: dict[int, dict]
) -> list[torch.Tensor]:
    outs = []
    for x in inps:
        y = layer(x, **kwargs[x.shape[0]])
        outs.append(y[0] if isinstance(y, (tuple, list)) else y)
    return outs


@torch.no_grad()
def _prune_group(layer, names, inps, kwargs, cfg, target_of, device, collect):
    """Record the inputs of ``names`` over all calibration batches, then prune them.

    With ``collect`` the layer runs to the end and its (still dense) outputs are returned;
    otherwise the forward pass stops as soon as every linear of the group has seen its input.
    """
    modules = {n: layer.get_submodule(n) for n in names}
    pruners = {
        n: make_pruner(cfg.method, m.weight.shape[1], device, cfg.blocksize, cfg.percdamp)
        for n, m in modules.items()
    }
    outs = None
    if collect or any(p.needs_inputs for p in pruners.values()):
        fired: set[str] = set()
        seen: list[tuple[torch.Tensor, str]] = []  # linears fed the same tensor share statistics

        def hook(name):
            def fn(module, args, output):
                first = next((n for t, n in seen if t is args[0]), None)
                if first is None:
                    pruners[name].add_batch(args[0])
                    seen.append((args[0], name))
                else:
                    pruners[name] = pruners[first]
                fired.add(name)
                if not collect and len(fired) == len(modules):
                    raise _StopForward

            return fn

        handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
        outs = []
        try:
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
    masks = {}
    for n, m in modules.items():
        result = pruners[n].prune(m.weight.data, target_of(n))
        m.weight.data = result.weight
        masks[n] = result.mask.cpu()
    return masks, outs


@torch.no_grad()
def prune_layers(
    model: nn.Module,
    calib: torch.Tensor,
    layer_ids: Iterable[int],
    cfg: PruneConfig,
    device: torch.device | str | None = None,
    progress: bool = True,
    targets: Callable[[str], Target] | None = None,
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
    start = time.perf_counter()
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
                for names in linear_groups(layer, adapter, cfg.true_sequential):
                    group_masks, outs = _prune_group(
                        layer,
                        names,
                        inps,
                        kwargs,
                        cfg,
                        lambda n, p=prefix: targets(f"{p}{n}.weight"),
                        device,
                        collect=dense is None,
                    )
                    masks.update(group_masks)
                    dense = dense if dense is not None else outs
                inps = _forward(layer, inps, kwargs)
                num = sum(
                    float((d - o).float().pow(2).sum()) for d, o in zip(dense, inps, strict=True)
                )
                den = sum(float(d.float().pow(2).sum()) for d in dense)
                report.layers[i] = LayerReport(
                    index=i,
                    seconds=time.perf_counter() - t0,
                    rel_error=(num / den) ** 0.5 if den else 0.0,
                    sparsity={n: 1.0 - float(m.float().mean()) for n, m in masks.items()},
                    masks={f"{prefix}{n}.weight": m for n, m in masks.items()},
                )
                bar(report.layers[i])
            else:
                inps = _forward(layer, inps, kwargs)
            layer.to(home)
    finally:
        model.config.use_cache = use_cache
        bar(None)
    report.seconds = time.perf_counter() - start
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
        bar.set_postfix(layer=layer.index, sec=f"{layer.seconds:.1f}", err=f"{layer.rel_error:.3f}")
        bar.update()
        log.info(
            "layer %d done (%d/%d) in %.1fs, rel. error %.4f",
            layer.index,
            done,
            total,
            layer.seconds,
            layer.rel_error,
        )

    return update
