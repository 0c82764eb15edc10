"""Each pass's `ensures` catches a broken version of its real invariant, the runner checks numerics
of output-preserving passes (with a tolerance fit for the dtype), and finalize refuses to return a
model that still needs this package."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import fx, nn

import tunecomp_fx
from tunecomp_fx.api import finalize_passes
from tunecomp_fx.mode import set_training_mode
from tunecomp_fx.passes.allocate_ranks import AllocateRanks
from tunecomp_fx.passes.decompose_weights import DecomposeWeights
from tunecomp_fx.passes.eliminate_dead_code import EliminateDeadCode
from tunecomp_fx.passes.fold_blends import FoldBlends
from tunecomp_fx.passes.initialize_students import InitializeStudents
from tunecomp_fx.passes.insert_teacher_student import InsertTeacherStudent
from tunecomp_fx.pipeline import GraphPass, PassContext, RankDecision, run_passes
from tunecomp_fx.sites import student_nodes
from tests.models import MLP


@pytest.fixture
def prepared() -> fx.GraphModule:
    torch.manual_seed(0)
    return tunecomp_fx.prepare(MLP().eval(), (torch.randn(16, 64),), ratio=0.5)


def context(prepared: fx.GraphModule) -> PassContext:
    return prepared.meta["tunecomp"].context


def test_allocate_ranks_checks_the_budget_and_the_ranks(prepared):
    ctx = context(prepared)
    assert AllocateRanks().ensures(prepared, ctx) is None
    site = ctx.compressed_sites[0]
    ctx.ranks[site.name] = RankDecision(site.break_even_rank - 1)
    assert "over the budget" in AllocateRanks().ensures(prepared, ctx)
    ctx.ranks[site.name] = RankDecision(site.break_even_rank)
    assert "outside [1, break-even" in AllocateRanks().ensures(prepared, ctx)


def test_insert_teacher_student_checks_the_pattern(prepared):
    ctx = context(prepared)
    assert InsertTeacherStudent().ensures(prepared, ctx) is None
    roles = student_nodes(prepared)["fc1"]
    relu = next(iter(roles["blend"].users))
    relu.replace_input_with(roles["blend"], roles["teacher"])  # a user reads the teacher directly
    assert "not read by its blend alone" in InsertTeacherStudent().ensures(prepared, ctx)


def test_initialize_students_checks_the_error_of_each_student(prepared):
    ctx = context(prepared)
    assert InitializeStudents().ensures(prepared, ctx) is None
    ctx.init_errors["fc2"] = float("nan")
    assert "student of site 'fc2' has initialization error nan" in InitializeStudents().ensures(prepared, ctx)


def test_initialize_students_checks_that_a_union_student_is_a_projection_of_its_teacher():
    torch.manual_seed(0)
    calib = [(torch.randn(16, 64), torch.randint(0, 10, (16,)))]
    prepared = tunecomp_fx.prepare(MLP().eval(), (calib[0][0],), ratio=0.5, method="union", calib=calib)
    ctx = context(prepared)
    assert InitializeStudents().ensures(prepared, ctx) is None
    with torch.no_grad():
        prepared.get_submodule("lowrank.fc2.core").weight.mul_(1.5)  # a core off the projection of W
    assert "union student of site 'fc2' is not a projection of its teacher's weight" in InitializeStudents().ensures(prepared, ctx)


def test_decompose_weights_checks_for_finite_factors(prepared):
    ctx = context(prepared)
    DecomposeWeights().run(prepared, ctx)  # prepare dropped the factors; compute them again
    ctx.covariances.clear()
    assert DecomposeWeights().ensures(prepared, ctx) is None
    ctx.decompositions["fc1"].up[0, 0] = float("inf")
    assert "factors of site 'fc1' hold NaN or inf" in DecomposeWeights().ensures(prepared, ctx)


def test_eliminate_dead_code_checks_for_unused_weights(prepared):
    tunecomp_fx.set_blend(prepared, 0.0)
    compact = tunecomp_fx.finalize(prepared)
    assert EliminateDeadCode().ensures(compact, None) is None
    compact.register_buffer("stale", torch.zeros(3))
    assert "unused parameters or buffers left: ['stale']" in EliminateDeadCode().ensures(compact, None)


def test_finalize_refuses_to_leave_parts_of_the_package(prepared, monkeypatch):
    tunecomp_fx.set_blend(prepared, 0.0)
    # Without fold_blends the blends (tunecomp_fx.sites.Blend) stay in the graph.
    monkeypatch.setattr("tunecomp_fx.api.finalize_passes", lambda: [p for p in finalize_passes() if not isinstance(p, FoldBlends)])
    with pytest.raises(tunecomp_fx.PassError, match=r"finalize left parts of tunecomp_fx.*\(Blend\)"):
        tunecomp_fx.finalize(prepared)


class _ScaleFirstWeight(GraphPass):
    """A pass that claims to preserve outputs but scales a weight by `factor`."""

    name = "scale_first_weight"
    preserves_outputs = True

    def __init__(self, factor: float) -> None:
        self.factor = factor

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        with torch.no_grad():
            next(gm.parameters()).mul_(self.factor)
        return gm


@pytest.mark.parametrize("dtype, harmless, harmful", [(torch.float32, 1 + 1e-7, 1.01), (torch.bfloat16, 1 + 2**-8, 1.1)])
def test_runner_checks_numerics_with_a_tolerance_for_the_dtype(dtype, harmless, harmful):
    model = fx.symbolic_trace(nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).to(dtype))
    ctx = PassContext(config=tunecomp_fx.CompressionConfig(check_numerics=True), check_inputs=(torch.randn(8, 16).to(dtype),))
    run_passes(copy.deepcopy(model), [_ScaleFirstWeight(harmless)], ctx)  # rounding-sized: passes
    with pytest.raises(tunecomp_fx.PassError, match="pass 'scale_first_weight' promises unchanged outputs, but output 0 moved"):
        run_passes(model, [_ScaleFirstWeight(harmful)], ctx)
    unchecked = PassContext(config=tunecomp_fx.CompressionConfig(check_numerics=False), check_inputs=ctx.check_inputs)
    run_passes(model, [_ScaleFirstWeight(harmful)], unchecked)  # only when asked


class _DropoutNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.norm = nn.BatchNorm1d(32)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.relu(self.norm(self.fc1(x)))))


def test_numerics_check_runs_in_eval_mode_and_leaves_the_mode_and_statistics_alone():
    """During training the model is in train mode: the check must neither see dropout's noise nor
    update batch-norm statistics, and must hand the model back in train mode."""
    torch.manual_seed(0)
    prepared = tunecomp_fx.prepare(_DropoutNorm().eval(), (torch.randn(8, 16),), ratio=0.5, check_numerics=True)
    tunecomp_fx.set_blend(prepared, 0.0)
    set_training_mode(prepared, True)
    statistics = prepared.get_submodule("norm").running_mean.clone()
    run_passes(prepared, [FoldBlends()], context(prepared))  # outputs compared before and after
    assert prepared.training and prepared.get_submodule("drop").training
    torch.testing.assert_close(prepared.get_submodule("norm").running_mean, statistics, atol=0, rtol=0)
    x = torch.randn(8, 16)
    assert not torch.equal(prepared(x), prepared(x))  # dropout still draws
