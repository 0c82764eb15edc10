"""method="union": gradient calibration, union bases (containment, orthonormality), global
allocation over union components, core-only training and the fold of the cores at finalize."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tunecomp_fx
from tests.joint_task import digits_task, endless, fresh, single_thread  # noqa: F401
from tunecomp_fx import CalibrationError, ConfigError, StepHook
from tunecomp_fx.capture import capture
from tunecomp_fx.config import CompressionConfig
from tunecomp_fx.passes.allocate_ranks import allocate, global_priority
from tunecomp_fx.passes.build_union_bases import build_union
from tunecomp_fx.passes.calibrate_input_covariance import CalibrateInputCovariance
from tunecomp_fx.passes.calibrate_output_gradients import CalibrateOutputGradients
from tunecomp_fx.passes.find_linear_sites import FindLinearSites
from tunecomp_fx.pipeline import PassContext, run_passes
from tunecomp_fx.sites import LOWRANK_ROOT, Site, set_blend


def _orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))[0]


def _covariance_with_top(directions: torch.Tensor, seed: int) -> torch.Tensor:
    """A covariance whose leading eigenvectors are `directions` (strongly), plus a weak full-rank part."""
    n = directions.shape[0]
    noise = torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) / n
    return directions @ torch.diag(torch.linspace(10.0, 5.0, directions.shape[1], dtype=torch.float64)) @ directions.T + noise @ noise.T


def _residual(basis: torch.Tensor, directions: torch.Tensor) -> float:
    """Largest norm of a direction's component outside span(basis)."""
    return (directions - basis @ (basis.T @ directions)).norm(dim=0).max().item()


def test_union_bases_span_the_weight_and_the_task_directions_and_are_orthonormal() -> None:
    out_features, in_features, width = 48, 40, 5
    weight = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    input_top, gradient_top = _orthonormal(in_features, width, 1), _orthonormal(out_features, width, 2)
    input_covariance, gradient_covariance = _covariance_with_top(input_top, 3), _covariance_with_top(gradient_top, 4)
    union = build_union(weight, input_covariance, gradient_covariance, width)
    left, _, right_t = torch.linalg.svd(weight)
    input_eigenvectors = torch.linalg.eigh(input_covariance)[1][:, -width:]
    gradient_eigenvectors = torch.linalg.eigh(gradient_covariance)[1][:, -width:]
    v, u = union.input_basis, union.output_basis
    assert v.shape == (in_features, 2 * width) and u.shape == (out_features, 2 * width)  # generic: no overlap
    assert torch.allclose(v.T @ v, torch.eye(2 * width, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(u.T @ u, torch.eye(2 * width, dtype=torch.float64), atol=1e-10)
    assert _residual(v, right_t[:width].T) < 1e-8  # the top right singular directions of W0
    assert _residual(v, input_eigenvectors) < 1e-8  # the top input-covariance directions
    assert _residual(v, input_top) < 1e-2  # (the planted ones, up to the weak part's perturbation)
    assert _residual(u, left[:, :width]) < 1e-8
    assert _residual(u, gradient_eigenvectors) < 1e-8
    assert _residual(u, gradient_top) < 1e-2
    assert _residual(v, right_t[width:].T) > 0.5  # and not the whole space
    # The truncation keeps orthonormal factors inside the union, and W0's projection is exact at full size.
    down, up = union.down.double(), union.up.double()
    assert torch.allclose(down @ down.T, torch.eye(2 * width, dtype=torch.float64), atol=1e-10)
    assert _residual(v, down.T) < 1e-8 and _residual(u, up) < 1e-8
    projected = u @ u.T @ weight @ v @ v.T
    assert torch.allclose(up @ torch.diag(union.core.double()) @ down, projected, atol=1e-10)
    assert (union.singular_values[:-1] >= union.singular_values[1:]).all()  # ordered by gain


def test_overlapping_sources_give_a_smaller_union() -> None:
    weight = torch.randn(30, 20, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    _, _, right_t = torch.linalg.svd(weight)
    top = right_t[:4].T  # the task directions are W0's own
    covariance = top @ torch.diag(torch.tensor([10.0, 8.0, 6.0, 4.0], dtype=torch.float64)) @ top.T + 0.1 * torch.eye(20, dtype=torch.float64)
    union = build_union(weight, covariance, torch.eye(30, dtype=torch.float64), 4)
    assert union.input_basis.shape[1] == 4


def _site(name: str, out_features: int, in_features: int) -> Site:
    return Site(name, name, "call_module", in_features, out_features, f"{name}.weight", f"{name}.bias")


def test_global_allocation_over_union_gains_meets_the_budget_and_favours_the_flat_site() -> None:
    n, width = 64, 24
    bases = _orthonormal(n, n, 7)
    flat = bases * 1.0  # every singular value 1
    steep = bases @ torch.diag(0.1 ** torch.arange(n, dtype=torch.float64)) @ _orthonormal(n, n, 8).T
    identity = torch.eye(n, dtype=torch.float64)
    unions = {name: build_union(w, identity, identity, width) for name, w in (("flat", flat), ("steep", steep))}
    sites = [_site("flat", n, n), _site("steep", n, n)]
    energies = {name: u.singular_values.square() / u.singular_values.square().sum() for name, u in unions.items()}
    caps = {name: len(u.singular_values) for name, u in unions.items()}
    kept = 0.4
    decisions = allocate(sites, kept, 8, global_priority(energies), caps)
    total = sum(s.dense_params for s in sites)
    used = sum(s.factorized_params(decisions[s.name].rank) for s in sites)
    assert kept * total - 0.01 * total <= used <= kept * total
    assert decisions["flat"].rank > 3 * decisions["steep"].rank
    assert all(decisions[name].rank <= caps[name] for name in caps)  # never past the union


def test_output_gradient_covariance_matches_the_cross_entropy_gradient() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).eval()
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    gm = capture(model, (x,)).graph_module
    ctx = PassContext(config=CompressionConfig(method="union"), calibration=[(x[:20],), (x[20:],)],
                      calibration_targets=[y[:20], y[20:]], check_inputs=(x,))
    run_passes(gm, [FindLinearSites(), CalibrateInputCovariance(), CalibrateOutputGradients()], ctx)
    assert not any(p.grad is not None for p in model.parameters())
    assert "_tunecomp_gradient_observers" not in dict(gm.named_modules())
    # Per-example gradient of cross-entropy at the logits: softmax - onehot.
    g = torch.softmax(model(x), dim=-1).detach() - F.one_hot(y, 3).double().float()
    expected = (g.T.double() @ g.double()) / 32
    assert torch.allclose(ctx.gradient_covariances["2"].covariance, expected, atol=1e-6)
    # The first site's output gradient runs back through tanh and the last weight.
    hidden = model[0](x).detach().requires_grad_(True)
    loss = F.cross_entropy(model[2](model[1](hidden)), y, reduction="sum")
    (h,) = torch.autograd.grad(loss, hidden)
    assert torch.allclose(ctx.gradient_covariances["0"].covariance, (h.T.double() @ h.double()) / 32, atol=1e-6)


@pytest.mark.usefixtures("single_thread")
def test_core_only_training_changes_only_cores_and_finalize_matches_at_alpha_zero() -> None:
    task = digits_task()
    calib = [(task.train[0][i : i + 128], task.train[1][i : i + 128]) for i in range(0, 512, 128)]
    prepared = tunecomp_fx.prepare(
        fresh("transformer"), task.example_inputs(), 0.5, method="union", allocation="global", calib=calib
    )
    trainable_site_params = {n for n, p in prepared.named_parameters() if p.requires_grad and n.startswith(LOWRANK_ROOT)}
    assert trainable_site_params and all(n.endswith(("core.weight", "up.bias")) for n in trainable_site_params)
    before = {n: p.detach().clone() for n, p in prepared.named_parameters() if n.startswith(LOWRANK_ROOT)}
    hook = StepHook(prepared, steps=10, blend_steps=10)
    optimizer = torch.optim.AdamW([p for p in prepared.parameters() if p.requires_grad], lr=1e-2)
    data = endless(task.loader(seed=0))
    prepared.train()
    for _ in range(5):
        inputs, targets = next(data)
        (F.cross_entropy(prepared(inputs), targets) + hook.distill_loss()).backward()
        optimizer.step()
        optimizer.zero_grad()
        hook.step()
    prepared.eval()
    after = dict(prepared.named_parameters())
    for name, old in before.items():
        changed = not torch.equal(old, after[name])
        assert changed == name.endswith(("core.weight", "up.bias")), name
    hook.close()
    set_blend(prepared, 0.0)
    x = task.test[0]
    with torch.no_grad():
        expected = prepared(x)
    compact = tunecomp_fx.finalize(prepared)
    with torch.no_grad():
        assert torch.allclose(compact(x), expected, atol=1e-4)
    for container in getattr(compact, LOWRANK_ROOT).children():
        assert sorted(name for name, _ in container.named_children()) == ["down", "up"]
        assert all(type(m) is nn.Linear for m in container.children())
    report = tunecomp_fx.get_report(compact)
    assert report.kept_fraction <= 0.5


def test_union_needs_labels_and_no_slack() -> None:
    model, x = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)), torch.randn(8, 64)
    with pytest.raises(CalibrationError, match="labelled"):
        tunecomp_fx.prepare(model, (x,), 0.5, method="union")
    with pytest.raises(CalibrationError, match=r"\(inputs, targets\)"):
        tunecomp_fx.prepare(model, (x,), 0.5, method="union", calib=[x])
    with pytest.raises(ConfigError, match="rank_slack must be 0"):
        CompressionConfig(method="union", rank_slack=0.25)


def test_cli_union_says_it_needs_labelled_data(capsys: pytest.CaptureFixture[str]) -> None:
    from tunecomp_fx.cli import main

    assert main(["compress", "tests.cli_models:two_layer", "--method", "union"]) != 0
    assert "needs labelled batches" in capsys.readouterr().err
