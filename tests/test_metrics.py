"""MAC counting: every matmul of a forward pass, whichever attention kernel runs it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from tunecomp_fx.metrics import count_macs


class SelfAttention(nn.Module):
    def __init__(self, width: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        q, k, v = (t.view(batch, tokens, self.heads, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, tokens, width)


def test_counts_attention_scores_and_context_on_cpu() -> None:
    x = torch.randn(2, 10, 32)
    linear = 2 * 10 * 32 * 96
    attention = 2 * 4 * 10 * 10 * (8 + 8)  # q @ k^T and softmax @ v, per batch element and head
    assert count_macs(SelfAttention(), (x,)) == linear + attention


def test_fused_cpu_kernel_counts_what_the_math_kernel_counts() -> None:
    """The math kernel runs plain matmuls, which torch's counter knows; the fused CPU kernel must
    give the same count, or MACs would depend on which kernel the device picks."""
    model, x = SelfAttention(), torch.randn(3, 7, 32)
    with sdpa_kernel(SDPBackend.MATH):
        math_count = count_macs(model, (x,))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        fused_count = count_macs(model, (x,))
    assert fused_count == math_count
