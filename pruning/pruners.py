"""One-shot pruners for a single linear layer: SparseGPT, Wanda and magnitude.

Each pruner sees the layer's calibration inputs through ``add_batch`` and then turns the
weight into a pruned weight plus its keep mask. The driver does not care which one it holds.

* SparseGPT (Frantar & Alistarh, 2023): with ``H = 2/n Σ x xᵀ``, prune column block by column
  block, choosing in each block the weights of least ``w² / [H⁻¹]²_jj`` and compensating the
  remaining columns with the optimal brain surgeon update through the Cholesky factor of
  ``H⁻¹``. ``refit`` > 0 then re-solves the kept weights on the final mask by conjugate
  gradients: the sweep compensates each pruned weight only in the columns after it, so the
  reconstruction ``tr((W − W₀) H (W − W₀)ᵀ)`` it leaves is not the least one for its mask
  (the weight update that Boža, 2024, finds to matter most at high sparsity).
* Wanda (Sun et al., 2024): score ``|W| · ‖x_j‖₂``, compared within each output row; no update.
* Magnitude: score ``|W|`` over the whole matrix; no calibration data.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .sparsity import Target, keep_nm, keep_topk, prune_count

log = logging.getLogger(__name__)

METHODS = ("sparsegpt", "wanda", "magnitude")


@dataclass
class PruneResult:
    weight: torch.Tensor  # pruned weight, dtype of the input weight
    mask: torch.Tensor  # bool keep mask


class Pruner:
    """Statistics of one linear layer's inputs, then a pruning rule."""

    needs_inputs = True

    def __init__(self, columns: int, device: torch.device) -> None:
        self.columns, self.device, self.nsamples = columns, device, 0

    def add_batch(self, inp: torch.Tensor) -> None:
        """Fold a batch of inputs ``[..., columns]`` into running averages (float32)."""
        x = inp.reshape(-1, self.columns).to(self.device, torch.float32)
        n = x.shape[0]
        self._accumulate(x, self.nsamples / (self.nsamples + n), n)
        self.nsamples += n

    def _accumulate(self, x: torch.Tensor, keep: float, n: int) -> None:
        raise NotImplementedError

    def prune(self, weight: torch.Tensor, target: Target) -> PruneResult:
        raise NotImplementedError


class MagnitudePruner(Pruner):
    needs_inputs = False

    def _accumulate(self, x: torch.Tensor, keep: float, n: int) -> None:
        pass

    def prune(self, weight: torch.Tensor, target: Target) -> PruneResult:
        mask = target.select(weight.detach().float().abs())
        return PruneResult(weight * mask, mask)


class WandaPruner(Pruner):
    def __init__(self, columns: int, device: torch.device) -> None:
        super().__init__(columns, device)
        self.sq_norm = torch.zeros(columns, device=device)  # mean of x_j² over tokens

    def _accumulate(self, x: torch.Tensor, keep: float, n: int) -> None:
        self.sq_norm.mul_(keep).add_(x.pow(2).sum(0), alpha=1.0 / (self.nsamples + n))

    def prune(self, weight: torch.Tensor, target: Target) -> PruneResult:
        score = weight.detach().float().abs() * self.sq_norm.sqrt()
        mask = target.select(score, per_row=True)
        return PruneResult(weight * mask, mask)


class SparseGPTPruner(Pruner):
    def __init__(
        self,
        columns: int,
        device: torch.device,
        blocksize: int = 128,
        percdamp: float = 0.01,
        refit: int = 0,
    ) -> None:
        super().__init__(columns, device)
        self.blocksize, self.percdamp, self.refit = blocksize, percdamp, refit
        self.H = torch.zeros(columns, columns, device=device)
        self._factor: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._damp = 0.0  # the dampening that made H factorise, reused by the refit

    def _accumulate(self, x: torch.Tensor, keep: float, n: int) -> None:
        x = x * (2.0 / (self.nsamples + n)) ** 0.5
        self.H.mul_(keep).addmm_(x.t(), x)

    def _inverse_factor(self, H: torch.Tensor) -> torch.Tensor | None:
        """Upper Cholesky factor of ``H⁻¹``; dampening grows tenfold until ``H`` factorises."""
        diag = torch.arange(self.columns, device=H.device)
        damp = self.percdamp * torch.mean(torch.diag(H))
        for attempt in range(4):
            Hd = H.clone()
            Hd[diag, diag] += damp * 10**attempt
            L, info = torch.linalg.cholesky_ex(Hd)
            if info == 0:
                U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
                if info == 0 and torch.isfinite(U).all():
                    self._damp = float(damp) * 10**attempt
                    return U
            warnings.warn(
                f"SparseGPT: Cholesky failed at dampening x{10**attempt}; retrying", stacklevel=2
            )
        return None

    def _factorise(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Dead-input mask and ``H⁻¹`` factor, computed once for all linears sharing the input."""
        if self._factor is None:
            H, dead = self.H, torch.diag(self.H) == 0
            if dead.any():
                warnings.warn(
                    f"SparseGPT: {int(dead.sum())} input(s) never active; weights → 0", stacklevel=2
                )
                H = H.clone()
                H[dead, dead] = 1
            self._factor = dead, self._inverse_factor(H)
        return self._factor

    def prune(self, weight: torch.Tensor, target: Target) -> PruneResult:
        with flush_denormals():
            return self._prune(weight, target)

    def _prune(self, weight: torch.Tensor, target: Target) -> PruneResult:
        W = weight.detach().to(self.device, torch.float32).clone()
        dead, Hinv = self._factorise()
        W[:, dead] = 0
        if Hinv is None:  # fall back to Wanda's rule with the Hessian diagonal as ‖x‖²
            warnings.warn(
                "SparseGPT: Hessian not positive definite; using Wanda's criterion", stacklevel=2
            )
            wanda = WandaPruner(self.columns, self.device)
            wanda.sq_norm = torch.diag(self.H) / 2
            return wanda.prune(weight, target)

        rows, cols = W.shape
        pattern, fixed = target.pattern, target.mask
        keep = torch.ones_like(W, dtype=torch.bool)
        for i1 in range(0, cols, self.blocksize):
            i2 = min(i1 + self.blocksize, cols)
            # the block is swept column by column: hold it transposed, so that each column and
            # the columns after it are contiguous rows (strided rank-1 updates are ~6x slower)
            T1, Hinv1 = W[:, i1:i2].t().contiguous(), Hinv[i1:i2, i1:i2]
            W1 = T1.t()  # the block as [rows, columns], a view of T1
            d = torch.diag(Hinv1)
            Err1 = torch.zeros_like(T1)
            if fixed is not None:  # refinement: the mask is given, only compensate
                keep1 = fixed[:, i1:i2].to(W.device)
            elif pattern is None:  # block budget by cumulative rounding: exact for the matrix
                sp = target.sparsity
                n_prune = prune_count(rows * i2, sp) - prune_count(rows * i1, sp)
                keep1 = keep_topk(W1**2 / d**2, n_prune / W1.numel())
            else:
                keep1 = torch.ones_like(W1, dtype=torch.bool)
            for i in range(i2 - i1):
                if pattern is not None and i % pattern.m == 0:
                    g = slice(i, i + pattern.m)
                    keep1[:, g] = keep_nm(W1[:, g] ** 2 / d[g] ** 2, pattern)
                w = T1[i]
                err = (w - w * keep1[:, i]) / d[i]
                T1[i:].addr_(Hinv1[i, i:], err, alpha=-1)
                Err1[i] = err
            W[:, i1:i2] = W1 * keep1
            keep[:, i1:i2] = keep1
            W[:, i2:] -= Err1.t() @ Hinv[i1:i2, i2:]
        if self.refit:
            W0 = weight.detach().to(self.device, torch.float32)
            W = self._refit(W, W0.masked_fill(dead, 0), keep)
        if not torch.isfinite(W).all():
            warnings.warn(
                "SparseGPT: non-finite update; keeping the mask without compensation", stacklevel=2
            )
            W = weight.detach().float() * keep.to(weight.device)
        return PruneResult(W.to(weight.device, weight.dtype) * keep.to(weight.device), keep)

    def _refit(self, W: torch.Tensor, W0: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Least ``tr((W − W₀)(H + λI)(W − W₀)ᵀ)`` over the kept entries, from the sweep's ``W``:
        ``refit`` steps of Jacobi-preconditioned conjugate gradients, all rows at once (each row
        is its own problem; the matrix products keep the solve as fast as the sweep)."""
        M = keep.to(W.dtype)
        d = (torch.diag(self.H) + self._damp).clamp(min=1e-12)

        def hess(P: torch.Tensor) -> torch.Tensor:
            return (P @ self.H + self._damp * P) * M

        R = -hess(W - W0)  # minus the gradient, on the kept entries
        Z = R / d
        P, rz = Z, (R * Z).sum(1, keepdim=True)
        for _ in range(self.refit):
            HP = hess(P)
            alpha = rz / (P * HP).sum(1, keepdim=True).clamp(min=1e-30)
            W = W + alpha * P
            R = R - alpha * HP
            Z = R / d
            rz, rz_old = (R * Z).sum(1, keepdim=True), rz
            P = Z + rz / rz_old.clamp(min=1e-30) * P
        return W * M


@contextlib.contextmanager
def flush_denormals() -> Iterator[None]:
    """Treat denormal floats as zero on the CPU while solving: the inverse Hessian factor and
    the OBS updates produce values below 1e-38 that x86 handles 10-100x slower than normal
    ones (the solve of one SmolLM2 layer: 5x faster), for a change of that size in the result."""
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def make_pruner(
    method: str,
    columns: int,
    device: torch.device,
    blocksize: int = 128,
    percdamp: float = 0.01,
    refit: int = 0,
) -> Pruner:
    if method == "sparsegpt":
        return SparseGPTPruner(columns, device, blocksize, percdamp, refit)
    if method == "wanda":
        return WandaPruner(columns, device)
    if method == "magnitude":
        return MagnitudePruner(columns, device)
    raise ValueError(f"unknown pruning method {method!r} (choose from {', '.join(METHODS)})")
