"""Single-linear pruners (pruning/pruners.py): exact counts, N:M, numerics, degenerate inputs."""

from __future__ import annotations

import warnings

import pytest
import torch

from pruning.pruners import (
    METHODS,
    MagnitudePruner,
    Pruner,
    SparseGPTPruner,
    WandaPruner,
    make_pruner,
)
from pruning.sparsity import (
    Pattern,
    Target,
    keep_nm,
    keep_topk,
    keep_topk_per_row,
    nm_valid,
    prune_count,
    prune_counts_per_row,
)

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")
ROWS, COLS, TOKENS = 12, 72, 384  # 72 columns: SparseGPT blocks of 32 leave a ragged last block


def inputs(tokens: int = TOKENS, cols: int = COLS, seed: int = 0) -> torch.Tensor:
    """Correlated activations with unequal column scales (so Wanda differs from magnitude).

    Scales stay moderate: with extreme spreads Wanda can beat SparseGPT's fixed per-block budget.
    """
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=gen) / cols**0.5 + torch.eye(cols)
    scale = torch.exp(0.5 * torch.randn(cols, generator=gen))
    return (torch.randn(tokens, cols, generator=gen) @ mix) * scale


def weight(rows: int = ROWS, cols: int = COLS, seed: int = 1) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def fitted(method: str, x: torch.Tensor, blocksize: int = 32, batches: int = 3) -> Pruner:
    """A pruner that saw ``x`` in a few uneven, 3-D batches (as hooks deliver them)."""
    pruner = make_pruner(method, x.shape[-1], CPU, blocksize=blocksize)
    for chunk in x.tensor_split(batches):
        pruner.add_batch(chunk[None])
    return pruner


def output_error(w: torch.Tensor, pruned: torch.Tensor, x: torch.Tensor) -> float:
    """‖W Xᵀ − Ŵ Xᵀ‖_F, the quantity SparseGPT minimises."""
    return float(torch.linalg.norm((w.double() - pruned.double()) @ x.double().T))


def prune(method: str, w: torch.Tensor, x: torch.Tensor, sparsity: float, pattern=None, **kw):
    return fitted(method, x, **kw).prune(w, Target(sparsity, pattern))


@pytest.mark.parametrize("sparsity", [0.5, 0.7, 0.33])
@pytest.mark.parametrize("method", METHODS)
def test_exact_count_and_mask_matches_zeros(method: str, sparsity: float) -> None:
    w, x = weight(), inputs()
    original = w.clone()
    result = prune(method, w, x, sparsity)
    assert torch.equal(w, original), "the input weight must not be modified"
    assert result.mask.dtype == torch.bool and result.mask.shape == w.shape
    assert int((~result.mask).sum()) == prune_count(w.numel(), sparsity)
    assert torch.equal(result.weight == 0, ~result.mask)  # zero exactly where pruned
    assert result.weight.dtype == w.dtype and torch.isfinite(result.weight).all()


@pytest.mark.parametrize("pattern", [Pattern(2, 4), Pattern(4, 8)], ids=str)
@pytest.mark.parametrize("method", METHODS)
def test_nm_pattern(method: str, pattern: Pattern) -> None:
    w, x = weight(), inputs()
    result = prune(method, w, x, pattern.sparsity, pattern)
    assert nm_valid(result.mask, pattern)
    assert int(result.mask.sum()) == w.numel() * pattern.n // pattern.m
    assert torch.equal(result.weight == 0, ~result.mask)


@pytest.mark.parametrize("pattern", [None, Pattern(2, 4), Pattern(4, 8)], ids=str)
def test_sparsegpt_has_the_lowest_output_error(pattern: Pattern | None) -> None:
    w, x = weight(), inputs()
    errors = {m: output_error(w, prune(m, w, x, 0.5, pattern).weight, x) for m in METHODS}
    assert errors["sparsegpt"] < errors["wanda"] and errors["sparsegpt"] < errors["magnitude"]


def test_hessian_is_two_over_n_xtx() -> None:
    x = inputs()
    pruner = fitted("sparsegpt", x, batches=5)
    x64 = x.double()
    expected = 2.0 / x.shape[0] * x64.T @ x64
    assert pruner.nsamples == x.shape[0]
    torch.testing.assert_close(pruner.H.double(), expected, rtol=1e-5, atol=1e-5)


def test_wanda_matches_per_row_argsort() -> None:
    w, x = weight(), inputs()
    pruner = fitted("wanda", x)
    norms = x.double().pow(2).mean(0)
    torch.testing.assert_close(pruner.sq_norm.double(), norms, rtol=1e-5, atol=0)
    result = pruner.prune(w, Target(0.7))
    score = w.double().abs() * norms.sqrt()
    expected = torch.ones_like(result.mask)
    for r, n in enumerate(prune_counts_per_row(*w.shape, 0.7).tolist()):
        expected[r, score[r].argsort()[:n]] = False
    assert torch.equal(result.mask, expected)


def test_magnitude_prunes_smallest_globally_without_inputs() -> None:
    w = weight()
    pruner = make_pruner("magnitude", COLS, CPU)
    assert not pruner.needs_inputs
    result = pruner.prune(w, Target(0.7))
    threshold = w.abs().flatten().sort().values[prune_count(w.numel(), 0.7) - 1]
    assert bool((w.abs()[~result.mask] <= threshold).all())
    assert bool((w.abs()[result.mask] > threshold).all())


def test_sparsegpt_at_zero_sparsity_returns_the_weight() -> None:
    w, x = weight(), inputs()
    result = prune("sparsegpt", w, x, 0.0)
    assert bool(result.mask.all()) and torch.equal(result.weight, w)


def reference_sparsegpt(
    w: torch.Tensor, h: torch.Tensor, sparsity: float, pattern: Pattern | None, blocksize: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Column-by-column optimal brain surgeon with explicit float64 inverses of the Hessian of the
    not yet visited columns: no Cholesky factor, no lazy block updates.

    Masks are chosen as SparseGPT specifies: per N:M group, or per column block with the
    block's share of the exact count, from ``w² / [H_F⁻¹]_jj²`` on the current weights.
    """
    w, h = w.double().clone(), h.double()
    h = h + 0.01 * h.diag().mean() * torch.eye(h.shape[0], dtype=h.dtype)
    rows, cols = w.shape
    hinv_rows = [torch.linalg.inv(h[j:, j:])[0] for j in range(cols)]  # [H_F⁻¹]_{j, F}
    d2 = torch.stack([r[0] for r in hinv_rows])
    keep = torch.ones_like(w, dtype=torch.bool)
    for j in range(cols):
        if pattern is not None and j % pattern.m == 0:
            g = slice(j, j + pattern.m)
            keep[:, g] = keep_nm(w[:, g] ** 2 / d2[g], pattern)
        if pattern is None and j % blocksize == 0:
            j2 = min(j + blocksize, cols)
            n = prune_count(rows * j2, sparsity) - prune_count(rows * j, sparsity)
            keep[:, j:j2] = keep_topk(w[:, j:j2] ** 2 / d2[j:j2], n / (rows * (j2 - j)))
        err = w[:, j] * ~keep[:, j]
        w[:, j:] -= torch.outer(err / hinv_rows[j][0], hinv_rows[j])
    return w * keep, keep


@pytest.mark.parametrize(
    ("sparsity", "pattern", "blocksize"),
    [(0.5, None, 16), (0.7, None, 64), (0.5, Pattern(2, 4), 8), (0.5, Pattern(4, 8), 64)],
)
def test_sparsegpt_matches_explicit_obs_reference(
    sparsity: float, pattern: Pattern | None, blocksize: int
) -> None:
    w, x = weight(8, 40), inputs(cols=40)
    pruner = fitted("sparsegpt", x, blocksize=blocksize)
    result = pruner.prune(w, Target(sparsity, pattern))
    expected_w, expected_keep = reference_sparsegpt(w, pruner.H, sparsity, pattern, blocksize)
    assert torch.equal(result.mask, expected_keep)
    torch.testing.assert_close(result.weight.double(), expected_w, rtol=1e-3, atol=1e-4)


def least_squares_on_mask(w: torch.Tensor, h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Brute force in float64: per row, the kept values of least ``(v − w) H (v − w)ᵀ``
    (``H`` damped as the pruner damps it), from ``H[k, k] v_k = H[k, :] w``."""
    h = h.double() + 0.01 * torch.diag(h.double()).mean() * torch.eye(h.shape[0]).double()
    out = torch.zeros_like(w, dtype=torch.float64)
    for r, k in enumerate(keep):
        out[r, k] = torch.linalg.solve(h[k][:, k], h[k] @ w[r].double())
    return out


@pytest.mark.parametrize(
    "target",
    [Target(0.7), Target(0.5, Pattern(2, 4)), Target.fixed(weight(8, 40, seed=5) > 0)],
    ids=["70%", "2:4", "fixed-mask"],
)
def test_sparsegpt_refit_reaches_the_least_squares_values_of_its_mask(target: Target) -> None:
    """``refit`` keeps the sweep's mask (so exact counts and N:M stay) and moves the kept
    values to the exact minimiser of the layer's output error for that mask, below the
    sweep's own error; the same inputs give the same bits."""
    w, x = weight(8, 40), inputs(cols=40)
    sweep = fitted("sparsegpt", x, blocksize=16).prune(w, target)
    refits = []
    for _ in range(2):
        pruner = fitted("sparsegpt", x, blocksize=16)
        pruner.refit = 60
        refits.append(pruner.prune(w, target))
    refit = refits[0]
    assert torch.equal(refit.mask, sweep.mask)
    assert torch.equal(refit.weight, refits[1].weight)
    assert bool((refit.weight[~refit.mask] == 0).all())
    expected = least_squares_on_mask(w, pruner.H, refit.mask)
    torch.testing.assert_close(refit.weight.double(), expected, rtol=1e-3, atol=1e-4)
    assert output_error(w, refit.weight, x) < 0.97 * output_error(w, sweep.weight, x)


def test_sparsegpt_flushes_denormals_only_while_it_solves() -> None:
    """The solve runs with denormals flushed (the reference tests above cover its results);
    afterwards the process is back to IEEE arithmetic, also when the solve raised."""
    w, x = weight(8, 40), inputs(cols=40)
    fitted("sparsegpt", x).prune(w, Target(0.5))
    assert float(torch.tensor(1e-39) * 1.0) != 0.0
    with pytest.raises(RuntimeError):  # a fixed mask of the wrong shape fails inside the solve
        fitted("sparsegpt", x).prune(w, Target.fixed(torch.ones(3, 3, dtype=torch.bool)))
    assert float(torch.tensor(1e-39) * 1.0) != 0.0


@pytest.mark.parametrize("dead", [[3], list(range(COLS))], ids=["one-column", "all-columns"])
def test_sparsegpt_dead_inputs_warn_and_zero_their_weights(dead: list[int]) -> None:
    w, x = weight(), inputs()
    x[:, dead] = 0
    with pytest.warns(UserWarning, match="never active"):
        result = prune("sparsegpt", w, x, 0.5)
    assert torch.isfinite(result.weight).all()
    assert int((~result.mask).sum()) == prune_count(w.numel(), 0.5)
    assert bool((result.weight[:, dead] == 0).all())


def indefinite(cols: int) -> torch.Tensor:
    """Positive diagonal, eigenvalues down to -99: no dampening of the engine rescues it."""
    return torch.eye(cols) + 100.0 * (torch.ones(cols, cols) - torch.eye(cols))


def singular_negative(cols: int) -> torch.Tensor:
    """Rank one, negative semi-definite, NaN-free."""
    v = torch.linspace(1.0, 2.0, cols)
    return -torch.outer(v, v)


@pytest.mark.parametrize("make_h", [indefinite, singular_negative])
def test_sparsegpt_failed_cholesky_falls_back_to_wanda(make_h) -> None:
    w, x = weight(), inputs()
    pruner = fitted("sparsegpt", x)
    pruner.H = make_h(COLS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = pruner.prune(w, Target(0.5))
    messages = " | ".join(str(c.message) for c in caught)
    assert "Cholesky failed" in messages and "Wanda's criterion" in messages
    assert torch.isfinite(result.weight).all()
    assert int((~result.mask).sum()) == prune_count(w.numel(), 0.5)
    assert torch.equal(result.weight == 0, ~result.mask)
    if make_h is indefinite:  # equal positive diagonal: Wanda degenerates to per-row magnitude
        assert torch.equal(result.mask, keep_topk_per_row(w.abs(), 0.5))


def test_sparsegpt_factor_is_shared_by_linears_with_one_input() -> None:
    """q/k/v see the same input: the driver hands them one pruner, factorised once."""
    x = inputs()
    pruner = fitted("sparsegpt", x)
    pruner.prune(weight(seed=1), Target(0.5))
    factor = pruner._factor
    second = pruner.prune(weight(seed=2), Target(0.5))
    assert pruner._factor is factor  # not recomputed, and not altered by the first prune:
    fresh = fitted("sparsegpt", x).prune(weight(seed=2), Target(0.5))
    assert torch.equal(second.weight, fresh.weight)


@pytest.mark.parametrize(
    ("method", "cls"),
    [("sparsegpt", SparseGPTPruner), ("wanda", WandaPruner), ("magnitude", MagnitudePruner)],
)
def test_make_pruner(method: str, cls: type) -> None:
    assert type(make_pruner(method, COLS, CPU)) is cls


def test_make_pruner_rejects_unknown_method() -> None:
    with pytest.raises(ValueError, match="unknown pruning method 'obs'"):
        make_pruner("obs", COLS, CPU)
