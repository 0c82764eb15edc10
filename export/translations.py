"""tunecomp's own ONNX translations of aten ops, which `to_onnx` hands to the torch.export-based exporter
in place of onnxscript's (each file says what it does better and which cases it leaves to onnxscript)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .attention import scaled_dot_product_attention
from .embedding_bag import embedding_bag
from .linear import linear

TRANSLATIONS: dict[Callable[..., Any], Callable[..., Any]] = {
    torch.ops.aten.scaled_dot_product_attention.default: scaled_dot_product_attention,
    torch.ops.aten.linear.default: linear,
    torch.ops.aten.embedding_bag.default: embedding_bag,
    torch.ops.aten.embedding_bag.padding_idx: embedding_bag,
    torch.ops.aten._embedding_bag.default: embedding_bag,
    torch.ops.aten._embedding_bag_forward_only.default: embedding_bag,
}
