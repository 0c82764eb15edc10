"""Capture keeps the batch dimension dynamic on the torch.export path even when the example inputs
hold a single example (torch.export would otherwise specialize the size-1 batch to a constant), and
says so when a model's dim 0 cannot vary."""

from __future__ import annotations

import torch
from torch import nn

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


class SqueezesItsBatch(nn.Module):
    """Dim 0 must be 1 here (squeeze then a fixed reshape): capture keeps it fixed, and says so."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] > 8:  # keeps symbolic tracing out
            x = x * 2
        return self.fc(x.squeeze(0).reshape(4, 16))


def test_batch_that_cannot_vary_is_captured_fixed_and_reported():
    torch.manual_seed(0)
    x = torch.randn(1, 4, 16)
    compact = tunecomp_fx.compress(SqueezesItsBatch().eval(), (x,), ratio=0.4)
    report = tunecomp_fx.get_report(compact)
    assert report.capture_path == "torch.export"
    assert "batch size of the example inputs fixed" in report.capture_reason
    assert compact(x).shape == (4, 32)
