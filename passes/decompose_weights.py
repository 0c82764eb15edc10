"""Analysis: factor every compressed site's weight so that any rank-r truncation minimises the
activation-weighted error ||(W - B A) X||_F (DESIGN.md section 2).

With C = X X^T / N = S S^T, take the SVD  W S = U Sigma V^T; then B = U Sigma^1/2 and
A = Sigma^1/2 V^T S^-1, ordered by singular value. "svd" uses S = I, "asvd" a diagonal S."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx
from tqdm.auto import tqdm

from tunecomp_fx.pipeline import GraphPass, PassContext

_DAMPING_STEPS = 4  # each retry multiplies the damping by 100


@dataclass
class Decomposition:
    """Full-rank factors W ~= up @ down, ranks ordered by `singular_values` (of the whitened W)."""

    up: torch.Tensor  # (out, k)
    down: torch.Tensor  # (k, in)
    singular_values: torch.Tensor  # (k,), float64
    damping: float  # the relative damping that made the covariance factorizable


def whitening_factor(covariance: torch.Tensor, damping: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(S, S^-1, damping used) with S S^T = C + damping * mean(diag C) * I, in float64.

    Tries Cholesky with growing damping; falls back to a clamped eigendecomposition, so that
    rank-deficient or ill-conditioned covariances never fail."""
    c = covariance.to(torch.float64)
    n = c.shape[0]
    scale = c.diagonal().mean().clamp_min(torch.finfo(torch.float64).tiny)
    eye = torch.eye(n, dtype=torch.float64, device=c.device)
    for step in range(_DAMPING_STEPS):
        eps = damping * 100.0**step
        lower, info = torch.linalg.cholesky_ex(c + eps * scale * eye)
        if info.item() == 0:
            inverse = torch.linalg.solve_triangular(lower, eye, upper=False)
            if torch.isfinite(inverse).all():
                return lower, inverse, eps
    eigenvalues, vectors = torch.linalg.eigh(c)
    eigenvalues = eigenvalues.clamp_min(damping * scale)
    root = eigenvalues.sqrt()
    return vectors * root, (vectors / root).T, damping


def decompose(weight: torch.Tensor, covariance: torch.Tensor | None, init: str, damping: float) -> Decomposition:
    w = weight.detach().to(torch.float64)
    if init == "svd" or covariance is None:
        u, sigma, vt = torch.linalg.svd(w, full_matrices=False)
        used = 0.0
        down = vt
    elif init == "asvd":
        # Diagonal scaling by the square root of each input channel's RMS (ASVD, alpha = 0.5).
        rms = covariance.to(torch.float64).diagonal().clamp_min(0).sqrt()
        scale = (rms + damping * rms.mean().clamp_min(1e-30)).sqrt()
        u, sigma, vt = torch.linalg.svd(w * scale, full_matrices=False)
        used = damping
        down = vt / scale
    else:
        s, s_inverse, used = whitening_factor(covariance, damping)
        u, sigma, vt = torch.linalg.svd(w @ s, full_matrices=False)
        down = vt @ s_inverse
    root = sigma.sqrt()
    dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
    return Decomposition(
        up=(u * root).to(dtype), down=(root[:, None] * down).to(dtype), singular_values=sigma, damping=used
    )


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
        for site in tqdm(sites, desc="decompose", leave=False, disable=len(sites) < 8):
            covariance = ctx.covariances.get(site.name)
            ctx.decompositions[site.name] = decompose(
                gm.get_parameter(site.weight_target).flatten(1),  # (out, in) in every layout
                covariance.covariance if covariance is not None else None,
                ctx.config.init,
                ctx.config.damping,
            )
        return gm
