"""An ONNX translation of `embedding_bag` in modes sum and mean without a loop over the bags.

onnxscript translates aten's embedding_bag as an ONNX Loop that slices, reduces and appends one bag at
a time to a sequence, and with a padding index as a second Loop inside it over every id, so ONNX
Runtime's time grows with the number of bags and ids through interpreter steps. This translation
gathers every id's row at once and adds each into its bag with one ScatterND (reduction "add"): the
bag of each id is a running count of the offsets at or before it. Padding ids are weighted 0 (and
left out of a mean's count), empty bags give zeros, and with `include_last_offset` the ids from the
last offset on belong to no bag, as in PyTorch. The other outputs are aten's forward values: each
id's bag, and (mean) each bag's count, which aten returns as bag sizes and max indices alike ((sum)
zeros). Mode max and indices of other ranks keep onnxscript's translation.
"""

from __future__ import annotations

from typing import Any

from onnxscript import ir
from onnxscript import opset20 as op
from onnxscript.function_libs.torch_lib.ops.core import aten_embedding_bag_padding_idx

Value = Any  # an onnxscript value while the exporter traces the translation

_SUM, _MEAN = 0, 1


def embedding_bag(
    weight: Value,
    indices: Value,
    offsets: Value,
    scale_grad_by_freq: bool = False,
    mode: int = _SUM,
    sparse: bool = False,
    per_sample_weights: Value | None = None,
    include_last_offset: bool = False,
    padding_idx: int | None = None,
) -> tuple[Value, Value, Value, Value]:
    padding_idx = None if padding_idx == -1 else padding_idx  # aten's -1: none (F.embedding_bag makes a negative row positive)
    one_dim = indices.shape is not None and len(indices.shape) == 1 and weight.shape is not None and len(weight.shape) == 2
    if mode not in (_SUM, _MEAN) or not one_dim:
        return aten_embedding_bag_padding_idx(
            weight, indices, offsets, scale_grad_by_freq, mode, sparse, per_sample_weights, include_last_offset, padding_idx
        )
    dtype = weight.dtype

    def filled(value: float, shape: Value) -> Value:
        return op.Expand(op.Constant(value=ir.tensor([value], dtype=dtype)), shape)

    zero, one = op.Constant(value_ints=[0]), op.Constant(value_ints=[1])
    rows = op.Gather(weight, indices, axis=0)
    ids = op.Shape(indices)
    padding = None if padding_idx is None else op.CastLike(op.Constant(value_int=padding_idx), indices)  # int32 ids too
    kept = None if padding is None else op.Cast(op.Not(op.Equal(indices, padding)), to=dtype)
    scale = kept if per_sample_weights is None else (per_sample_weights if kept is None else op.Mul(per_sample_weights, kept))
    if scale is not None:
        rows = op.Mul(rows, op.Unsqueeze(scale, one))
    # each id's bag: how many offsets are at or before it, less one; with include_last_offset the
    # last offset opens a bag of the ids that belong to none, sliced off at the end
    slots = op.Shape(offsets)
    opened = op.ScatterElements(op.Expand(zero, op.Add(ids, one)), offsets, op.Expand(one, slots), axis=0, reduction="add")
    bag_of_id = op.Sub(op.CumSum(op.Slice(opened, zero, ids), op.Constant(value_int=0)), one)
    at_bag = op.Unsqueeze(bag_of_id, one)
    bags = op.Sub(slots, one) if include_last_offset else slots
    sums = op.Slice(op.ScatterND(filled(0.0, op.Concat(slots, op.Shape(weight, start=1), axis=0)), at_bag, rows, reduction="add"), zero, bags)
    if mode == _SUM:
        sizes = op.Expand(zero, bags)
        return sums, bag_of_id, sizes, sizes
    counts = op.Slice(op.ScatterND(filled(0.0, slots), at_bag, filled(1.0, ids) if kept is None else kept, reduction="add"), zero, bags)
    means = op.Div(sums, op.Unsqueeze(op.Max(counts, op.Constant(value=ir.tensor([1.0], dtype=dtype))), one))
    sizes = op.Cast(counts, to=ir.DataType.INT64)
    return means, bag_of_id, sizes, sizes
