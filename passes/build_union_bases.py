"""Analysis (method="union"): for every compressed site, a task-aware union of subspaces and the
projection of W0 into it (DESIGN.md section 2, second method).

- input basis V: the leading eigenvectors of the input covariance C united with the leading right
  singular vectors of W0; output basis U: the leading eigenvectors of the output-gradient
  covariance G united with the leading left singular vectors; each orthonormalized by QR;
- the core M = U^T W0 V is truncated inside the union by its SVD M = P S Q^T: component i is the
  rank-one map s_i (U p_i)(V q_i)^T, with the rotated bases U P and V Q still orthonormal;
- components are ordered by their task-aware gain, the second-order (Kronecker-factored Fisher)
  estimate of the loss increase from dropping them: s_i^2 (u_i^T G u_i)(v_i^T C v_i). Its square
  root is the decomposition's `singular_values`, so allocate_ranks' global allocation spends
  parameters by gain unchanged, and its length caps the rank at the union's size.

Each source contributes as many directions as the site's uniform share of the budget, so the
union holds up to twice that: room for global allocation to move ranks, well short of the
full space (where the method would reduce to a plain SVD)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import fx

from tunecomp_fx.errors import CalibrationError
from tunecomp_fx.passes.decompose_weights import eigh_descending, single_thread
from tunecomp_fx.pipeline import GraphPass, PassContext
from tunecomp_fx.progress import progress_bar
from tunecomp_fx.sites import Site

_DEPENDENT = 1e-6  # QR diagonal entries below this fraction of the largest mark a direction already spanned


@dataclass
class UnionDecomposition:
    """W0 ~= up @ diag(core) @ down inside the union, components ordered by task-aware gain."""

    up: torch.Tensor  # (out, k): orthonormal columns U P, fixed during training
    core: torch.Tensor  # (k,): the singular values of the projected core, the trainable core's start
    down: torch.Tensor  # (k, in): orthonormal rows (V Q)^T, fixed during training
    singular_values: torch.Tensor  # (k,) float64: sqrt of the gains, read by allocate_ranks
    input_basis: torch.Tensor  # (in, k_in) float64: the union V before truncation
    output_basis: torch.Tensor  # (out, k_out) float64: the union U before truncation


def union_basis(*blocks: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis (columns) of the span of the blocks' columns, by QR; columns whose
    direction the earlier ones already span are dropped."""
    q, r = torch.linalg.qr(torch.cat(blocks, dim=1))
    diagonal = r.diagonal().abs()
    return q[:, diagonal > _DEPENDENT * diagonal.max().clamp_min(1e-300)]


def leading_eigenvectors(covariance: torch.Tensor, count: int) -> torch.Tensor:
    return eigh_descending(covariance.to(torch.float64))[1][:, :count]


def source_width(site: Site, kept_fraction: float) -> int:
    """Directions each source contributes: the site's uniform rank share of the budget."""
    share = kept_fraction * site.dense_params / (site.in_features + site.out_features)
    return max(1, min(site.in_features, site.out_features, math.ceil(share)))


def build_union(
    weight: torch.Tensor, input_covariance: torch.Tensor, gradient_covariance: torch.Tensor, width: int
) -> UnionDecomposition:
    w = weight.detach().to(torch.float64)
    c = input_covariance.to(w.device, torch.float64)  # calibration accumulates on the CPU
    g = gradient_covariance.to(w.device, torch.float64)
    with single_thread():
        left, _, right_t = torch.linalg.svd(w, full_matrices=False)
        v = union_basis(leading_eigenvectors(c, width), right_t[:width].T)
        u = union_basis(leading_eigenvectors(g, width), left[:, :width])
        p, s, q_t = torch.linalg.svd(u.T @ w @ v, full_matrices=False)
    up, down_t = u @ p, v @ q_t.T
    gains = s.square() * ((g @ up) * up).sum(0) * ((c @ down_t) * down_t).sum(0)
    order = gains.argsort(descending=True)
    dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
    return UnionDecomposition(
        up=up[:, order].to(dtype),
        core=s[order].to(dtype),
        down=down_t[:, order].T.to(dtype),
        singular_values=gains[order].clamp_min(0).sqrt(),
        input_basis=v,
        output_basis=u,
    )


class BuildUnionBases(GraphPass):
    name = "build_union_bases"
    preserves_outputs = True

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> str | None:
        for name, found in (("input covariance", ctx.covariances), ("output-gradient covariance", ctx.gradient_covariances)):
            missing = [s.name for s in ctx.compressed_sites if s.name not in found]
            if missing:
                raise CalibrationError(f"no {name} for {missing[:3]}; run the calibration passes first")
        return None

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        sites = ctx.compressed_sites
        for site in progress_bar(sites, desc="union bases", leave=False, enabled=len(sites) >= 8):
            ctx.decompositions[site.name] = build_union(
                gm.get_parameter(site.weight_target).flatten(1),  # (out, in) in every layout
                ctx.covariances[site.name].covariance,
                ctx.gradient_covariances[site.name].covariance,
                source_width(site, ctx.config.kept_fraction),
            )
        return gm
