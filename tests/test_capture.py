"""Capture keeps the batch dimension dynamic on the torch.export path even when the example inputs
hold a single example (torch.export would otherwise specialize the size-1 batch to a constant)."""

from __future__ import annotations

import torch

import tunecomp_fx
from tests.models import AttentionBlock


class BranchingAttention(AttentionBlock):
    """Python control flow on a shape sends capture down the torch.export path; the block reshapes
    by its batch size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] > 8:
            x = x * 2
        return super().forward(x)


def test_batch_of_one_on_the_export_path_still_gives_a_dynamic_batch():
    torch.manual_seed(0)
    model = BranchingAttention().eval()
    prepared = tunecomp_fx.prepare(model, (torch.randn(1, 10, 64),), ratio=0.4)
    assert prepared.meta["tunecomp"].capture_path == "torch.export"
    x = torch.randn(3, 10, 64)
    with torch.no_grad():
        torch.testing.assert_close(prepared(x), model(x), atol=1e-6, rtol=0)
        tunecomp_fx.set_blend(prepared, 0.0)
        expected = prepared(x)
        compact = tunecomp_fx.finalize(prepared)
        torch.testing.assert_close(compact(x), expected, atol=1e-5, rtol=1e-5)

