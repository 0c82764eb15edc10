"""Gradual width pruning (width_slack): the students of a pruned width start with more neurons (heads)
than the target, the down site's student reads them through a width mask, the rank pruner switches
the least important groups off as the blend progresses, and finalize slices them away."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from tests.graph_checks import finalize_from_student_path
from tests.models import SILENT_HEADS_KEPT, SILENT_HEADS_RATIO, AttentionBlock, HeadsBlock, silent_heads

import tunecomp_fx
from tunecomp_fx import StepHook
from tunecomp_fx.errors import ConfigError, PassError
from tunecomp_fx.metrics import count_parameters
from tunecomp_fx.pruning import RankPruner
from tunecomp_fx.sites import final_sites, student_nodes

ATTENTION = (F.scaled_dot_product_attention, torch.ops.aten.scaled_dot_product_attention.default)


def _context(prepared: torch.fx.GraphModule):  # noqa: ANN202
    return prepared.meta["tunecomp"].context


def _compressed_params(compact: torch.fx.GraphModule) -> tuple[int, int]:
    rows = tunecomp_fx.get_report(compact).sites
    return sum(row.params_after for row in rows), sum(row.params_before for row in rows)


def test_the_students_start_wider_and_the_down_student_reads_the_width_through_a_mask() -> None:
    torch.manual_seed(0)
    model, x = HeadsBlock().eval(), torch.randn(4, 10, 64)
    prepared = tunecomp_fx.prepare(model, x, 0.6, prune_heads=0.5, width_slack=1.0)

    [width] = _context(prepared).hidden_widths
    assert (len(width.kept), width.target) == (64, 32)  # all four heads to start with, two at the end
    roles = student_nodes(prepared)["out"]
    masked = roles["down"].args[0]
    assert masked is roles["width_masked"] and masked.target is operator.mul
    assert masked.args[1] is roles["width_mask"] and masked.args[0].op == "call_method"  # the copied head merge
    assert torch.equal(prepared.lowrank.out.width_mask, torch.ones(64))
    assert prepared.lowrank.query.up.out_features == 64 and prepared.lowrank.out.down.in_features == 64
    # the ranks were allocated for the target width: what finalize keeps fits the budget
    context = _context(prepared)
    final = final_sites(context.compressed_sites, context.hidden_widths)
    assert [site.out_features for site in final[:3]] == [32, 32, 32] and final[3].in_features == 32
    budget = 0.4 * sum(site.unpruned_params for site in final)
    assert sum(site.factorized_params(context.ranks[site.name].rank) for site in final) <= budget
    with torch.no_grad():
        assert torch.equal(prepared(x), model(x))  # alpha = 1: the teacher alone


def test_the_least_important_heads_are_switched_off_and_finalize_slices_them() -> None:
    model, x = silent_heads(), torch.randn(8, 10, 64)
    # the sites stay whole, so the compact model must equal the original
    prepared = tunecomp_fx.prepare(model, x, SILENT_HEADS_RATIO, prune_heads=0.5, width_slack=1.0)
    pruner = RankPruner(prepared, _context(prepared))
    assert prepared.lowrank.out.width_mask.data_ptr() in {mask.data_ptr() for mask in pruner.masks()}  # broadcast under DDP
    pruner.update(0.5)
    assert int(prepared.lowrank.out.width_mask.sum()) == 48  # halfway: three heads
    pruner.update(1.0)
    assert prepared.lowrank.out.width_mask.view(4, 16)[:, 0].tolist() == [1.0, 0.0, 1.0, 0.0]  # heads 1 and 3 are silent
    assert pruner.current_sites()[0].out_features == 32 and pruner.current_sites()[3].in_features == 32
    tunecomp_fx.set_blend(prepared, 0.0)
    compact = tunecomp_fx.finalize(prepared)
    with torch.no_grad():
        torch.testing.assert_close(compact(x), model(x), rtol=1e-5, atol=1e-5)
    assert count_parameters(compact) == SILENT_HEADS_KEPT + 2 * 64  # four sites and the layer norm
    assert not [n for n in compact.graph.nodes if n.op == "get_attr"]  # no mask left
    assert pruner.kept_params() == _compressed_params(compact)[0]  # the pruner counts what finalize keeps


@pytest.mark.parametrize("literal_heads", [True, False], ids=["symbolic_trace", "torch_export"])
def test_heads_are_dropped_during_the_blend_and_the_compact_model_computes_the_student_path(literal_heads: bool) -> None:
    torch.manual_seed(0)
    model = HeadsBlock(literal_heads=literal_heads).train()
    data = [(torch.randn(8, 10, 64), torch.randn(8, 10, 64)) for _ in range(3)]
    prepared = tunecomp_fx.prepare(model, data[0][0], 0.6, calib=[x for x, _ in data], prune_heads=0.5, width_slack=1.0, rank_slack=0.5)
    hook = StepHook(prepared, steps=6, blend_steps=4)
    optimizer = torch.optim.AdamW([p for p in prepared.parameters() if p.requires_grad], lr=1e-3)
    heads = []
    for step in range(6):
        inputs, targets = data[step % 3]
        (F.mse_loss(prepared(inputs), targets) + hook.distill_loss()).backward()
        optimizer.step()
        optimizer.zero_grad()
        hook.step()
        heads.append(int(prepared.lowrank.out.width_mask.sum()) // 16)
    assert heads == [4, 3, 3, 2, 2, 2]  # 4 + ceil(2 * (1 - progress)) - 2 heads after each step, the target at the blend's end
    assert hook.teacher_removed
    assert hook.pruner.kept_params() <= hook.pruner.budget
    prepared.eval()
    x = torch.randn(4, 10, 64)
    compact, student_path = finalize_from_student_path(prepared, x)
    with torch.no_grad():
        torch.testing.assert_close(compact(x[:2]), student_path[:2], rtol=1e-5, atol=1e-5)  # another batch size
    assert compact.lowrank.query.up.out_features == 32
    assert len([n for n in compact.graph.nodes if n.target in ATTENTION]) == 1
    rows = {row.name: row for row in tunecomp_fx.get_report(compact).sites}
    assert rows["out"].reason.startswith("32 of 64 input neurons kept (2 of 4 heads)")
    kept, total = _compressed_params(compact)
    assert kept <= 0.4 * total and kept == count_parameters(compact.lowrank)


def test_neurons_are_dropped_gradually_with_global_rank_selection() -> None:
    torch.manual_seed(0)
    model, x = AttentionBlock().eval(), torch.randn(4, 16, 64)
    prepared = tunecomp_fx.prepare(model, x, 0.6, prune_neurons=0.5, width_slack=0.5, rank_slack=0.5)
    [width] = _context(prepared).hidden_widths
    assert (len(width.kept), width.target) == (192, 128)
    pruner = RankPruner(prepared, _context(prepared), "global")
    kept = []
    for progress in (0.25, 0.5, 0.75, 1.0):
        pruner.update(progress)
        kept.append(int(prepared.lowrank.fc2.width_mask.sum()))
        # the ranks follow the schedule counted at the target widths; the wider students hold more meanwhile
        planned = pruner.kept_params(sites=pruner.final_sites)
        assert planned <= pruner.start_params - (pruner.start_params - pruner.budget) * progress < pruner.kept_params() or progress == 1.0
    assert kept == [176, 160, 144, 128]
    compact, _ = finalize_from_student_path(prepared, x)
    assert compact.lowrank.fc1.up.out_features == 128
    # the budget is met, and not undershot by more than one rank of the widest site (qkv: 64 + 192)
    assert pruner.budget - 256 < pruner.kept_params() == _compressed_params(compact)[0] <= pruner.budget


def test_in_training_the_groups_are_ranked_by_what_the_down_student_reads() -> None:
    torch.manual_seed(0)
    model, x = HeadsBlock().train(), torch.randn(4, 10, 64)
    prepared = tunecomp_fx.prepare(model, x, 0.6, prune_heads=0.5, width_slack=1.0)
    hook = StepHook(prepared, steps=4)
    [width] = hook.pruner.widths
    calibrated = _context(prepared).width_covariances["out"]
    assert torch.equal(width.covariance, calibrated) and width.covariance is not calibrated
    read = []
    handle = prepared.lowrank.out.down.register_forward_pre_hook(lambda module, args: read.append(args[0].detach()))
    with torch.no_grad():
        prepared(x)  # evaluation: not tracked
    assert torch.equal(width.covariance, calibrated)
    inputs = torch.randn(4, 10, 64)
    prepared(inputs)
    heads = read[-1].reshape(-1, 4, 16)
    blocks = torch.einsum("ngi,ngj->gij", heads, heads) / heads.shape[0]
    torch.testing.assert_close(width.covariance, 0.9 * calibrated + 0.1 * blocks, rtol=1e-5, atol=1e-6)
    hook.close()
    prepared(inputs)  # the hook's handles include the tracking
    torch.testing.assert_close(width.covariance, 0.9 * calibrated + 0.1 * blocks, rtol=1e-5, atol=1e-6)
    handle.remove()


def test_the_widths_are_tracked_until_pruning_ends_even_after_the_teachers_leave() -> None:
    torch.manual_seed(0)
    model = HeadsBlock().train()
    prepared = tunecomp_fx.prepare(model, torch.randn(4, 10, 64), 0.6, prune_heads=0.5, width_slack=1.0)
    hook = StepHook(prepared, steps=6, blend_steps=2, prune_steps=4)
    [width] = hook.pruner.widths
    for step in (1, 2, 3, 4):
        hook.step()
        before = width.covariance.clone()
        prepared(torch.randn(4, 10, 64))
        assert hook.teacher_removed == (step >= 2)
        assert torch.equal(width.covariance, before) == (step >= 4), step  # tracked while groups may still drop
    assert int(width.group_mask.count_nonzero()) == width.target


def test_training_free_compression_prunes_the_slack_at_once() -> None:
    torch.manual_seed(0)
    model, x = HeadsBlock().eval(), torch.randn(4, 10, 64)
    compact = tunecomp_fx.compress(model, x, 0.6, prune_heads=0.5, width_slack=1.0, rank_slack=0.5)
    kept, total = _compressed_params(compact)
    assert kept <= 0.4 * total
    assert compact.lowrank.query.up.out_features == 32


class ConvFFN(nn.Module):
    """1x1 convolutions around an activation: a neuron width in conv layout (channels on dim 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.act, self.down = nn.Conv2d(16, 64, 1), nn.ReLU(), nn.Conv2d(64, 16, 1)
        self.mix = nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(self.down(self.act(self.up(x))))


def test_finalize_refuses_the_slack_a_conv_width_still_holds_until_prune_slack_cuts_it() -> None:
    torch.manual_seed(0)
    model, x = ConvFFN().eval(), torch.randn(4, 16, 8, 8)
    prepared = tunecomp_fx.prepare(model, x, 0.7, prune_neurons=0.5, width_slack=1.0)
    assert prepared.lowrank.up.up.out_channels == 64 and int(prepared.lowrank.down.width_mask.count_nonzero()) == 64
    tunecomp_fx.set_blend(prepared, 0.0)  # the blend "ended" without a run to prune the slack over
    with pytest.raises(PassError, match=r"'eliminate_pruned_ranks' cannot run: the hidden widths read by sites down keep more"):
        tunecomp_fx.finalize(prepared)
    tunecomp_fx.prune_slack(prepared)
    assert int(prepared.lowrank.down.width_mask.count_nonzero()) == 32
    compact, _ = finalize_from_student_path(prepared, x)
    # what the students keep is what a width cut at prepare keeps: 32 channels, the same parameters
    assert compact.lowrank.up.up.out_channels == 32 and isinstance(compact.lowrank.up.up, nn.Conv2d)
    rows = {row.name: row for row in tunecomp_fx.get_report(compact).sites}
    assert rows["up"].reason.startswith("32 of 64 output neurons kept")
    cut_at_prepare = tunecomp_fx.compress(model, x, 0.7, prune_neurons=0.5)
    assert count_parameters(compact) == count_parameters(cut_at_prepare) < count_parameters(model)
    kept, total = _compressed_params(compact)
    assert kept <= 0.3 * total


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"width_slack": 0.5}, r"width_slack=0.5 starts pruned widths wider, but no width is pruned"),
        ({"width_slack": -1.0, "prune_neurons": 0.5}, r"width_slack must be a number >= 0"),
    ],
)
def test_bad_width_slack_is_a_config_error(options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        tunecomp_fx.CompressionConfig(**options)
