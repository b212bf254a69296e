"""Screening of well-formed payloads before the merge: the server's poisoning defence.

The server holds the weights every job started from (the dense base in the prune phase, the
merged layers it sent down in the refine phase), so it can measure how far a client moved each
tensor: the **relative deviation** ``||v - r|| / ||r||`` over the positions the payload kept
(``v`` the client's kept values, ``r`` the server's weights there). Honest clients move little:
Wanda and magnitude only round to the transport dtype, SparseGPT compensates the pruned weights
on the kept ones; scaled, sign-flipped or random values move a tensor by about 1.4 or more. A
payload is an **outlier** when any one of its tensors

* exceeds ``max_deviation`` (an absolute bound: the only test a lone client faces), or
* stands out of its pool, the deviations of the same tensor name (``mlp.down_proj.weight``) in
  every payload and layer of the round: above ``median + k * 1.4826 * MAD``, the MAD floored at
  :data:`MAD_FLOOR` of the median and at :data:`MAD_MIN`, so near-identical honest deviations
  do not trip it. Pooling over layers matters: a layer has about two holders in the default
  run, too few to tell which one is wrong. The pool test only cuts above half the bound: a
  pool mixes different situations (in the refine phase a client that pruned a layer on the
  same inputs re-solves it almost exactly, deviation ~0, while the others move it by 0.1-0.3),
  so a tight pool says little about the moves honest SparseGPT makes elsewhere.

A refine payload carries no mask (its values fill the server's), so it is judged on its values
alone. Only one tensor of one payload is in memory at a time.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from .payload import StoredPayload, tensor_name

MAD_SCALE = 1.4826  # MAD of a normal sample times this estimates its standard deviation
MAD_FLOOR = 0.25  # a pool's MAD counts as at least this fraction of its median ...
MAD_MIN = 0.01  # ... and at least this (pools of exact copies: Wanda's values in a refine)


@dataclass(frozen=True)
class Verdict:
    deviation: float  # the payload's largest relative deviation
    reason: str = ""  # why it is an outlier ("" when accepted)

    @property
    def accepted(self) -> bool:
        return not self.reason


def deviations(
    payload: StoredPayload, reference: Callable[[str], torch.Tensor]
) -> dict[str, float]:
    """Relative deviation of each tensor of ``payload`` from ``reference(key)`` on its kept
    positions."""
    out = {}
    for key in payload.keys:
        sparse = payload.sparse(key)
        keep = sparse.mask()
        ref = reference(key).detach()
        kept = ref.float().numpy()[keep.numpy()]  # row-major, as the values are stored
        moved = np.linalg.norm(sparse.values.float().numpy() - kept)
        out[key] = float(moved / max(float(np.linalg.norm(kept)), 1e-30))
    return out


def pool_limit(values: list[float], k: float, floor: float = 0.0) -> tuple[float, float]:
    """``(median, limit)`` of one pool: the largest deviation that does not stand out (never
    below ``floor``)."""
    median = statistics.median(values)
    mad = statistics.median(abs(v - median) for v in values)
    return median, max(floor, median + k * MAD_SCALE * max(mad, MAD_FLOOR * median, MAD_MIN))


def screen(
    found: Mapping[int, Mapping[str, float]], k: float, max_deviation: float
) -> dict[int, Verdict]:
    """A verdict per node from its tensors' deviations (``{node: {key: deviation}}``)."""
    pools: dict[str, list[float]] = {}
    for devs in found.values():
        for key, dev in devs.items():
            pools.setdefault(tensor_name(key), []).append(dev)
    limits = {name: pool_limit(values, k, max_deviation / 2) for name, values in pools.items()}
    verdicts = {}
    for node, devs in found.items():
        reason = ""
        for key, dev in devs.items():
            median, limit = limits[tensor_name(key)]
            if dev > max_deviation:
                reason = f"{key}: deviation {dev:.3g} > bound {max_deviation:.3g}"
            elif dev > limit:
                reason = f"{key}: deviation {dev:.3g} > {limit:.3g} (pool median {median:.3g})"
            if reason:
                break
        verdicts[node] = Verdict(max(devs.values(), default=0.0), reason)
    return verdicts
