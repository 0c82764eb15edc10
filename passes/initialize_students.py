"""Transform: write each student's factors from its site's decomposition (the leading ranks), copy
the teacher's bias into the student's bias, and record how well each student reproduces its
teacher on the calibration data (the relative activation-weighted error of the written factors;
for a table tied to the site, also the error of the rows the calibration's lookups read).
A student with a core (method="union") gets the fixed bases as factors and the diagonal of the
projected W0 as its core."""

from __future__ import annotations

import math

import torch
from torch import fx, nn

from tunecomp_fx.pipeline import GraphPass, PassContext
from tunecomp_fx.sites import site_container


def activation_error(weight: torch.Tensor, approx: torch.Tensor, covariance: torch.Tensor) -> float:
    """||(W - approx) X||_F / ||W X||_F over the inputs X whose second moment is `covariance`
    (C = X^T X / N): sqrt(tr(E C E^T) / tr(W C W^T)), 0 when W X = 0."""
    w = weight.detach().double()
    e = w - approx.detach().double()
    c = covariance.to(w.device, torch.float32)
    # The difference is taken in float64 (it cancels at high rank); the products in float32 are
    # accurate relative to each trace and several times faster than float64 on large layers.
    error = ((e.float() @ c) * e.float()).sum().double().clamp_min(0)
    total = ((w.float() @ c) * w.float()).sum().double()
    return float((error / total).sqrt()) if total > 0 else 0.0


def lookup_error(weight: torch.Tensor, approx: torch.Tensor, counts: torch.Tensor) -> float:
    """||W[ids] - approx[ids]|| / ||W[ids]|| over the ids the lookups read, row i read counts[i] times
    (0 when they read only zero rows)."""
    w = weight.detach().double()
    reads = counts.to(w.device, torch.float64)
    error = (reads * (w - approx.detach().double()).square().sum(1)).sum()
    total = (reads * w.square().sum(1)).sum()
    return float((error / total).sqrt()) if total > 0 else 0.0


def student_weight(student: nn.Module) -> torch.Tensor:
    """The student's linear map up @ (core @) down as an (out, in) matrix in float64, in every layout."""
    down = student.down.weight.double().flatten(1)
    if hasattr(student, "core"):
        down = student.core.weight.double().flatten(1) @ down
    return student.up.weight.double().flatten(1) @ down


def _tolerance(dtype: torch.dtype) -> float:
    """How far past 1 (the error of a zero student) rounding of the factors may take the error."""
    return 1e-3 + 16 * torch.finfo(dtype).eps


class InitializeStudents(GraphPass):
    name = "initialize_students"
    preserves_outputs = True  # blends still read only the teacher

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> str | None:
        analysed = ctx.decompositions.keys() & ctx.covariances.keys()
        missing = [s.name for s in ctx.factorized_sites() if s.name not in analysed]
        return f"no decomposition or covariance for {missing[:3]} (run the analysis passes first)" if missing else None

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        with torch.no_grad():
            for site in ctx.factorized_sites():
                student = site_container(gm, site)
                decomposition = ctx.decompositions[site.name]
                rank = student.down.weight.shape[0]
                student.down.weight.copy_(decomposition.down[:rank].reshape(student.down.weight.shape))
                student.up.weight.copy_(decomposition.up[:, :rank].reshape(student.up.weight.shape))
                if hasattr(student, "core"):
                    student.core.weight.copy_(torch.diag(decomposition.core[:rank]).reshape(student.core.weight.shape))
                bias = site.bias(gm)
                if bias is not None:
                    student.up.bias.copy_(bias)
                elif student.up.bias is not None:  # a table's student has none
                    student.up.bias.zero_()
                ctx.init_errors[site.name] = activation_error(
                    site.weight(gm), student_weight(student), ctx.covariances[site.name].covariance
                )
                if site.name in ctx.lookup_counts:
                    ctx.lookup_init_errors[site.name] = lookup_error(site.weight(gm), student_weight(student), ctx.lookup_counts[site.name])
        return gm

    def ensures(self, gm: fx.GraphModule, ctx: PassContext) -> str | None:
        # A factorized student is an output-side projection of its teacher's weight (in the metric its
        # init uses), so its error never exceeds the zero student's (1) by more than rounding. A union
        # student projects both sides in the plain metric: it is a sum of SVD components of U U^T W V V^T,
        # which is orthogonal to W - U U^T W V V^T, so <W - S, S> = 0 and ||W - S||_F <= ||W||_F. (Its
        # activation-weighted error may exceed 1; it must be finite.)
        for site in ctx.factorized_sites():
            error = ctx.init_errors.get(site.name)
            student = site_container(gm, site)
            weight = site.weight(gm)
            tolerance = _tolerance(weight.dtype)
            union = hasattr(student, "core")
            if union:
                overlap = _overlap(weight, student_weight(student))
                if not abs(overlap) <= tolerance:
                    return (
                        f"union student of site '{site.name}' is not a projection of its teacher's weight W: "
                        f"<W - S, S> / ||W||^2 = {overlap:.3g} (expected 0 within {tolerance:.3g})"
                    )
            limit = math.inf if union else 1.0 + tolerance
            if error is None or not error <= limit or not math.isfinite(error):
                return f"student of site '{site.name}' has initialization error {error} (expected <= {limit:.3g})"
        return None


def _overlap(weight: torch.Tensor, approx: torch.Tensor) -> float:
    """<W - S, S>_F / ||W||_F^2 in float64: 0 when S is an orthogonal projection of W."""
    w, s = weight.detach().double(), approx.detach().double()
    total = w.square().sum()
    return float(((w - s) * s).sum() / total) if total > 0 else 0.0
