"""Checks shared by the structured-pruning tests."""

from __future__ import annotations

import torch

import tunecomp_fx


def finalize_from_student_path(prepared: torch.fx.GraphModule, *inputs: torch.Tensor) -> tuple[torch.fx.GraphModule, torch.Tensor]:
    """Blend to the students alone, record what they compute on `inputs`, and finalize; the compact
    model must compute the same (1e-5: finalize re-associates products)."""
    tunecomp_fx.set_blend(prepared, 0.0)
    with torch.no_grad():
        student_path = prepared(*inputs)
    compact = tunecomp_fx.finalize(prepared)
    with torch.no_grad():
        torch.testing.assert_close(compact(*inputs), student_path, rtol=1e-5, atol=1e-5)
    return compact, student_path
