"""A leaner ONNX translation of `scaled_dot_product_attention` for the torch.export-based exporter.

onnxscript's own translation (torch_lib `aten_scaled_dot_product_attention`, which takes 4-D inputs
only) still transposes the key through a rank-generic Shape/Slice/Concat/Reshape/Transpose/Reshape
round trip, scales query and key separately, and, for Boolean masks, guards the softmax with an
IsNaN/Where that misses the case it is for: it fills masked scores with a finite minimum, so a query
that may attend to no key averages all values, where PyTorch gives zeros. That is 12 extra nodes per
attention block, and the reshape round trip stops ONNX Runtime from folding the transpose and the
scale into its FusedMatMul. This translation emits the plain 4-D form: Mul(query, scale) @
Transpose(key), mask added, Softmax, @ value, and for a Boolean mask zeros for the queries that
attend to no key, as PyTorch does. It leaves causal masks, grouped-query heads, dropout and symbolic
head sizes to onnxscript's translation.
"""

from __future__ import annotations

import math
from typing import Any

from onnxscript import ir
from onnxscript import opset20 as op
from onnxscript.function_libs.torch_lib.ops.nn import aten_scaled_dot_product_attention

Value = Any  # an onnxscript value while the exporter traces the translation


def scaled_dot_product_attention(
    query: Value,
    key: Value,
    value: Value,
    attn_mask: Value | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Value:
    four_dims = all(shape is not None and len(shape) == 4 for shape in (query.shape, key.shape))
    head_size = query.shape[-1] if four_dims else None
    if is_causal or enable_gqa or dropout_p != 0.0 or not isinstance(head_size, int):
        return aten_scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    dtype = query.dtype
    factor = op.Constant(value=ir.tensor(1.0 / math.sqrt(head_size) if scale is None else scale, dtype=dtype))
    scores = op.MatMul(op.Mul(query, factor), op.Transpose(key, perm=[0, 1, 3, 2]))
    if attn_mask is None or attn_mask.dtype != ir.DataType.BOOL:
        scores = scores if attn_mask is None else op.Add(scores, attn_mask)
        return op.MatMul(op.Softmax(scores, axis=-1), value)
    kept, masked = ir.tensor(0.0, dtype=dtype), ir.tensor(dtype.min, dtype=dtype)
    scores = op.Add(scores, op.Where(attn_mask, op.Constant(value=kept), op.Constant(value=masked)))
    # A query that may attend to no key gets zeros, as in PyTorch, where the softmax alone would
    # average all values. It is mask-sized and made from the mask alone: one for all layers sharing the mask.
    attends_any = op.ReduceMax(op.Cast(attn_mask, to=dtype), op.Constant(value_ints=[-1]), keepdims=1)
    return op.Mul(op.MatMul(op.Softmax(scores, axis=-1), value), attends_any)
