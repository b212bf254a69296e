"""Perplexity with the SparseGPT protocol, and what a pruned model's sparsity covers."""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from .models import default_device, prunable_weights


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokens: torch.Tensor,
    seqlen: int = 2048,
    device: torch.device | str | None = None,
    max_windows: int | None = None,
    batch_size: int = 4,
) -> float:
    """exp of the mean token loss over consecutive non-overlapping windows (remainder dropped).

    Each window is scored on its own (no context carried over), as in SparseGPT and Wanda.
    ``max_windows`` scores only the first windows, for quick CPU runs.
    """
    device = torch.device(device) if device is not None else default_device()
    windows = tokens.numel() // seqlen
    if max_windows is not None:
        windows = min(windows, max_windows)
    if windows == 0:
        raise ValueError(f"{tokens.numel()} tokens is less than one window of {seqlen}")
    ids = tokens.reshape(-1)[: windows * seqlen].view(windows, seqlen)
    home = next(model.parameters()).device
    model.to(device)
    nll = 0.0
    try:
        for batch in ids.split(batch_size):
            batch = batch.to(device)
            logits = model(batch, use_cache=False).logits[:, :-1].float()
            loss = nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="mean"
            )
            nll += float(loss) * batch.shape[0] * seqlen
    finally:
        model.to(home)
    return math.exp(nll / (windows * seqlen))


def sparsity_report(model: nn.Module) -> dict:
    """Zeros over the decoder weights the method prunes, per layer, per expert and overall, and
    every parameter that stayed dense (embeddings, head, norms, biases, routers, weights listed
    as keep-dense) by name and size: the whole claim a pruned model makes."""
    weights = prunable_weights(model)
    layers, experts, zeros, total = {}, {}, 0, 0
    for i, layer_weights in weights.items():
        layers[i] = {}
        for key, (layer, w) in layer_weights.items():
            view = w.view(layer).detach()
            z = int((view == 0).sum())
            layers[i][w.name] = z / view.numel()
            if w.experts:
                experts[key] = [float((view[e] == 0).float().mean()) for e in range(w.experts)]
            zeros, total = zeros + z, total + view.numel()
    pruned = {k for layer_weights in weights.values() for k in layer_weights}
    dense = {n: p.numel() for n, p in model.named_parameters() if n not in pruned}
    return {
        "overall": zeros / total if total else 0.0,
        "pruned_params": total,
        "dense_params": sum(dense.values()),
        "layers": layers,
        "experts": experts,
        "dense": dense,
    }


def dense_groups(dense: dict[str, int]) -> list[tuple[str, int, int]]:
    """``(name with layer indices as *, tensors, parameters)`` of dense parameters, largest
    first: the one-line view of :func:`sparsity_report`'s ``dense`` list."""
    groups: dict[str, list[int]] = {}
    for name, size in dense.items():
        groups.setdefault(re.sub(r"\.\d+\.", ".*.", name), []).append(size)
    return sorted(((n, len(s), sum(s)) for n, s in groups.items()), key=lambda g: (-g[2], g[0]))


def describe_sparsity(report: dict) -> list[str]:
    """Two lines for people (CLI output, the server's log): the sparsity over what was pruned,
    then what stayed dense, so neither is mistaken for the other."""
    total = report["pruned_params"] + report["dense_params"]
    groups = ", ".join(f"{n} ({k} x {p // k})" for n, k, p in dense_groups(report["dense"]))
    return [
        f"sparsity: {report['overall']:.4f} over {report['pruned_params']} prunable decoder "
        f"weights ({report['pruned_params'] / total:.1%} of the model's {total} parameters)",
        f"dense: {report['dense_params']} parameters: {groups}",
    ]
