"""The compact model exports to ONNX and ONNX Runtime agrees with PyTorch at two batch sizes, for
both capture paths."""

from __future__ import annotations

import onnx
import pytest
import torch

import tunecomp_fx
from tunecomp_fx.export import to_onnx
from tests.models import AttentionBlock, ShapeBranching

ORT_ATOL = 1e-4  # float32 kernels in a different order than PyTorch's


@pytest.mark.parametrize("model_factory, x", [(AttentionBlock, torch.randn(3, 10, 64)), (ShapeBranching, torch.randn(4, 32))])
def test_compact_model_matches_in_onnx_runtime_at_two_batch_sizes(tmp_path, model_factory, x):
    torch.manual_seed(0)
    compact = tunecomp_fx.compress(model_factory().eval(), (x,), ratio=0.5)
    result = to_onnx(compact, (x,), tmp_path / "compact.onnx", atol=ORT_ATOL)
    assert len(result.max_errors) == 2  # the example batch and a second batch size
    assert all(error <= ORT_ATOL for error in result.max_errors.values())
    graph = onnx.load(str(tmp_path / "compact.onnx")).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a symbolic batch axis
    matmuls = [n for n in graph.node if n.op_type in ("MatMul", "Gemm")]
    sites = [r for r in tunecomp_fx.get_report(compact).sites if r.rank is not None]
    assert len(matmuls) >= 2 * len(sites)  # down and up per factorized site
