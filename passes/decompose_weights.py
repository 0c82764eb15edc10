"""Analysis: factor every compressed site's weight so that any rank-r truncation minimises the
activation-weighted error ||(W - B A) X||_F (DESIGN.md section 2).

With a metric C on the input space (C = X X^T / N damped for "whitened", the identity for "svd",
a diagonal for "asvd") and S S^T = C, the rank-r optimum is B A = U_r U_r^T W with U the left
singular vectors of W S, and the balanced factors are B = U Sigma^1/2, A = Sigma^1/2 V^T S^-1.
We never form the SVD of the m x n matrix: the eigendecomposition of the smaller Gram matrix
(W C W^T when m <= n, S^T W^T W S otherwise) gives the same factors several times faster.

A weight that embedding lookups read too (a tied head, `Site.lookups`) also serves as a table of
rows, W[ids]: its rows are weighted by how often the calibration's lookups read them (add-one
smoothed, `lookup_row_weights`), so the truncation minimises ||P^1/2 (W - B A) S||_F with P the
diagonal of those weights: the head's error still whitened, the rows the lookups read most kept best.
On MiniLM's pretrained word embeddings with its hidden states as the head's inputs, at 60% of the
parameters, this keeps the head's error near the whitened factors' (0.226 against 0.209) and cuts
the lookup's (0.349 against 0.560); benchmarks/tied_table_init.py."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import fx

from tunecomp_fx.pipeline import GraphPass, PassContext
from tunecomp_fx.progress import progress_bar

_DAMPING_STEPS = 4  # each retry multiplies the damping by 100
_RELATIVE_FLOOR = 1e-12  # singular values below this fraction of the largest are balanced as if this size


@dataclass
class Decomposition:
    """Full-rank factors W ~= up @ down, ranks ordered by `singular_values` (of the whitened W)."""

    up: torch.Tensor  # (out, k)
    down: torch.Tensor  # (k, in)
    singular_values: torch.Tensor  # (k,), float64
    damping: float  # the relative damping that was added to the covariance


def damped(covariance: torch.Tensor, damping: float) -> torch.Tensor:
    c = covariance.to(torch.float64)
    scale = c.diagonal().mean().clamp_min(torch.finfo(torch.float64).tiny)
    return c + damping * scale * torch.eye(c.shape[0], dtype=torch.float64, device=c.device)


def whitening_factor(covariance: torch.Tensor, damping: float) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor], float]:
    """(S, X -> X S^-1, damping used) with S S^T = C + damping * mean(diag C) * I, in float64.

    Tries Cholesky with growing damping; falls back to a clamped eigendecomposition, so that
    rank-deficient or ill-conditioned covariances never fail."""
    for step in range(_DAMPING_STEPS):
        eps = damping * 100.0**step
        lower, info = torch.linalg.cholesky_ex(damped(covariance, eps))
        if info.item() == 0 and torch.isfinite(lower).all() and lower.diagonal().min() > 0:
            return lower, lambda x: torch.linalg.solve_triangular(lower, x, upper=False, left=False), eps
    c = covariance.to(torch.float64)
    eigenvalues, vectors = torch.linalg.eigh(c)
    root = eigenvalues.clamp_min(damping * c.diagonal().mean().clamp_min(1e-300)).sqrt()
    return vectors * root, lambda x: (x @ vectors) / root, damping


@contextmanager
def single_thread() -> Iterator[None]:
    # Threaded LAPACK eigensolvers stall on OpenMP barriers for matrices of this size (192 x 192
    # took 1-2.5 s on 2 busy cores against 5 ms on one thread); one thread is never slower here.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def eigh_descending(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with single_thread():
        eigenvalues, vectors = torch.linalg.eigh((gram + gram.T) / 2)
    sigma = eigenvalues.flip(0).clamp_min(0).sqrt()
    return sigma, vectors.flip(1)


def _balance(sigma: torch.Tensor) -> torch.Tensor:
    return sigma.clamp_min(_RELATIVE_FLOOR * sigma[0].clamp_min(1e-300)).sqrt()


def _unit_scale(covariance: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """The covariance over its mean diagonal on `device` (the weight's: calibration accumulates on
    the CPU), or None when the inputs are all zero.

    The optimum B A does not depend on the metric's scale, but the balance of the factors does:
    inputs of size k give |B| ~ sqrt(k) and |A| ~ 1/sqrt(k), which overflow float16 for small k.
    On all-zero inputs every factorization is optimal; the plain SVD is the sensible one."""
    if covariance is None:
        return None
    c = covariance.to(device, torch.float64)
    mean = c.diagonal().mean()
    return c / mean if mean > 0 else None


def lookup_row_weights(counts: torch.Tensor) -> torch.Tensor:
    """Row weights of a tied table from how often the calibration's lookups read each row: add-one
    smoothed (a row no calibration text read still counts), mean 1 (the factors' balance as unweighted)."""
    smoothed = counts.to(torch.float64) + 1.0
    return smoothed / smoothed.mean()


def decompose(
    weight: torch.Tensor, covariance: torch.Tensor | None, init: str, damping: float, row_weights: torch.Tensor | None = None
) -> Decomposition:
    """Full-rank factors of `weight` in the order of the metric's truncation; with `row_weights` (one
    per output row), of the truncation that weights each row's error by them."""
    w = weight.detach().to(torch.float64)
    m, n = w.shape
    rows = None if row_weights is None else row_weights.to(w.device, torch.float64).sqrt()[:, None]  # P^1/2, a column
    covariance = _unit_scale(covariance, w.device)
    used = damping
    if init == "svd" or covariance is None:
        diagonal = torch.ones(n, dtype=torch.float64, device=w.device)
        used = 0.0
    elif init == "asvd":
        # Diagonal scaling by the square root of each input channel's RMS (ASVD, alpha = 0.5).
        rms = covariance.to(torch.float64).diagonal().clamp_min(0).sqrt()
        diagonal = (rms + damping * rms.mean().clamp_min(1e-30)).sqrt()
    else:
        diagonal = None
    if m <= n:  # the left singular vectors u of P^1/2 W S; B A = P^-1/2 u_r u_r^T P^1/2 W
        metric = damped(covariance, damping) if diagonal is None else torch.diag(diagonal**2)
        weighted = w if rows is None else rows * w
        sigma, u = eigh_descending(weighted @ metric @ weighted.T)
        scale = _balance(sigma)
        up, down = (u * scale if rows is None else u * scale / rows), (u / scale).T @ weighted
    else:  # the right singular vectors v of P^1/2 W S; B A = W S v_r v_r^T S^-1
        if diagonal is None:
            s, apply_inverse, used = whitening_factor(covariance, damping)
            whitened = w @ s
        else:
            whitened = w * diagonal
            apply_inverse = lambda x: x / diagonal  # noqa: E731
        weighted = whitened if rows is None else rows * whitened
        sigma, v = eigh_descending(weighted.T @ weighted)
        scale = _balance(sigma)
        up, down = (whitened @ v) / scale, apply_inverse((v * scale).T)
    dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
    return Decomposition(up=up.to(dtype), down=down.to(dtype), singular_values=sigma, damping=used)


class DecomposeWeights(GraphPass):
    name = "decompose_weights"
    preserves_outputs = True

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> str | None:
        if ctx.config.init != "svd":
            missing = [s.name for s in ctx.compressed_sites if s.name not in ctx.covariances]
            if missing:
                return f"no input covariance for {missing[:3]} (run calibrate_input_covariance first)"
        return None

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        sites = ctx.compressed_sites
        for site in progress_bar(sites, desc="decompose", leave=False, enabled=len(sites) >= 8):
            covariance = ctx.covariances.get(site.name)
            counts = ctx.lookup_counts.get(site.name)
            ctx.decompositions[site.name] = decompose(
                site.weight(gm),  # (out, in) in every layout, the kept neurons only
                covariance.covariance if covariance is not None else None,
                ctx.config.init,
                ctx.config.damping,
                lookup_row_weights(counts) if counts is not None else None,
            )
        return gm

    def ensures(self, gm: fx.GraphModule, ctx: PassContext) -> str | None:
        for site in ctx.compressed_sites:
            d = ctx.decompositions.get(site.name)
            if d is None:
                return f"no decomposition for site '{site.name}'"
            k = d.singular_values.numel()
            if d.up.shape != (site.out_features, k) or d.down.shape != (k, site.in_features):
                return f"factors of site '{site.name}' have shapes {tuple(d.up.shape)} and {tuple(d.down.shape)}"
            if not (torch.isfinite(d.up).all() and torch.isfinite(d.down).all()):
                return f"factors of site '{site.name}' hold NaN or inf"
        return None
