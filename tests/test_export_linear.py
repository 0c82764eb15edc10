"""The exporter's translation of `linear` (export/linear.py): a biased linear over token sequences
becomes Reshape, Gemm (bias included), Reshape, which ONNX Runtime keeps as one Gemm where onnxscript's
MatMul + Add left it a separate bias pass; the same numbers as PyTorch at other batch and sequence
sizes (to_onnx's check, atol 1e-4 + rtol 1e-3; float64 here, atol 1e-12); and onnxscript's
translation for the cases it leaves alone.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from tunecomp_fx.export import cpu_session, to_onnx

TOKENS = {"tokens": {1: "sequence"}}


class TokenLinear(nn.Module):
    def __init__(self, bias: bool = True, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 6, bias=bias, dtype=dtype)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.linear(tokens)


def export(model: nn.Module, tokens: torch.Tensor, path: Path, **kwargs) -> Counter:
    dims = TOKENS if tokens.dim() >= 3 else None
    to_onnx(model, (tokens,), path, dynamic_dims=dims, **kwargs)  # checked against PyTorch at two more sizes
    return Counter(node.op_type for node in onnx.load(str(path)).graph.node)


def test_a_biased_linear_over_tokens_exports_as_one_gemm_between_reshapes(tmp_path):
    ops = export(TokenLinear(), torch.randn(2, 5, 8), tmp_path / "linear.onnx")
    assert ops["Gemm"] == 1 and ops["Reshape"] == 2, ops
    assert "MatMul" not in ops and "Add" not in ops, ops
    gemm = next(node for node in onnx.load(str(tmp_path / "linear.onnx")).graph.node if node.op_type == "Gemm")
    assert len(gemm.input) == 3  # the bias is the Gemm's third input
    assert {a.name: onnx.helper.get_attribute_value(a) for a in gemm.attribute}["transB"] == 1


def test_onnx_runtime_runs_it_as_one_gemm_with_the_bias(tmp_path):
    path = tmp_path / "linear.onnx"
    export(TokenLinear(), torch.randn(2, 5, 8), path)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    cpu_session(path, options=options)
    ops = Counter(node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node)
    assert ops["Gemm"] == 1 and "Add" not in ops and "MatMul" not in ops, ops


@pytest.mark.parametrize("shape", [(1, 3, 8), (2, 3, 4, 8)], ids=["one_text", "four_dims"])
@pytest.mark.parametrize("resize", [(2, 4), (-1, 0), (0, -3)], ids=["larger", "empty_batch", "empty_sequence"])
def test_every_leading_shape_comes_back_as_pytorch_gives_it(shape, resize, tmp_path):
    model = TokenLinear()
    path = tmp_path / "linear.onnx"
    export(model, torch.randn(*shape), path)
    resized = torch.randn(shape[0] + resize[0], shape[1] + resize[1], *shape[2:])  # new batch and sequence sizes
    got = cpu_session(path).run(None, {"tokens": resized.numpy()})[0]
    with torch.no_grad():
        want = model(resized).numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_float64_goes_through_gemm_too(tmp_path):
    ops = export(TokenLinear(dtype=torch.float64), torch.randn(2, 5, 8, dtype=torch.float64), tmp_path / "f64.onnx", atol=1e-12, rtol=0)
    assert ops["Gemm"] == 1 and "Add" not in ops, ops


def test_an_unbiased_linear_over_tokens_keeps_one_matmul(tmp_path):
    ops = export(TokenLinear(bias=False), torch.randn(2, 5, 8), tmp_path / "unbiased.onnx")
    assert ops["MatMul"] == 1 and not {"Gemm", "Reshape", "Add"} & set(ops), ops


def test_a_biased_linear_on_a_matrix_is_one_gemm_without_reshapes(tmp_path):
    ops = export(TokenLinear(), torch.randn(4, 8), tmp_path / "matrix.onnx")
    assert ops["Gemm"] == 1 and "Reshape" not in ops, ops
