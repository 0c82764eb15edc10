"""Parameter and MAC counting, measured on real forward passes."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from tunecomp_fx.inputs import Inputs, call_model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, inputs: Inputs) -> int:
    """Multiply-accumulates of one forward pass on `inputs` (matmuls and convolutions)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        call_model(model, inputs)
    return counter.get_total_flops() // 2
