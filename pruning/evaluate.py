"""Perplexity with the SparseGPT protocol and per-layer sparsity reports."""

from __future__ import annotations

import math

import torch
from torch import nn

from .models import default_device, get_adapter, linear_groups


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
    """Zero fraction per prunable linear, per layer, and over all prunable weights."""
    adapter = get_adapter(model)
    layers, zeros, total = {}, 0, 0
    for i, layer in enumerate(adapter.layers(model)):
        per_linear = {}
        for name in linear_groups(layer, adapter, False)[0]:
            w = layer.get_submodule(name).weight
            z = int((w == 0).sum())
            per_linear[name] = z / w.numel()
            zeros, total = zeros + z, total + w.numel()
        layers[i] = per_linear
    return {"overall": zeros / total if total else 0.0, "layers": layers}
