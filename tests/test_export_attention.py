"""The exporter's translation of scaled_dot_product_attention (export/attention.py): the plain 4-D
node pattern, which ONNX Runtime folds into one FusedMatMul for the scores, the same numbers as
PyTorch (float32, atol 1e-5), and onnxscript's translation for the cases it leaves alone.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tunecomp_fx.export import cpu_session, to_onnx


class Attention(nn.Module):
    """SDPA over given heads, with the mask (if any) made as `kind` says."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        if self.kind == "bool_mask":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=keep > 0)
        if self.kind == "float_mask":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=keep.log())  # 0 where kept, -inf where padded
        if self.kind == "scale":
            return F.scaled_dot_product_attention(q, k, v, scale=0.3)
        if self.kind == "causal":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        assert self.kind == "grouped_query"
        return F.scaled_dot_product_attention(q, k[:, :2], v[:, :2], enable_gqa=True)


def heads_and_padding() -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 6, 8, generator=generator) for _ in range(3))
    keep = torch.ones(2, 1, 1, 6)
    keep[1, ..., 4:] = 0  # the second sequence is padded after 4 tokens
    return q, k, v, keep


def heads_and_a_query_that_sees_nothing() -> tuple[torch.Tensor, ...]:
    q, k, v, keep = heads_and_padding()
    keep = keep.expand(2, 1, 6, 6).clone()
    keep[1, 0, 5] = 0  # the second sequence's last query may attend to no key
    return q, k, v, keep


def export(kind: str, folder: Path, inputs: tuple[torch.Tensor, ...] | None = None) -> tuple[Path, onnx.GraphProto]:
    path = folder / f"{kind}.onnx"
    inputs = inputs or heads_and_padding()
    to_onnx(Attention(kind), inputs, path)
    session = cpu_session(path)
    feed = {name: tensor.numpy() for name, tensor in zip(["q", "k", "v", "keep"], inputs) if name in {i.name for i in session.get_inputs()}}
    with torch.no_grad():
        expected = Attention(kind)(*inputs).numpy()
    np.testing.assert_allclose(session.run(None, feed)[0], expected, atol=1e-5, rtol=0)
    return path, onnx.load(str(path)).graph


@pytest.mark.parametrize("kind", ["bool_mask", "float_mask", "scale"])
def test_attention_exports_as_scaled_scores_softmax_and_values(kind, tmp_path):
    _, graph = export(kind, tmp_path)
    ops = Counter(node.op_type for node in graph.node)
    boolean = kind == "bool_mask"
    assert ops["MatMul"] == 2 and ops["Transpose"] == 1 and ops["Softmax"] == 1
    assert not {"IsNaN", "Reshape", "Shape", "Slice", "Concat"} & set(ops), ops
    transpose = next(node for node in graph.node if node.op_type == "Transpose")
    assert list(transpose.attribute[0].ints) == [0, 1, 3, 2]  # the key's last two axes, nothing else
    assert ops["Where"] == boolean  # a Boolean mask becomes 0 / the float minimum ...
    assert ops["ReduceMax"] == boolean and ops["Mul"] == 1 + boolean  # ... and zeros where a query sees no key


def test_a_query_that_may_attend_to_no_key_gets_zeros_as_in_pytorch(tmp_path):
    inputs = heads_and_a_query_that_sees_nothing()
    with torch.no_grad():
        assert not Attention("bool_mask")(*inputs)[1, :, 5].any()  # what PyTorch does
    export("bool_mask", tmp_path, inputs)  # ONNX Runtime checked against PyTorch there


def test_onnx_runtime_folds_scale_and_key_transpose_into_one_matmul(tmp_path):
    path, _ = export("bool_mask", tmp_path)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    cpu_session(path, options=options)
    optimized = onnx.load(options.optimized_model_filepath).graph
    ops = Counter(node.op_type for node in optimized.node)
    assert ops["FusedMatMul"] == 1 and ops["MatMul"] == 1 and "Transpose" not in ops and ops["Mul"] == 1, ops
    scores = next(node for node in optimized.node if node.op_type == "FusedMatMul")
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in scores.attribute}
    assert attributes["transB"] == 1 and attributes["alpha"] == pytest.approx(8**-0.5)


@pytest.mark.parametrize("kind", ["causal", "grouped_query"])
def test_cases_the_plain_form_leaves_alone_export_through_onnxscript(kind, tmp_path):
    _, graph = export(kind, tmp_path)  # numbers checked against PyTorch there
    ops = Counter(node.op_type for node in graph.node)
    assert ops["Reshape"] >= 2, ops  # onnxscript's rank-generic key transpose


class TwoBlocksOneMask(nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        mask = keep > 0
        first = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return F.scaled_dot_product_attention(2 * first, k, first, attn_mask=mask)


def test_blocks_sharing_a_mask_turn_it_into_scores_and_zeros_once(tmp_path):
    path = tmp_path / "two.onnx"
    to_onnx(TwoBlocksOneMask(), heads_and_a_query_that_sees_nothing(), path)  # checked against PyTorch
    ops = Counter(node.op_type for node in onnx.load(str(path)).graph.node)
    assert ops["Softmax"] == 2 and ops["Where"] == 1 and ops["ReduceMax"] == 1, ops
