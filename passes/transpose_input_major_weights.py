"""Transform: addmm(b, x, W) with W a parameter held input-major, (in, out), as Hugging Face's
Conv1D holds it (GPT-2's attention and MLP layers), becomes linear(x, W', b) with W' = W.T stored
in W's place, so that the layer is a site of the usual (out, in) form. Only a parameter that this
node alone reads is transposed; the model is capture's copy, never the user's."""

from __future__ import annotations

from collections import Counter

import torch
import torch.nn.functional as F
from torch import fx, nn

from tunecomp_fx.forms import is_parameter
from tunecomp_fx.pipeline import GraphPass, PassContext

aten = torch.ops.aten

# addmm target -> the linear call that replaces it in the same kind of graph (traced or exported)
_ADDMMS = {torch.addmm: F.linear, aten.addmm.default: aten.linear.default}


class TransposeInputMajorWeights(GraphPass):
    name = "transpose_input_major_weights"
    preserves_outputs = True

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        # a parameter this pass may transpose is read by one use of one node, under one name
        reads: Counter[str] = Counter()
        for attribute in gm.graph.find_nodes(op="get_attr"):
            reads[attribute.target] += len(attribute.users)
        names = Counter(id(parameter) for _, parameter in gm.named_parameters(remove_duplicate=False))
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target not in _ADDMMS or len(node.args) != 3 or node.kwargs:
                continue
            bias, x, weight = node.args
            if not (is_parameter(gm, weight) and reads[weight.target] == 1 and isinstance(bias, fx.Node) and bias.op == "get_attr"):
                continue
            held = gm.get_parameter(weight.target)
            if held.dim() != 2 or names[id(held)] != 1:
                continue
            owner_name, _, attribute = weight.target.rpartition(".")
            with torch.no_grad():
                setattr(gm.get_submodule(owner_name), attribute, nn.Parameter(held.t().contiguous(), requires_grad=held.requires_grad))
            with gm.graph.inserting_before(node):
                linear = gm.graph.call_function(_ADDMMS[node.target], (x, weight, bias))
            linear.meta = dict(node.meta)
            node.replace_all_uses_with(linear)
            gm.graph.erase_node(node)
        gm.recompile()
        return gm
