"""Transform: a parameter split along its rows into blocks that linear layers read as their weights,
and read in no other way, becomes one parameter per block, `<parameter>_<block index>` beside it, so
that each block is a site (fold_constant_biases then folds the bias blocks). torch.export records
nn.MultiheadAttention's in-projection so when query, key and value are not all the same tensor:
in_proj_weight split into query and key/value rows (cross-attention), or chunked into query, key and
value (key and value differ); without this pass those projections were no site at all. A parameter
read in any other way too stays whole (a block would then add parameters, not remove them). The
teacher is frozen during training, so a block is a constant for it; the parameter goes at finalize,
once nothing reads it."""

from __future__ import annotations

import operator

import torch
from torch import fx, nn

from tunecomp_fx.forms import LINEAR_FUNCTIONS, is_parameter
from tunecomp_fx.passes.fold_constant_biases import constant_value, erase_unused
from tunecomp_fx.pipeline import GraphPass, PassContext

aten = torch.ops.aten

# Each takes (tensor, sizes or count, dim=0): torch.export's, torch's and the Tensor methods'.
_SPLITS = {aten.split_with_sizes.default, aten.split.Tensor, aten.chunk.default, torch.split, torch.chunk, "split", "chunk"}


def _linear_weight_blocks(gm: fx.GraphModule, split: fx.Node) -> list[tuple[fx.Node, fx.Node]] | None:
    """[(block, the linear that reads it as its weight)] if `split` splits a parameter, read by it
    alone, along dim 0 into blocks that are each one linear's weight and nothing else."""
    if split.op not in ("call_function", "call_method") or split.target not in _SPLITS or not is_parameter(gm, split.args[0]):
        return None
    dim = split.kwargs.get("dim", split.args[2] if len(split.args) > 2 else 0)
    if dim != 0 or len(split.args[0].users) != 1:
        return None
    pairs = []
    for block in split.users:
        linear = next(iter(block.users)) if len(block.users) == 1 else None
        if block.target is not operator.getitem or linear is None or linear.target not in LINEAR_FUNCTIONS or linear.args[1] is not block:
            return None
        pairs.append((block, linear))
    return pairs


class FoldSlicedWeights(GraphPass):
    name = "fold_sliced_weights"
    preserves_outputs = True

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        for split in list(gm.graph.nodes):
            pairs = _linear_weight_blocks(gm, split)
            if pairs is None:
                continue
            parameter = split.args[0].target
            owner_name, _, attribute = parameter.rpartition(".")
            source, memo = gm.get_parameter(parameter), {}
            for block, linear in pairs:
                with torch.no_grad():
                    value = constant_value(gm, block, memo)
                name = f"{attribute}_{block.args[1]}"
                gm.get_submodule(owner_name).register_parameter(name, nn.Parameter(value.detach().clone(), requires_grad=source.requires_grad))
                with gm.graph.inserting_before(linear):
                    folded = gm.graph.get_attr(f"{owner_name}.{name}" if owner_name else name)
                linear.replace_input_with(block, folded)
                erase_unused(gm.graph, block)
        return gm
