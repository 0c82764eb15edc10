"""Activation-aware initialization: the whitened factors are the rank-r optimum of
||(W - B A) X||_F, beat plain SVD on anisotropic inputs, survive singular, ill-conditioned and
all-zero covariances, and are computed in float64 for half-precision weights."""

from __future__ import annotations

import pytest
import torch

from tunecomp_fx.passes.decompose_weights import decompose, lookup_row_weights, whitening_factor
from tunecomp_fx.passes.initialize_students import activation_error
from tests.models import anisotropic_inputs


def _activation_error(weight: torch.Tensor, approx: torch.Tensor, x: torch.Tensor) -> float:
    return ((weight - approx).double() @ x.double().T).norm().item()


def _truncated(weight, covariance, init, rank):
    d = decompose(weight, covariance, init, damping=1e-8)
    return d.up[:, :rank] @ d.down[:rank]


@pytest.mark.parametrize("rows", ["unweighted", "unit weights", "weighted by reads"])
@pytest.mark.parametrize("shape", [(48, 96), (96, 48)])  # both branches: m <= n and m > n
def test_whitened_factors_are_the_rank_r_optimum(shape, rows):
    """Of ||(W - B A) X^T||_F; with a tied table's rows weighted by its lookups' reads (P), of
    ||P^1/2 (W - B A) X^T||_F, which unit weights leave as it is."""
    torch.manual_seed(0)
    weight = torch.randn(*shape, dtype=torch.float64)
    x = anisotropic_inputs(500, shape[1]).double()
    covariance = x.T @ x / len(x)
    rank = 12
    weights = {
        "unweighted": None,
        "unit weights": torch.ones(shape[0]),
        "weighted by reads": lookup_row_weights(torch.randint(0, 50, (shape[0],)) * (torch.rand(shape[0]) < 0.5)),  # half never read
    }[rows]
    root = torch.ones(shape[0], 1, dtype=torch.float64) if weights is None else weights.double().sqrt()[:, None]
    # Reference: the Eckart-Young truncation of P^1/2 W X projected back (exact SVD), unweighted back.
    u = torch.linalg.svd(root * weight @ x.T, full_matrices=False)[0][:, :rank]
    reference = u @ u.T @ (root * weight) / root
    factors = decompose(weight.float(), covariance, "whitened", damping=1e-8, row_weights=weights)
    ours = (factors.up[:, :rank] @ factors.down[:rank]).double()
    error = lambda approx: (root * (weight - approx) @ x.T).norm().item()  # noqa: E731
    assert error(ours) == pytest.approx(error(reference), rel=1e-4)
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-3)
    if rows == "weighted by reads":
        assert weights.mean().item() == pytest.approx(1.0) and weights.min() > 0
        assert error(ours) < error(_truncated(weight.float(), covariance, "whitened", rank).double())


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


def _ill_conditioned(kind: str, n: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(4)
    if kind == "condition_1e13":
        q = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))[0]
        return q @ torch.diag(torch.logspace(0, -13, n, dtype=torch.float64)) @ q.T
    few = torch.randn(3, n, generator=generator, dtype=torch.float64)
    if kind == "rank_3":  # exactly singular: three samples
        return few.T @ few / 3
    if kind == "negative_eigenvalue_noise":  # a singular covariance plus symmetric rounding noise
        noise = torch.randn(n, n, generator=generator, dtype=torch.float64) * 1e-9
        return few.T @ few / 3 + noise + noise.T
    if kind == "zero_channel":
        x = anisotropic_inputs(200, n, seed=4).double()
        x[:, 5] = 0
        return x.T @ x / len(x)
    if kind == "all_zero":  # a site whose input is always zero (e.g. behind a dead ReLU)
        return torch.zeros(n, n, dtype=torch.float64)
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["condition_1e13", "rank_3", "negative_eigenvalue_noise", "zero_channel", "all_zero"])
@pytest.mark.parametrize("shape", [(24, 48), (48, 24)])
@pytest.mark.parametrize("init", ["whitened", "asvd"])
def test_ill_conditioned_covariances_give_finite_factors(kind, shape, init):
    torch.manual_seed(5)
    weight = torch.randn(*shape)
    covariance = _ill_conditioned(kind, shape[1])
    d = decompose(weight, covariance, init, damping=1e-6)
    assert torch.isfinite(d.up).all() and torch.isfinite(d.down).all() and torch.isfinite(d.singular_values).all()
    # All ranks together give the weight back, whatever the conditioning.
    torch.testing.assert_close(d.up @ d.down, weight, atol=1e-4, rtol=1e-4)
    # A truncation is a projection of W: never worse than the zero matrix on these inputs, and the
    # whitened one at least as good as the plain SVD (up to the damping).
    rank = 6
    ours = activation_error(weight, d.up[:, :rank] @ d.down[:rank], covariance)
    plain = decompose(weight, None, "svd", damping=1e-6)
    svd = activation_error(weight, plain.up[:, :rank] @ plain.down[:rank], covariance)
    assert ours <= 1.0 + 1e-6
    if init == "whitened":
        assert ours <= svd + 1e-4, (ours, svd)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(24, 48), (48, 24)])
def test_half_precision_factors_are_computed_in_float64_and_balanced(dtype, shape):
    torch.manual_seed(6)
    weight = torch.randn(*shape).to(dtype)
    x = anisotropic_inputs(300, shape[1], seed=6).double()
    covariance = x.T @ x / len(x)
    d = decompose(weight, covariance, "whitened", damping=1e-6)
    assert d.up.dtype == d.down.dtype == dtype and d.singular_values.dtype == torch.float64
    reference = decompose(weight.double(), covariance, "whitened", damping=1e-6)
    # The half-precision factors are the float64 ones rounded once.
    torch.testing.assert_close(d.down, reference.down.to(dtype), atol=0, rtol=0)
    # Tiny inputs (activations of size 1e-8) change neither the factors nor their range: the metric's
    # scale is divided out, so float16 does not overflow.
    tiny = decompose(weight, covariance * 1e-16, "whitened", damping=1e-6)
    assert torch.isfinite(tiny.up).all() and torch.isfinite(tiny.down).all()
    torch.testing.assert_close(tiny.down.double(), d.down.double(), atol=2e-2, rtol=2e-2)
    error = activation_error(weight, d.up.double() @ d.down.double(), covariance)
    assert error <= 8 * torch.finfo(dtype).eps  # full rank: only the rounding of the factors
