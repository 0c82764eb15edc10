"""Activation-aware initialization: the whitened factors are the rank-r optimum of
||(W - B A) X||_F, beat plain SVD on anisotropic inputs, and survive singular covariances."""

from __future__ import annotations

import pytest
import torch

from tunecomp_fx.passes.decompose_weights import decompose, whitening_factor
from tests.models import anisotropic_inputs


def _activation_error(weight: torch.Tensor, approx: torch.Tensor, x: torch.Tensor) -> float:
    return ((weight - approx).double() @ x.double().T).norm().item()


def _truncated(weight, covariance, init, rank):
    d = decompose(weight, covariance, init, damping=1e-8)
    return d.up[:, :rank] @ d.down[:rank]


@pytest.mark.parametrize("shape", [(48, 96), (96, 48)])  # both branches: m <= n and m > n
def test_whitened_factors_are_the_rank_r_optimum(shape):
    torch.manual_seed(0)
    weight = torch.randn(*shape, dtype=torch.float64)
    x = anisotropic_inputs(500, shape[1]).double()
    covariance = x.T @ x / len(x)
    rank = 12
    # Reference: the Eckart-Young truncation of W X projected back (exact SVD).
    u = torch.linalg.svd(weight @ x.T, full_matrices=False)[0][:, :rank]
    reference = u @ u.T @ weight
    ours = _truncated(weight.float(), covariance, "whitened", rank).double()
    assert _activation_error(weight, ours, x) == pytest.approx(_activation_error(weight, reference, x), rel=1e-4)
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("shape", [(48, 96), (96, 48)])
def test_whitened_beats_plain_svd_on_anisotropic_inputs(shape):
    torch.manual_seed(1)
    weight = torch.randn(*shape)
    x = anisotropic_inputs(400, shape[1], seed=1)
    covariance = (x.T @ x / len(x)).double()
    for rank in (4, 16, 32):
        whitened = _activation_error(weight, _truncated(weight, covariance, "whitened", rank), x)
        asvd = _activation_error(weight, _truncated(weight, covariance, "asvd", rank), x)
        plain = _activation_error(weight, _truncated(weight, None, "svd", rank), x)
        assert whitened < 0.8 * plain, (rank, whitened, plain)
        assert whitened <= asvd * (1 + 1e-6)


@pytest.mark.parametrize("shape", [(48, 96), (96, 48)])
def test_rank_deficient_covariance_gives_finite_factors_that_still_win(shape):
    torch.manual_seed(2)
    weight = torch.randn(*shape)
    # 20 samples in 96 or 48 dimensions, and one dead channel: the covariance is singular.
    x = anisotropic_inputs(20, shape[1], seed=2)
    x[:, 3] = 0
    covariance = (x.T @ x / len(x)).double()
    assert torch.linalg.matrix_rank(covariance) < shape[1]
    d = decompose(weight, covariance, "whitened", damping=1e-6)
    assert torch.isfinite(d.up).all() and torch.isfinite(d.down).all()
    rank = 8
    whitened = _activation_error(weight, d.up[:, :rank] @ d.down[:rank], x)
    plain = _activation_error(weight, _truncated(weight, None, "svd", rank), x)
    assert whitened < plain


def test_whitening_falls_back_when_cholesky_fails():
    covariance = -torch.eye(6, dtype=torch.float64)  # not positive definite at any damping
    s, apply_inverse, _ = whitening_factor(covariance, 1e-6)
    assert torch.isfinite(s).all()
    torch.testing.assert_close(apply_inverse(s), torch.eye(6, dtype=torch.float64), atol=1e-6, rtol=0)


def test_full_rank_factors_reproduce_the_weight():
    torch.manual_seed(3)
    weight = torch.randn(40, 24)
    x = anisotropic_inputs(200, 24, seed=3)
    d = decompose(weight, (x.T @ x / len(x)).double(), "whitened", damping=1e-8)
    torch.testing.assert_close(d.up @ d.down, weight, atol=1e-4, rtol=1e-4)
    assert (d.singular_values[:-1] >= d.singular_values[1:]).all()
