"""Server-side aggregation of pruned layers: FedSpaLLM's ℓ0-norm mean and adaptive mask expansion,
its robust variants (coordinate-wise trimmed mean and median), and the FedAvg and mask-vote
(FedPrLLM) baselines, in one registry (:data:`MERGES`) behind one call, :func:`merge_tensor`.

Everything but the robust variants streams: clients are folded in one at a time into a float32
sum and a small-int count, and the big temporaries of mixed-dtype arithmetic, ranking and prefix
sums are bounded by working in blocks of ``_BLOCK`` elements (on the CPU, mixed-dtype ops and
even ``bool.sum()`` make full-size copies; ``count_nonzero`` does not). Tensors are expected on
the CPU (the selection uses numpy).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial

import torch

from pruning.sparsity import (
    Pattern,
    Target,
    as_int,
    check_sparsity,
    keep_nm,
    keep_per_row,
    prune_count,
    prune_counts_per_row,
)

_BLOCK = 1 << 20  # elements per block: 4-8 MB temporaries whatever the matrix size

Update = tuple[torch.Tensor, torch.Tensor]  # (weight, bool keep mask) of one client
Source = Callable[[], Update]  # reads one client's update (again) on every call
Dense = Callable[[], torch.Tensor]  # reads the base model's weight


def _blocks(length: int, step: int) -> Iterator[slice]:
    return (slice(i, i + step) for i in range(0, length, step))


def _checked(updates: Iterable[Update]) -> Iterator[Update]:
    """Each client's update, checked against the first one's shape and dtype."""
    shape = dtype = None
    for n, (weight, mask) in enumerate(updates):
        if shape is None:
            shape, dtype = weight.shape, weight.dtype
        if weight.shape != shape or weight.dtype != dtype or mask.shape != shape:
            raise ValueError(f"client {n}: weight/mask {tuple(weight.shape)} do not match {shape}")
        if mask.dtype != torch.bool:
            raise ValueError(f"client {n}: mask must be bool, got {mask.dtype}")
        yield weight, mask
        del weight, mask  # dropped before the caller's generator decodes the next client


def _accumulate(
    updates: Iterable[Update], with_sum: bool, scales: Sequence[float] | None = None
) -> tuple[torch.Tensor | None, torch.Tensor, int, torch.dtype]:
    """Fold clients into (float32 sum of kept values, keep count, clients, weight dtype); with
    ``scales`` the sum is of ``scale * value`` and ``count`` the float32 sum of kept scales."""
    total = count = None
    n = 0
    for i, (weight, mask) in enumerate(_checked(updates)):
        if count is None:
            dtype = weight.dtype
            count = torch.zeros(
                weight.shape, dtype=torch.uint8 if scales is None else torch.float32
            )
            total = torch.zeros(weight.shape, dtype=torch.float32) if with_sum else None
        n += 1
        if n == 256 and scales is None:  # uint8 counts up to 255 clients
            count = count.to(torch.int32)
        scale = 1.0 if scales is None else float(scales[i])
        flat_w, flat_m, flat_c = weight.reshape(-1), mask.reshape(-1), count.view(-1)
        for blk in _blocks(flat_c.numel(), _BLOCK):
            flat_c[blk] += flat_m[blk] if scales is None else flat_m[blk] * scale
            if total is not None:  # where(): a weight outside its own mask never counts
                kept = torch.where(flat_m[blk], flat_w[blk], 0)
                total.view(-1)[blk] += kept if scales is None else kept.float() * scale
        del weight, mask, flat_w, flat_m
    if count is None:
        raise ValueError("no client updates to aggregate")
    return total, count, n, dtype


def l0_aggregate(updates: Iterable[Update]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """ℓ0-norm mean: per position, the mean over the clients whose mask kept it, else 0.

    Returns the float32 mean, the per-position keep count (uint8, int32 past 255 clients) and
    the number of clients. Averaging only the clients that kept a weight stops the zeros of
    clients that pruned it from shrinking it, which is what plain FedAvg of sparse models does.
    """
    total, count, n, _ = _accumulate(updates, with_sum=True)
    _divide_by_count(total, count)
    return total, count, n


def _divide_by_count(total: torch.Tensor, count: torch.Tensor) -> None:
    flat_t, flat_c = total.view(-1), count.view(-1)
    for blk in _blocks(flat_t.numel(), _BLOCK):
        flat_t[blk] /= flat_c[blk].clamp(min=1)


def expand_mask(
    weight: torch.Tensor,
    kept_count: torch.Tensor,
    n_clients: int,
    sparsity: float,
    pattern: Pattern | None = None,
    per_row: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune the union of client masks back to exactly ``sparsity``; zero ``weight`` IN PLACE.

    The union is denser than any client's mask. Positions are pruned in the order: fewer clients
    kept it (= more pruned it) first, then smaller ``|weight|`` (as stored), then by position
    (lower flat index first; within an N:M group the lower index is kept, as in ``keep_nm``).
    The ranking scope is the whole tensor, each row (``per_row``, with the row counts of
    ``keep_topk_per_row``) or each group of M (``pattern``, which keeps exactly N per group).
    Returns ``(weight, keep mask)``. Counts are exact, so if the union is sparser than the target
    some never-kept (zero) positions are marked kept.
    """
    sparsity = check_sparsity(sparsity, pattern)
    if kept_count.shape != weight.shape:
        raise ValueError(f"kept_count {tuple(kept_count.shape)} != weight {tuple(weight.shape)}")
    if int(kept_count.max()) > n_clients:
        raise ValueError(f"a position is kept by more than the {n_clients} clients")
    if pattern is None and not per_row:
        mask = _keep_global(weight, kept_count, prune_count(weight.numel(), sparsity))
    else:
        if weight.dim() != 2:
            raise ValueError("row-wise and N:M selection need a 2-d weight")
        rows, cols = weight.shape
        n_prune = prune_counts_per_row(rows, cols, sparsity)
        shift = 8 * weight.element_size()  # the magnitude bits below, the count above
        mask = torch.empty(weight.shape, dtype=torch.bool)
        for blk in _blocks(rows, max(1, _BLOCK // cols)):
            key = (kept_count[blk].long() << shift) | as_int(weight[blk].abs()).long()
            mask[blk] = keep_nm(key, pattern) if pattern else keep_per_row(key, n_prune[blk])
    weight.masked_fill_(~mask, 0)
    return weight, mask


def _keep_global(weight: torch.Tensor, count: torch.Tensor, n_prune: int) -> torch.Tensor:
    """Exact whole-tensor selection without a full int64 key, sort or prefix sum.

    Find the count level where the ``n_prune``-th position falls, prune every lower level, and
    inside that level prune the smallest magnitudes: an in-place numpy partition of the
    magnitudes' integer bits gives the threshold, then two passes in blocks prune the level's
    positions below it and, lowest index first, as many tied with it as are still due.
    """
    below = level = 0
    for level in range(int(count.max()) + 1):
        at = int(torch.count_nonzero(count == level))
        if below + at >= n_prune:
            break
        below += at
    keep = count >= level
    rest = n_prune - below
    if rest > 0:
        mag = as_int(weight.abs())
        mag.masked_fill_(count != level, torch.iinfo(mag.dtype).max)  # above any float's bits
        flat = mag.numpy().reshape(-1)
        flat.partition(rest - 1)  # in place: no second full-size copy
        threshold = int(flat[rest - 1])
        del mag, flat
        flat_w, flat_c, flat_k = weight.reshape(-1), count.reshape(-1), keep.view(-1)

        def at_level(blk: slice, op) -> torch.Tensor:
            return (flat_c[blk] == level) & op(as_int(flat_w[blk].abs()), threshold)

        for blk in _blocks(flat_k.numel(), _BLOCK):
            smaller = at_level(blk, torch.lt)
            flat_k[blk] &= ~smaller
            rest -= int(torch.count_nonzero(smaller))
        for blk in _blocks(flat_k.numel(), _BLOCK):
            if rest <= 0:
                break
            tied = at_level(blk, torch.eq)
            seen = tied.cumsum(0)
            flat_k[blk] &= ~(tied & (seen <= rest))
            rest -= int(seen[-1])
    return keep


Combined = tuple[torch.Tensor, torch.Tensor, int]  # weight, per-position keep count, clients


def _l0(sources: Sequence[Source], dense: Dense) -> Combined:
    total, count, n, dtype = _accumulate((read() for read in sources), with_sum=True)
    _divide_by_count(total, count)
    return total.to(dtype), count, n


def _fedavg(sources: Sequence[Source], dense: Dense) -> Combined:
    total, _, n, dtype = _accumulate((read() for read in sources), with_sum=True)
    total /= n
    weight = total.to(dtype)
    del total
    # rank by magnitude alone: zeros sort lowest either way (uint8: bool < int makes int64 copies)
    return weight, (weight != 0).view(torch.uint8), 1


def _vote(sources: Sequence[Source], dense: Dense) -> Combined:
    _, count, n, _ = _accumulate((read() for read in sources), with_sum=False)
    return dense().detach().clone(), count, n


def _stacked(sources: Sequence[Source]) -> tuple[torch.Tensor, torch.Size]:
    """Every client's values of one tensor, ``[clients, numel]`` in their dtype, NaN where a
    client pruned (kept values are finite: payloads are checked for that)."""
    stack = shape = None
    for i, (weight, mask) in enumerate(_checked(read() for read in sources)):
        if stack is None:
            shape = weight.shape
            stack = torch.empty((len(sources), weight.numel()), dtype=weight.dtype)
        stack[i] = weight.reshape(-1)
        stack[i].masked_fill_(~mask.reshape(-1), torch.nan)
        del weight, mask
    if stack is None:
        raise ValueError("no client updates to aggregate")
    return stack, shape


def _trimmed(cut: Callable[[torch.Tensor], torch.Tensor]) -> Callable[..., Combined]:
    """A coordinate-wise trimmed mean over the clients that kept each position: ``cut(kept)``
    of the sorted kept values are dropped at each end. It needs every client's values of the
    tensor at once (``clients x numel`` in their dtype), where ℓ0 streams them into one sum."""

    def combine(sources: Sequence[Source], dense: Dense) -> Combined:
        stack, shape = _stacked(sources)
        n, numel = stack.shape
        weight = torch.empty(numel, dtype=stack.dtype)
        count = torch.empty(numel, dtype=torch.uint8 if n < 256 else torch.int32)
        rank = torch.arange(n)[:, None]
        for blk in _blocks(numel, max(1, _BLOCK // n)):
            values = stack[:, blk].float().sort(dim=0).values  # pruned (NaN) sort last
            kept = n - values.isnan().sum(0)
            drop = cut(kept)
            inside = (rank >= drop) & (rank < kept - drop)
            total = torch.where(inside, values, 0).sum(0)
            weight[blk] = total / (kept - 2 * drop).clamp(min=1)
            count[blk] = kept
        return weight.view(shape), count.view(shape), n

    return combine


@dataclass(frozen=True)
class Merge:
    """How client updates of one tensor become one weight and a per-position keep count, which
    the shared mask expansion then prunes to the target. ``combine`` may read its sources more
    than once (a median or trimmed mean needs that); ``scale_by_votes`` multiplies each kept
    weight by the fraction of clients that kept it (FedPrLLM's optional scaling)."""

    combine: Callable[[Sequence[Source], Dense], Combined]
    scale_by_votes: bool = False


MERGES = {
    # FedSpaLLM: mean over the clients that kept each weight
    "l0": Merge(_l0),
    # plain mean (pruned entries count as 0), re-pruned by magnitude
    "fedavg": Merge(_fedavg),
    # FedPrLLM: the positions most clients kept, values from the dense model
    "mask-vote": Merge(_vote),
    "mask-vote-scaled": Merge(_vote, scale_by_votes=True),
    # robust ℓ0 variants (the run config's ``aggregator``): drop the smallest and largest kept
    # value where three or more clients kept a position; the median of the kept values
    "l0-trimmed": Merge(_trimmed(lambda kept: (kept >= 3).long())),
    "l0-median": Merge(_trimmed(lambda kept: (kept - 1).clamp(min=0) // 2)),
}
ROBUST = ("l0-trimmed", "l0-median")  # merges that may replace "l0" (RunConfig.aggregator)


def _weighted_l0(sources: Sequence[Source], scales: Sequence[float]) -> Combined:
    """ℓ0 mean weighted per client (by its routed tokens): ``Σ s·w / Σ s`` over the clients
    that kept each position; the keep count for the expansion stays the number of them."""
    total, weight_sum, _, dtype = _accumulate((r() for r in sources), True, scales)
    _, count, n, _ = _accumulate((r() for r in sources), with_sum=False)
    flat_t, flat_s = total.view(-1), weight_sum.view(-1)
    for blk in _blocks(flat_t.numel(), _BLOCK):
        flat_t[blk] /= flat_s[blk].clamp(min=1e-30)
    return total.to(dtype), count, n


def _expert(read: Source, index: int) -> Update:
    weight, mask = read()
    return weight[index], mask[index]


def _merge_experts(
    merge: str,
    sources: Sequence[Source],
    target: Target,
    dense: Dense | None,
    per_row: bool,
    tokens: Sequence[Sequence[int]] | None,
    experts: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A fused ``[experts, out, in]`` tensor, merged and expanded expert by expert: each
    expert's matrix gets exactly the target. With ``tokens`` (per client, per expert) a client
    that routed no token to an expert does not vote on it (unless no client did), and the ℓ0
    mean weights each client's expert by its tokens. Each client is read once per expert."""
    weights, masks = [], []
    for e in range(experts):
        counts = [t[e] for t in tokens] if tokens is not None else [1] * len(sources)
        voters = [i for i, c in enumerate(counts) if c > 0] or list(range(len(sources)))
        subs = [partial(_expert, sources[i], e) for i in voters]
        sub_dense = (lambda e=e: dense()[e]) if dense is not None else None
        if merge == "l0" and tokens is not None and any(counts):
            weight, count, n = _weighted_l0(subs, [counts[i] for i in voters])
            weight, mask = expand_mask(weight, count, n, target.sparsity, target.pattern, per_row)
        else:
            weight, mask = merge_tensor(merge, subs, target, sub_dense, per_row)
        weights.append(weight)
        masks.append(mask)
    return torch.stack(weights), torch.stack(masks)


def merge_tensor(
    merge: str,
    sources: Sequence[Source],
    target: Target,
    dense: Dense | None = None,
    per_row: bool = False,
    tokens: Sequence[Sequence[int]] | None = None,
    experts: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge one tensor over the clients that pruned it; returns ``(weight, keep mask)``.

    ``sources`` re-read one client's ``(weight, mask)`` per call (e.g. from its stored payload);
    ``dense`` returns the base weight (needed by the mask vote only). The weight comes back in
    the clients' dtype (the dense one's for the vote), pruned to exactly the target in the scope
    chosen by the target's pattern and ``per_row`` (see :func:`expand_mask`). A fused expert
    tensor (``experts`` > 0) is merged per expert, weighted by ``tokens`` (one list of routed
    token counts per source, or ``None``): see :func:`_merge_experts`.
    """
    if merge not in MERGES:
        raise ValueError(f"unknown merge {merge!r}; choose from {', '.join(MERGES)}")
    if not sources:
        raise ValueError("no client updates to aggregate")
    if tokens is not None and (
        len(tokens) != len(sources) or any(len(t) != experts for t in tokens)
    ):
        raise ValueError(f"need {experts} expert token counts for each of {len(sources)} sources")
    if experts:
        return _merge_experts(merge, sources, target, dense, per_row, tokens, experts)

    def no_dense() -> torch.Tensor:
        raise ValueError(f"the {merge} merge takes its weights from the dense model; pass dense")

    rule = MERGES[merge]
    weight, count, n = rule.combine(sources, dense or no_dense)
    weight, mask = expand_mask(weight, count, n, target.sparsity, target.pattern, per_row)
    if rule.scale_by_votes:
        flat_w, flat_c = weight.view(-1), count.view(-1)
        for blk in _blocks(flat_w.numel(), _BLOCK):
            flat_w[blk] *= flat_c[blk] / n
    return weight, mask
