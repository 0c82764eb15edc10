"""Parameter and MAC counting, measured on real forward passes."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from tunecomp_fx.inputs import Inputs, call_model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _cpu_attention_flops(query: torch.Size, key: torch.Size, value: torch.Size, *args: Any, **kwargs: Any) -> int:
    return sdpa_flop_count(query, key, value)  # torch's own formula for its CUDA attention kernels


# torch's counter knows the CUDA attention kernels but not the one SDPA dispatches to on the CPU, so
# without this the attention's own matmuls vanish from CPU counts and MACs depend on the device.
_CPU_ATTENTION = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}


def count_macs(model: nn.Module, inputs: Inputs) -> int:
    """Multiply-accumulates of one forward pass on `inputs`: matmuls (linear layers and attention's
    scores and context, on any device) and convolutions."""
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION) as counter:
        call_model(model, inputs)
    return counter.get_total_flops() // 2
