"""Transform: addmm(b, x, W) with W a parameter held input-major, (in, out), as Hugging Face's
Conv1D holds it (GPT-2's attention and MLP layers), becomes linear(x, W', b) with W' = W.T stored
in W's place, so that the layer is a site of the usual (out, in) form. Only a parameter that this
node alone reads is transposed; the model is capture's copy, never the user's."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from tunecomp_fx.pipeline import GraphPass, PassContext

aten = torch.ops.aten

# addmm target -> the linear call that replaces it in the same kind of graph (traced or exported)
_ADDMMS = {torch.addmm: F.linear, aten.addmm.default: aten.linear.default}


def _read_once(gm: fx.GraphModule, node: object, dims: int) -> bool:
    """Whether `node` reads a parameter of `dims` dims that no other node or alias reads."""
    if not isinstance(node, fx.Node) or node.op != "get_attr" or len(node.users) != 1:
        return False
    try:
        parameter = gm.get_parameter(node.target)
    except AttributeError:
        return False
    readers = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == node.target]
    aliases = [name for name, p in gm.named_parameters(remove_duplicate=False) if p is parameter]
    return parameter.dim() == dims and len(readers) == 1 and len(aliases) == 1


class TransposeInputMajorWeights(GraphPass):
    name = "transpose_input_major_weights"
    preserves_outputs = True

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target not in _ADDMMS or len(node.args) != 3 or node.kwargs:
                continue
            bias, x, weight = node.args
            if not (_read_once(gm, weight, 2) and isinstance(bias, fx.Node) and bias.op == "get_attr"):
                continue
            owner_name, _, attribute = weight.target.rpartition(".")
            held = gm.get_parameter(weight.target)
            with torch.no_grad():
                setattr(gm.get_submodule(owner_name), attribute, nn.Parameter(held.t().contiguous(), requires_grad=held.requires_grad))
            with gm.graph.inserting_before(node):
                linear = gm.graph.call_function(_ADDMMS[node.target], (x, weight, bias))
            linear.meta = dict(node.meta)
            node.replace_all_uses_with(linear)
            gm.graph.erase_node(node)
        gm.recompile()
        return gm
