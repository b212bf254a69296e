"""Sparsity targets and mask selection shared by the pruners and the server's mask expansion.

Conventions used everywhere in this project:

* A *keep mask* is a bool tensor, ``True`` where the weight survives.
* ``sparsity`` is the fraction of weights set to zero, in ``[0, 1)``.
* An ``N:M`` pattern (NVIDIA's convention) keeps at most ``N`` non-zeros in every group of ``M``
  consecutive weights along the input dimension (the last axis of a ``[out, in]`` weight), so it
  implies ``sparsity = 1 - N/M``. ``2:4`` is the pattern sparse tensor cores accelerate.
* Counts are exact: a matrix pruned to ``sparsity`` loses ``round(sparsity * numel)`` weights.
  Ties between equal scores are broken by position, which makes every mask a pure function of
  its inputs: in a whole-tensor or per-row ranking the lower flat index is pruned first; inside
  an N:M group the lower index is kept.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

_SAME_WIDTH_INT = {2: torch.int16, 4: torch.int32}
_PATTERN_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


class SparsityError(ValueError):
    """A sparsity target or pattern that cannot be honoured."""


@dataclass(frozen=True)
class Pattern:
    """An ``N:M`` semi-structured pattern: keep ``n`` of every ``m`` consecutive weights."""

    n: int
    m: int

    @property
    def sparsity(self) -> float:
        return 1.0 - self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


def parse_pattern(text: str | None) -> Pattern | None:
    """Parse ``"2:4"`` into a :class:`Pattern`; ``None``, ``""``, ``"unstructured"``: none."""
    if text is None or text.strip().lower() in ("", "unstructured", "none"):
        return None
    match = _PATTERN_RE.match(text)
    if not match:
        raise SparsityError(f"pattern {text!r} is not of the form N:M (for example 2:4)")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise SparsityError(f"pattern {text!r} needs 0 < N < M")
    return Pattern(n, m)


@dataclass(frozen=True)
class Target:
    """What one weight is pruned to: a sparsity (optionally N:M), or a fixed keep ``mask``.

    A fixed mask is how a refinement round re-solves the kept values of a mask the server chose
    (the mask is taken as it is; only the values are computed).
    """

    sparsity: float = 0.5
    pattern: Pattern | None = None
    mask: torch.Tensor | None = None

    @classmethod
    def of(cls, sparsity: float, pattern: str | Pattern | None = None) -> Target:
        """A validated sparsity target (``pattern`` as text or parsed)."""
        parsed = parse_pattern(pattern) if isinstance(pattern, str) or pattern is None else pattern
        return cls(check_sparsity(sparsity, parsed), parsed)

    @classmethod
    def fixed(cls, mask: torch.Tensor) -> Target:
        if mask.dtype != torch.bool:
            raise SparsityError(f"a fixed mask must be bool, got {mask.dtype}")
        return cls(1.0 - float(mask.float().mean()), None, mask)

    def part(self, index: int) -> Target:
        """The target of one expert of a fused ``[experts, out, in]`` weight (a fixed mask is
        sliced; a sparsity holds for each expert on its own)."""
        return self if self.mask is None else Target.fixed(self.mask[index])

    def select(self, scores: torch.Tensor, per_row: bool = False) -> torch.Tensor:
        """Keep mask for ``scores``: the fixed mask, N:M groups, or the exact count."""
        if self.mask is not None:
            if self.mask.shape != scores.shape:
                raise SparsityError(f"mask {tuple(self.mask.shape)} != {tuple(scores.shape)}")
            return self.mask.to(scores.device)
        if self.pattern is not None:
            return keep_nm(scores, self.pattern)
        return (
            keep_topk_per_row(scores, self.sparsity)
            if per_row
            else keep_topk(scores, self.sparsity)
        )


def check_sparsity(sparsity: float, pattern: Pattern | None = None) -> float:
    """Validate a target; with a pattern the target must match the pattern's own sparsity."""
    if not isinstance(sparsity, (int, float)) or not 0.0 <= float(sparsity) < 1.0:
        raise SparsityError(f"sparsity {sparsity!r} is outside [0, 1)")
    if pattern is not None and abs(float(sparsity) - pattern.sparsity) > 1e-6:
        raise SparsityError(
            f"sparsity {sparsity} contradicts pattern {pattern} (it implies {pattern.sparsity:g})"
        )
    return float(sparsity)


def as_int(t: torch.Tensor) -> torch.Tensor:
    """Reinterpret floats as same-width ints; for values >= 0 this keeps their order."""
    return t.view(_SAME_WIDTH_INT[t.element_size()])


def prune_count(numel: int, sparsity: float) -> int:
    """Number of weights to remove from a tensor of ``numel`` elements."""
    return int(round(sparsity * numel))


def _rank_keep(scores: torch.Tensor, n_prune: int) -> torch.Tensor:
    """Keep mask of a flat score vector without its ``n_prune`` lowest (ties: lower index first).

    The cut is found by ``kthvalue`` in linear time, then ties at it are pruned in index order:
    the mask of a stable sort, at a sixth of its cost (a sort was a tenth of a SparseGPT layer).
    NaN counts as +inf.
    """
    flat = scores.reshape(-1)
    keep = torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
    if n_prune > 0:
        flat = torch.where(flat.isnan(), torch.inf, flat)
        cut = torch.kthvalue(flat, min(n_prune, flat.numel())).values
        below = flat < cut
        keep[below] = False
        ties = torch.nonzero(flat == cut).flatten()
        keep[ties[: n_prune - int(below.sum())]] = False
    return keep.view_as(scores)


def keep_topk(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep mask over the whole tensor: the exact ``round(sparsity*numel)`` lowest scores go."""
    return _rank_keep(scores, prune_count(scores.numel(), sparsity))


def prune_counts_per_row(rows: int, cols: int, sparsity: float, device=None) -> torch.Tensor:
    """Weights to remove from each row so that the matrix loses exactly ``round(sparsity*numel)``.

    ``sparsity * cols`` is rarely an integer, so the first rows prune one extra weight.
    """
    base, extra = divmod(prune_count(rows * cols, sparsity), rows)
    per_row = torch.full((rows,), base, dtype=torch.long, device=device)
    per_row[:extra] += 1
    return per_row


def keep_per_row(scores: torch.Tensor, n_prune: torch.Tensor) -> torch.Tensor:
    """Keep mask without the ``n_prune[i]`` lowest scores of row ``i`` (ties: lower index first).

    Split out of :func:`keep_topk_per_row` so that callers can rank a matrix in row blocks.
    """
    rows, cols = scores.shape
    order = torch.sort(scores, dim=1, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(cols, device=scores.device).expand(rows, cols))
    return ranks >= n_prune[:, None]


def keep_topk_per_row(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep mask ranked within each row (Wanda's comparison group), exact in total."""
    rows, cols = scores.shape
    return keep_per_row(scores, prune_counts_per_row(rows, cols, sparsity, scores.device))


def keep_nm(scores: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Keep the ``n`` highest scores in each group of ``m`` along the last axis."""
    rows, cols = scores.shape
    if cols % pattern.m:
        raise SparsityError(f"input dimension {cols} is not a multiple of M={pattern.m}")
    groups = scores.reshape(rows, cols // pattern.m, pattern.m)
    # stable descending sort: among equal scores the lower index is kept
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, order[..., : pattern.n], True)
    return keep.reshape(rows, cols)


def nm_valid(mask: torch.Tensor, pattern: Pattern) -> bool:
    """True when every group of ``m`` along the last axis keeps at most ``n`` weights."""
    rows, cols = mask.shape
    if cols % pattern.m:
        return False
    return bool((mask.reshape(rows, -1, pattern.m).sum(-1) <= pattern.n).all())
