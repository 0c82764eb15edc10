"""An ONNX translation of `linear` over token sequences that ONNX Runtime runs as one Gemm with its bias.

onnxscript translates `linear` on an input of three or more dims (batch, tokens, features) as MatMul
then Add. ONNX Runtime fuses MatMul + Add into one Gemm only when the input is 2-D, or N-D with a fully
static shape, which an export with dynamic batch and sequence axes never has; so every biased linear
layer of a transformer paid a separate pass over its output for the bias. This translation flattens
the leading dims itself: Reshape to (-1, in_features), Gemm with the bias, Reshape back to the input's
leading dims (a Reshape is a view in ONNX Runtime). Unbiased and 2-D linears, other dtypes and shapes
not known at export keep onnxscript's translation.
"""

from __future__ import annotations

from typing import Any

from onnxscript import ir
from onnxscript import opset20 as op
from onnxscript.function_libs.torch_lib.ops.nn import aten_linear

Value = Any  # an onnxscript value while the exporter traces the translation

# ONNX Runtime's CPU Gemm kernel takes these; anything else goes through MatMul + Add.
GEMM_DTYPES = (ir.DataType.FLOAT, ir.DataType.DOUBLE)


def linear(input: Value, weight: Value, bias: Value | None = None) -> Value:
    sizes = tuple(weight.shape) if weight.shape is not None else ()
    static_weight = len(sizes) == 2 and all(isinstance(size, int) for size in sizes)
    token_input = input.shape is not None and len(input.shape) >= 3
    if bias is None or not static_weight or not token_input or input.dtype not in GEMM_DTYPES:
        return aten_linear(input, weight, bias)
    out_features, in_features = sizes
    tokens = op.Reshape(input, op.Constant(value_ints=[-1, in_features]))
    output = op.Gemm(tokens, weight, bias, transB=1)
    leading_dims = op.Shape(input, end=-1)
    # allowzero: an empty batch or sequence stays empty (by default a 0 in the shape copies the input's dim)
    return op.Reshape(output, op.Concat(leading_dims, op.Constant(value_ints=[out_features]), axis=0), allowzero=1)
