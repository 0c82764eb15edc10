"""The teacher/student rewrite and its finalization: node patterns and numerical equivalence."""

from __future__ import annotations

import operator
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import fx, nn

import tunecomp_fx
from tunecomp_fx.capture import LEAF_MODULES, WRAPPED_FUNCTIONS
from tunecomp_fx.pruning import RankPruner
from tunecomp_fx.sites import Blend, student_nodes
from tests.models import MLP, AttentionBlock, Gain, ShapeBranching, UserLeaves, soft_clip

ROOT = Path(__file__).resolve().parents[1]

# Tolerances: the rewrite at alpha = 1 multiplies the teacher by exactly 1 and adds 0 * student,
# so it is exact up to float32 rounding; finalize re-associates the student's scaling and slicing.
ALPHA_ONE_ATOL = 1e-6
FINALIZE_ATOL = 1e-5


def _prepared(model: nn.Module, inputs: tuple, **options) -> fx.GraphModule:
    return tunecomp_fx.prepare(model, inputs, ratio=0.5, **options)


@pytest.mark.parametrize(
    "model_factory, inputs, forms",
    [
        (MLP, (torch.randn(16, 64),), {"call_module", "F.linear"}),
        (AttentionBlock, (torch.randn(4, 10, 64),), {"call_module"}),
        (ShapeBranching, (torch.randn(8, 32),), {"aten.linear"}),
    ],
)
def test_each_site_becomes_teacher_student_subgraph(model_factory, inputs, forms):
    torch.manual_seed(0)
    prepared = _prepared(model_factory().eval(), inputs)
    state = prepared.meta["tunecomp"]
    sites = state.context.factorized_sites()
    assert {site.form for site in sites} == forms
    nodes = student_nodes(prepared)
    assert set(nodes) == {site.key for site in sites}
    for site in sites:
        roles = nodes[site.key]
        teacher, down, mask, masked, up, blend = (roles[r] for r in ("teacher", "down", "rank_mask", "masked", "up", "blend"))
        assert teacher.name == site.node  # the original linear node is the teacher branch
        assert down.args[0] is teacher.args[0]  # both branches read the same input
        assert masked.target is operator.mul and masked.args == (down, mask)
        assert up.args == (masked,)
        assert blend.args == (teacher, up)
        assert isinstance(prepared.get_submodule(blend.target), Blend)
        assert list(teacher.users) == [blend]  # every former user of the site now reads the blend
        assert all(not p.requires_grad for p in (prepared.get_parameter(site.weight_target),))
        assert prepared.get_submodule(up.target).weight.requires_grad


@pytest.mark.parametrize("model_factory, inputs", [(MLP, (torch.randn(16, 64),)), (AttentionBlock, (torch.randn(4, 10, 64),)), (ShapeBranching, (torch.randn(8, 32),))])
def test_alpha_one_equals_original_and_finalize_equals_alpha_zero(model_factory, inputs):
    torch.manual_seed(0)
    model = model_factory().eval()
    prepared = _prepared(model, inputs)
    fresh = (torch.randn_like(inputs[0]),)
    with torch.no_grad():
        torch.testing.assert_close(prepared(*fresh), model(*fresh), atol=ALPHA_ONE_ATOL, rtol=0)
        tunecomp_fx.set_blend(prepared, 0.0)
        at_zero = prepared(*fresh)
        assert not torch.allclose(at_zero, model(*fresh), atol=1e-3)  # the student really differs
        compact = tunecomp_fx.finalize(prepared)
        torch.testing.assert_close(compact(*fresh), at_zero, atol=FINALIZE_ATOL, rtol=1e-5)


@pytest.mark.parametrize("mix, beta", [("convex", 0.75), ("power", (1 - 0.25**2) ** 0.5)])
def test_mid_blend_mixes_teacher_and_student_by_the_mix(mix, beta):
    """One site, so the output is alpha * teacher + beta * student exactly (float32 rounding)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64)).eval()
    x = torch.randn(16, 64)
    prepared = _prepared(model, (x,))
    with torch.no_grad():
        tunecomp_fx.set_blend(prepared, 0.0)
        student = prepared(x)
        tunecomp_fx.set_blend(prepared, 0.25, mix)
        torch.testing.assert_close(prepared(x), 0.25 * model(x) + beta * student, atol=ALPHA_ONE_ATOL, rtol=1e-6)


def test_finalize_refuses_while_teacher_is_blended():
    prepared = _prepared(MLP().eval(), (torch.randn(16, 64),))
    tunecomp_fx.set_blend(prepared, 0.3)
    with pytest.raises(tunecomp_fx.PassError, match="fold_blends.*alpha"):
        tunecomp_fx.finalize(prepared)


def test_compact_graph_holds_two_plain_linears_per_site_and_no_teacher():
    torch.manual_seed(0)
    model = AttentionBlock().eval()
    compact = tunecomp_fx.compress(model, (torch.randn(4, 10, 64),), ratio=0.5)
    modules = dict(compact.named_modules())
    assert all(type(m).__module__.startswith("torch.") for m in modules.values()), {type(m) for m in modules.values()}
    for name in ("qkv", "proj", "fc1", "fc2"):
        assert name not in modules  # the teachers are gone with their weights
        down, up = modules[f"lowrank.{name}.down"], modules[f"lowrank.{name}.up"]
        assert type(down) is nn.Linear and down.bias is None and type(up) is nn.Linear
        assert down.out_features == up.in_features
    call_modules = [n.target for n in compact.graph.nodes if n.op == "call_module"]
    assert call_modules == ["norm", "lowrank.qkv.down", "lowrank.qkv.up", "lowrank.proj.down", "lowrank.proj.up",
                            "lowrank.fc1.down", "lowrank.fc1.up", "lowrank.fc2.down", "lowrank.fc2.up"]
    assert not any(n.op == "get_attr" and "rank_mask" in n.target for n in compact.graph.nodes)


def test_pruned_ranks_are_sliced_away_and_outputs_kept():
    torch.manual_seed(0)
    prepared = _prepared(AttentionBlock().eval(), (torch.randn(4, 10, 64),))
    tunecomp_fx.set_blend(prepared, 0.0)
    container = prepared.get_submodule("lowrank.fc1")
    rank = container.rank_mask.numel()
    container.rank_mask[::2] = 0  # prune every other rank
    x = torch.randn(3, 10, 64)
    with torch.no_grad():
        expected = prepared(x)
        compact = tunecomp_fx.finalize(prepared)
        torch.testing.assert_close(compact(x), expected, atol=FINALIZE_ATOL, rtol=1e-5)
    assert compact.get_submodule("lowrank.fc1.down").out_features == rank - (rank + 1) // 2


def test_site_past_break_even_becomes_one_dense_linear():
    torch.manual_seed(0)
    model = AttentionBlock().eval()
    with torch.no_grad():  # fc1 nearly rank 2: "global" rank selection gives its budget to the other sites
        model.fc1.weight.copy_(model.fc1.weight[:, :2] @ torch.randn(2, 64) * 0.05)
    prepared = tunecomp_fx.prepare(model, (torch.randn(4, 10, 64),), ratio=0.5, rank_slack=1.0)
    context = prepared.meta["tunecomp"].context
    RankPruner(prepared, context, "global").update(1.0)  # the end of the blend
    tunecomp_fx.set_blend(prepared, 0.0)
    sites = context.factorized_sites()
    # Ranks moved from fc1 keep some students past their break-even point.
    past = [s for s in sites if int(prepared.get_submodule(f"lowrank.{s.key}").rank_mask.count_nonzero()) >= s.break_even_rank]
    kept = [s for s in sites if s not in past]
    assert past and kept
    x = torch.randn(2, 10, 64)
    with torch.no_grad():
        expected = prepared(x)
        compact = tunecomp_fx.finalize(prepared)
        torch.testing.assert_close(compact(x), expected, atol=1e-4, rtol=1e-4)
    for site in past:
        dense = compact.get_submodule(f"lowrank.{site.key}.dense")
        assert type(dense) is nn.Linear and (dense.out_features, dense.in_features) == (site.out_features, site.in_features)
        assert not hasattr(compact.get_submodule(f"lowrank.{site.key}"), "down")
    for site in kept:
        assert compact.get_submodule(f"lowrank.{site.key}.down").out_features < site.break_even_rank
    decisions = {row.name: row.decision for row in tunecomp_fx.get_report(compact).sites}
    assert {decisions[s.name] for s in past} == {"dense"} and {decisions[s.name] for s in kept} == {"rank"}


@pytest.mark.parametrize("user_leaves", [False, True], ids=["torch-only", "user-leaves"])
def test_compact_model_pickles_and_loads_without_the_package(tmp_path, monkeypatch, user_leaves):
    """The compact model holds torch modules and ops, and the modules and functions that capture
    kept opaque (user leaves and wrapped functions) as the user's own: it loads wherever torch
    and those can be imported."""
    torch.manual_seed(0)
    model = (UserLeaves if user_leaves else MLP)().eval()
    if user_leaves:
        monkeypatch.setitem(LEAF_MODULES, Gain, "test: a user's leaf module")
        monkeypatch.setitem(WRAPPED_FUNCTIONS, soft_clip, "test: a user's wrapped function")
    x = torch.randn(5, 64)
    compact = tunecomp_fx.compress(model, (x,), ratio=0.4)
    modules = {_package(type(m)) for m in compact.modules()}
    functions = {_package(n.target) for n in compact.graph.nodes if n.op == "call_function"}
    assert modules == {"torch"} | ({"tests"} if user_leaves else set())
    assert functions <= {"torch", "_operator"} | ({"tests"} if user_leaves else set())
    assert any(n.target is soft_clip for n in compact.graph.nodes) == user_leaves
    torch.save(compact, tmp_path / "compact.pt")
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        torch.save(compact(x), tmp_path / "expected.pt")
    script = (
        "import sys, torch\n"
        "sys.modules['tunecomp_fx'] = None  # any import of the package now fails\n"
        f"sys.path.insert(0, r'{ROOT}')  # the user's code: tests.models\n"
        f"m = torch.load(r'{tmp_path}/compact.pt', weights_only=False)\n"
        f"x = torch.load(r'{tmp_path}/x.pt'); e = torch.load(r'{tmp_path}/expected.pt')\n"
        "torch.testing.assert_close(m(x), e)\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
    assert b"tunecomp_fx" not in pickle.dumps(compact.meta)


def _package(thing: object) -> str:
    """The top-level package a class or function comes from."""
    return thing.__module__.split(".")[0]


def test_user_model_is_left_untouched():
    torch.manual_seed(0)
    model = MLP().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tunecomp_fx.compress(model, (torch.randn(8, 64),), ratio=0.5)
    assert all(p.requires_grad for p in model.parameters())
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], atol=0, rtol=0)


def test_invariant_checks_run_after_every_pass_when_asked():
    prepared = tunecomp_fx.prepare(MLP().eval(), (torch.randn(8, 64),), ratio=0.5, check_numerics=True)
    log = prepared.meta["tunecomp"].context.log
    assert [r.name for r in log] == ["capture", "transpose_input_major_weights", "fold_sliced_weights", "fold_constant_biases", "find_linear_sites", "calibrate_input_covariance", "decompose_weights",
                                     "allocate_ranks", "insert_teacher_student", "initialize_students"]
    inserted = next(r for r in log if r.name == "insert_teacher_student")
    assert len(inserted.added) == 3 * 5 and not inserted.removed  # down, mask, mul, up, blend per site


class _UnusedBranch(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(32, 32)
        self.unused = nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.unused(x)  # computed and thrown away
        return self.used(x)


def test_site_whose_output_is_unused_is_removed_and_reported():
    torch.manual_seed(0)
    model = _UnusedBranch().eval()
    x = torch.randn(4, 32)
    compact = tunecomp_fx.compress(model, (x,), ratio=0.5)
    rows = {row.name: row for row in tunecomp_fx.get_report(compact).sites}
    assert rows["unused"].decision == "removed" and rows["unused"].params_after == 0
    assert rows["used"].decision == "rank"
    assert not hasattr(compact.get_submodule("lowrank"), "unused")
