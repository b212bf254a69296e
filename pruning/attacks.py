"""Poisoned client payloads, to test and measure the server's defences (``pruning.screening``).

Each attack rewrites an honest payload tensor by tensor, given the client's dense base weights;
the result is well-formed (same codec, metadata and layers), so only the server's checks of
density and deviation stand between it and the merge.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping

import torch

from .payload import DENSITY_SLACK, Expected, decode_payload, encode_payload

# (kept weight, keep mask, dense base weight, density limit) -> poisoned (weight, mask)
Attack = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]
]


def _random(weight: torch.Tensor, mask: torch.Tensor, base, limit) -> tuple:
    """Random values of the kept values' norm on the same mask."""
    noise = torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)) * mask
    return (noise * weight.float().norm() / noise.norm()).to(weight.dtype), mask


def _dense_limit_large(weight: torch.Tensor, mask: torch.Tensor, base, limit) -> tuple:
    """As many positions as the density check lets through (the largest base weights are
    added), each at ten times its base value."""
    order = (base.abs().flatten() + mask.flatten() * base.abs().max()).argsort(descending=True)
    wide = torch.zeros(mask.numel(), dtype=torch.bool)
    wide[order[: int(limit * mask.numel())]] = True
    wide = wide.view(mask.shape)
    return (10 * base * wide).to(weight.dtype), wide


ATTACKS: dict[str, Attack] = {
    "scaled-x100": lambda w, m, base, limit: (w * 100, m),
    "random": _random,
    "sign-flip": lambda w, m, base, limit: (-w, m),
    "dense-limit-large": _dense_limit_large,
    "dense": lambda w, m, base, limit: (base.to(w.dtype), torch.ones_like(m)),
}


def poison(
    blob: bytes,
    attack: str,
    base: Mapping[str, torch.Tensor],
    keys: Collection[str] = (),
    down: bytes | None = None,
) -> bytes:
    """The payload ``blob`` with ``attack`` applied to its tensors (only ``keys``, if given);
    ``down``, the job's downlink, gives the masks a (maskless) refine payload fills."""
    masks_of = decode_payload(down).masks.get if down else None
    shapes = {k: tuple(v.shape) for k, v in base.items()}
    decoded = decode_payload(blob, Expected(shapes, masks=masks_of))
    limit = 1.0 - decoded.meta.sparsity + DENSITY_SLACK
    weights, masks = {}, {}
    for key in decoded.keys:
        weights[key], masks[key] = decoded.update(key)
        if not keys or key in keys:
            weights[key], masks[key] = ATTACKS[attack](weights[key], masks[key], base[key], limit)
    return encode_payload(weights, decoded.meta, masks)
