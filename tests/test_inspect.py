"""Graph inspection: the per-pass log, graph summaries, networkx/GraphML/DOT export, site printouts."""

from __future__ import annotations

from pathlib import Path

import networkx as nx
import pytest
import torch
import torch.nn.functional as F
from torch import fx

import tunecomp_fx
from tests.cli_models import TwoLayer
from tunecomp_fx.inspect import (
    format_pass_log,
    graph_summary,
    pass_log,
    site_subgraph,
    to_networkx,
    write_dot,
    write_graphml,
)


class Branchy(TwoLayer):
    """TwoLayer with a shape test in forward: symbolic tracing fails, torch.export captures it
    (so every site is an aten.linear over get_attr weights)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if h.shape[-1] > 1:
            h = F.relu(h)
        return self.fc2(h)


def _prepare_and_finalize(model: torch.nn.Module) -> tuple[fx.GraphModule, fx.GraphModule]:
    torch.manual_seed(0)
    prepared = tunecomp_fx.prepare(model, (torch.randn(4, 64),), ratio=0.5)
    log_at_prepare = pass_log(prepared)
    tunecomp_fx.set_blend(prepared, 0.0)
    compact = tunecomp_fx.finalize(prepared)
    assert pass_log(prepared) == pass_log(compact)[: len(pass_log(prepared))]
    assert [r.name for r in log_at_prepare][-1] == "initialize_students"
    return prepared, compact


STUDENT_NODES = {f"lowrank_{k}_{role}" for k in ("fc1", "fc2") for role in ("down", "rank_mask", "up", "blend")} | {"mul", "mul_1"}


@pytest.mark.parametrize(
    ("model", "capture_path", "teachers", "dead_weights"),
    [
        (TwoLayer(), "symbolic_trace", {"fc1", "fc2"}, set()),
        (Branchy(), "torch.export", {"linear", "linear_1"}, {"fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"}),
    ],
    ids=["call_module", "aten.linear"],
)
def test_pass_log_records_the_nodes_each_pass_added_and_removed(model, capture_path, teachers, dead_weights) -> None:
    _, compact = _prepare_and_finalize(model)
    assert tunecomp_fx.get_report(compact).capture_path == capture_path
    log = {record.name: record for record in pass_log(compact)}
    assert list(log) == [
        "capture", "transpose_input_major_weights", "fold_sliced_weights", "fold_constant_biases", "find_linear_sites", "calibrate_input_covariance", "decompose_weights", "allocate_ranks",
        "insert_teacher_student", "initialize_students", "fold_blends", "fold_cores", "eliminate_pruned_ranks",
        "eliminate_pruned_neurons", "densify_past_break_even", "eliminate_dead_code",
    ]  # fmt: skip
    analysis = ("capture", "transpose_input_major_weights", "fold_sliced_weights", "fold_constant_biases", "find_linear_sites", "calibrate_input_covariance", "decompose_weights", "allocate_ranks", "initialize_students")
    for name in analysis + ("fold_cores", "eliminate_pruned_neurons", "densify_past_break_even"):
        assert (log[name].added, log[name].removed) == ((), ()), name
    # Five nodes per factorized site: down, rank mask, mask multiply, up, blend.
    assert set(log["insert_teacher_student"].added) == STUDENT_NODES and not log["insert_teacher_student"].removed
    assert set(log["fold_blends"].removed) == teachers | {"lowrank_fc1_blend", "lowrank_fc2_blend"}
    assert set(log["eliminate_pruned_ranks"].removed) == {"lowrank_fc1_rank_mask", "lowrank_fc2_rank_mask", "mul", "mul_1"}
    assert set(log["eliminate_dead_code"].removed) == dead_weights
    assert not any(log[name].added for name in ("fold_blends", "eliminate_pruned_ranks", "eliminate_dead_code"))
    table = format_pass_log(pass_log(compact), names=3)
    assert "insert_teacher_student         " in table and "+10" in table
    assert "insert_teacher_student + lowrank_fc1_blend, lowrank_fc1_down, lowrank_fc1_rank_mask ... and 7 more" in table


def test_pass_log_of_an_unknown_model_is_a_clear_error() -> None:
    with pytest.raises(tunecomp_fx.InputError, match="no pass log"):
        pass_log(fx.symbolic_trace(TwoLayer()))


def test_graph_summary_counts() -> None:
    prepared, compact = _prepare_and_finalize(TwoLayer())
    captured = fx.symbolic_trace(TwoLayer())
    assert graph_summary(captured) == {
        "nodes": 5, "placeholder": 1, "get_attr": 0, "call_module": 3, "call_function": 0, "call_method": 0,
        "output": 1, "linear maps": 2, "parameters": 64 * 96 + 96 + 96 * 10 + 10,
    }  # fmt: skip
    assert graph_summary(prepared)["nodes"] == 15 and graph_summary(prepared)["linear maps"] == 6
    assert graph_summary(compact)["nodes"] == 7 and graph_summary(compact)["linear maps"] == 4
    assert graph_summary(compact)["parameters"] == sum(p.numel() for p in compact.parameters())


def test_networkx_graphml_and_dot(tmp_path: Path) -> None:
    prepared, _ = _prepare_and_finalize(TwoLayer())
    graph = to_networkx(prepared)
    nodes = list(prepared.graph.nodes)
    assert list(graph.nodes) == [n.name for n in nodes]
    assert set(graph.edges) == {(i.name, n.name) for n in nodes for i in n.all_input_nodes}
    assert graph.nodes["lowrank_fc1_blend"] == {
        "op": "call_module", "target": "lowrank.fc1.blend", "order": 6, "module": "Blend", "site": "fc1", "role": "blend",
    }  # fmt: skip
    assert graph.nodes["fc1"]["role"] == "teacher"
    assert set(graph.predecessors("lowrank_fc1_blend")) == {"fc1", "lowrank_fc1_up"}

    read_back = nx.read_graphml(write_graphml(prepared, tmp_path / "prepared.graphml"))
    assert set(read_back.nodes) == set(graph.nodes) and set(read_back.edges) == set(graph.edges)
    assert read_back.nodes["mul"]["target"] == "_operator.mul"

    dot = write_dot(prepared, tmp_path / "prepared.dot").read_text()
    assert dot.startswith('digraph "TwoLayer" {') and dot.rstrip().endswith("}")
    assert dot.count(" -> ") == graph.number_of_edges()
    assert '"lowrank_fc1_blend" [label="lowrank_fc1_blend\\ncall_module: lowrank.fc1.blend", style=filled' in dot


def test_site_subgraph_printout() -> None:
    prepared, compact = _prepare_and_finalize(Branchy())
    text = site_subgraph(prepared, "fc1").splitlines()
    assert text[0] == "site fc1: aten.linear 64 -> 96, rank 16 (prepared model)"
    assert text[1] == "  in:  %x"
    assert [line.split()[0] for line in text[2:-1]] == [
        "%fc1_weight", "%fc1_bias", "%linear", "%lowrank_fc1_down", "%lowrank_fc1_rank_mask", "%mul", "%lowrank_fc1_up",
        "%lowrank_fc1_blend",
    ]  # fmt: skip
    assert "call_function aten.linear.default(%x, %fc1_weight, %fc1_bias)" in text[4] and "[teacher]" in text[4]
    assert text[5].endswith("[down]  Linear 64 -> 16, no bias")
    assert text[-1] == "  out: %lowrank_fc1_blend -> %relu"
    compact_text = site_subgraph(compact, "fc2").splitlines()
    assert compact_text[0] == "site fc2: aten.linear 96 -> 10, rank 8 (compact model)"
    assert [line.split()[0] for line in compact_text[2:-1]] == ["%lowrank_fc2_down", "%lowrank_fc2_up"]
    with pytest.raises(tunecomp_fx.InputError, match="no site named 'fc3'; sites include fc1, fc2"):
        site_subgraph(compact, "fc3")
