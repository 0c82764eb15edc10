"""Numerical robustness end to end: half-precision models compress with float64 decompositions and
keep their dtype; every student's initialization error is measured and reported (method="union"'s
too: zero when the union spans the weight, at most plain truncation's at the union's full size); a
site whose input is always zero does not break the factorization."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import tunecomp_fx
from tunecomp_fx.config import CompressionConfig
from tunecomp_fx.passes.build_union_bases import build_union
from tunecomp_fx.passes.initialize_students import activation_error
from tests.models import MLP, AttentionBlock


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("model_factory, shape", [(MLP, (64, 64)), (AttentionBlock, (8, 10, 64))])
def test_half_precision_model_compresses_and_keeps_its_dtype(dtype, model_factory, shape):
    torch.manual_seed(0)
    reference = model_factory().eval()
    x = torch.randn(*shape)
    half = copy.deepcopy(reference).to(dtype)
    compact = tunecomp_fx.compress(half, (x.to(dtype),), ratio=0.4)
    compact32 = tunecomp_fx.compress(reference, (x,), ratio=0.4)
    assert {p.dtype for p in compact.parameters()} == {dtype}
    report = tunecomp_fx.get_report(compact)
    assert [row.rank for row in report.sites] == [row.rank for row in tunecomp_fx.get_report(compact32).sites]
    with torch.no_grad():
        out = compact(x.to(dtype))
        assert out.dtype == dtype
        # Tolerance: compressing in half precision may add no more than 3x the error that casting
        # the original model to that precision causes by itself (factors from float64 eigensolves,
        # rounded once to the model's dtype).
        cast_error = (half(x.to(dtype)).float() - reference(x)).abs().max().item()
        error = (out.float() - compact32(x)).abs().max().item()
    assert error <= 3 * cast_error, (error, cast_error)
    # The students reproduce their teachers as well as in float32, up to half-precision rounding.
    for row, row32 in zip(report.sites, tunecomp_fx.get_report(compact32).sites):
        assert row.init_error == pytest.approx(row32.init_error, abs=8 * torch.finfo(dtype).eps)


def test_init_error_is_measured_per_site_and_grows_as_rank_shrinks():
    torch.manual_seed(0)
    model = AttentionBlock().eval()
    x = torch.randn(16, 10, 64)
    by_site: dict[str, dict[int, float]] = {}
    for ratio in (0.2, 0.5, 0.8):
        report = tunecomp_fx.get_report(tunecomp_fx.compress(model, (x,), ratio=ratio))
        for row in report.sites:
            by_site.setdefault(row.name, {})[row.rank] = row.init_error
        assert "init error" in str(report) and "reproduce their teachers within" in str(report)
    for name, errors in by_site.items():
        ranks = sorted(errors, reverse=True)
        assert len(ranks) >= 2, name
        assert all(0 < errors[a] < errors[b] <= 1.0 for a, b in zip(ranks, ranks[1:])), (name, errors)
    # Full rank (a slack beyond every site's width): the students reproduce their teachers.
    full = tunecomp_fx.get_report(tunecomp_fx.compress(model, (x,), ratio=0.5, rank_slack=10.0))
    assert all(row.init_error < 1e-5 for row in full.sites)


def test_init_error_is_the_relative_error_on_the_calibration_activations():
    torch.manual_seed(0)
    model = MLP().eval()
    x = torch.randn(256, 64)
    prepared = tunecomp_fx.prepare(model, (x,), ratio=0.5)
    state = prepared.meta["tunecomp"]
    student = prepared.get_submodule("lowrank.fc1")
    approx = student.up.weight @ student.down.weight
    direct = ((model.fc1.weight - approx) @ x.T).norm() / (model.fc1.weight @ x.T).norm()
    assert state.context.init_errors["fc1"] == pytest.approx(direct.item(), rel=1e-4)


def test_union_init_reproduces_a_teacher_whose_weight_its_union_spans():
    """The union holds each weight's leading singular directions (as many as the site's rank share):
    when every weight has a lower rank, U U^T W V V^T = W and the union students reproduce their
    teachers: the report's init error is 0 up to rounding, as the default method's at full rank."""
    torch.manual_seed(0)
    model = MLP().eval()
    with torch.no_grad():
        for weight in (model.fc1.weight, model.fc2.weight, model.head_weight):
            out_features, in_features = weight.shape
            weight.copy_(torch.randn(out_features, 3) @ torch.randn(3, in_features) / in_features**0.5)
    calib = [(torch.randn(64, 64), torch.randint(0, 10, (64,))) for _ in range(2)]
    report = tunecomp_fx.get_report(tunecomp_fx.compress(model, (calib[0][0],), ratio=0.5, method="union", calib=calib))
    assert [row.rank is not None and row.rank >= 3 for row in report.sites] == [True] * 3
    assert all(row.init_error < 1e-5 for row in report.sites), [row.init_error for row in report.sites]


def test_union_at_its_full_size_is_within_the_error_of_plain_truncation_to_its_width():
    """U and V contain the top-`width` singular vectors of W, so the projection U U^T W V V^T (the
    union student at full size) is at least as close to W as the rank-`width` SVD truncation."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 40, generator=generator, dtype=torch.float64)
    x, g = torch.randn(200, 40, generator=generator, dtype=torch.float64), torch.randn(200, 48, generator=generator, dtype=torch.float64)
    plain = torch.eye(40, dtype=torch.float64)  # activation_error in the plain Frobenius metric
    for width in (2, 5, 12):
        union = build_union(weight, x.T @ x / 200, g.T @ g / 200, width)
        student = union.up @ torch.diag(union.core) @ union.down
        u, s, v_t = torch.linalg.svd(weight)
        truncated = u[:, :width] @ torch.diag(s[:width]) @ v_t[:width]
        assert union.core.shape[0] > width  # the covariances add directions to the weight's own
        assert activation_error(weight, student, plain) <= activation_error(weight, truncated, plain) + 1e-12, width


class DeadBranch(nn.Module):
    """fc2 only ever sees zeros: relu(-|h|) = 0."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(32, 48)
        self.fc2 = nn.Linear(48, 48)
        self.fc3 = nn.Linear(48, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc3(h + self.fc2(torch.relu(-h.abs())))


def test_site_with_all_zero_inputs_gets_finite_factors():
    torch.manual_seed(0)
    model = DeadBranch().eval()
    x = torch.randn(32, 32)
    compact = tunecomp_fx.compress(model, (x,), ratio=0.5)
    rows = {row.name: row for row in tunecomp_fx.get_report(compact).sites}
    assert rows["fc2"].rank is not None and rows["fc2"].init_error == 0.0
    assert all(torch.isfinite(p).all() for p in compact.parameters())
    with torch.no_grad():
        assert torch.isfinite(compact(x)).all()


def test_the_test_suite_checks_numerics_after_every_pass():
    assert CompressionConfig().check_numerics  # tests/conftest.py turns the invariant checks on
