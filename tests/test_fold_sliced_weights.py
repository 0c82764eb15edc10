"""fold_sliced_weights: nn.MultiheadAttention's in-projection as torch.export records it when query,
key and value are not one tensor (in_proj_weight split into query and key/value rows for
cross-attention, or chunked into query, key and value) becomes one site per block of rows."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from tests.graph_checks import finalize_from_student_path
from tests.models import CrossAttention
from torch import nn

import tunecomp_fx
from tunecomp_fx.export import to_onnx
from tunecomp_fx.metrics import count_parameters

aten = torch.ops.aten


@pytest.mark.parametrize(("chunked", "blocks"), [(False, {"_0": 64, "_1": 128}), (True, {"_0": 64, "_1": 64, "_2": 64})], ids=["split", "chunked"])
def test_each_block_of_rows_of_the_in_projection_is_a_site(chunked: bool, blocks: dict[str, int], tmp_path) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    model, inputs = CrossAttention(chunked).eval(), (torch.randn(2, 10, 64), torch.randn(2, 10, 64))
    prepared = tunecomp_fx.prepare(model, inputs, 0.4)

    sites = {site.name: site for site in prepared.meta["tunecomp"].context.sites}
    assert {name: (site.status, site.in_features, site.out_features) for name, site in sites.items()} == {
        **{f"attn.in_proj_weight{suffix}": ("compress", 64, rows) for suffix, rows in blocks.items()},
        "attn.out_proj": ("compress", 64, 64),
    }
    # no linear reads a block of a parameter any more: each block is a parameter of its own, its bias folded
    teachers = [n for n in prepared.graph.nodes if n.target is aten.linear.default and n.meta.get("tunecomp") is None]
    assert all(n.args[1].op == "get_attr" and n.args[2].op == "get_attr" for n in teachers)
    assert not [n for n in prepared.graph.nodes if n.target is operator.getitem and n.args[0].target in (aten.split_with_sizes.default, aten.chunk.default)]
    torch.testing.assert_close(prepared.attn.in_proj_weight_0, model.attn.in_proj_weight[:64], rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(prepared(*inputs), model(*inputs), rtol=1e-5, atol=1e-6)  # alpha = 1: the teacher alone

    compact, _ = finalize_from_student_path(prepared, *inputs)
    rows = tunecomp_fx.get_report(compact).sites
    assert count_parameters(compact) == sum(row.params_after for row in rows)  # in_proj_weight went with its last reader
    assert count_parameters(compact) <= 0.6 * count_parameters(model)
    result = to_onnx(compact, inputs, tmp_path / "attention.onnx")
    assert all(error < 1e-4 for error in result.max_errors.values())


@pytest.mark.parametrize("reused", [False, True], ids=["blocks_only", "read_whole_too"])
def test_a_parameter_split_by_the_model_itself_is_folded_unless_it_is_read_otherwise_too(reused: bool) -> None:
    # symbolic tracing records Tensor.split; read whole as well, blocks would add parameters, not remove them
    class Split(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(96, 32))
            self.head = nn.Linear(96, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            query, key = self.weight.split([64, 32])
            hidden = torch.cat([F.linear(x, query), F.linear(x, key)], dim=-1)
            return self.head(hidden + self.weight.sum() if reused else hidden)

    model, x = Split().eval(), torch.randn(4, 32)
    prepared = tunecomp_fx.prepare(model, x, 0.3)
    assert prepared.meta["tunecomp"].capture_path == "symbolic_trace"
    names = {site.name for site in prepared.meta["tunecomp"].context.sites}
    assert names == ({"head"} if reused else {"weight_0", "weight_1", "head"})
    with torch.no_grad():
        torch.testing.assert_close(prepared(x), model(x), rtol=1e-5, atol=1e-5)
