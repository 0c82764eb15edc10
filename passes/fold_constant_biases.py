"""Transform: a site's bias computed from parameters alone (BEiT's `cat(q_bias, k_bias, v_bias)`) is
evaluated once into a frozen parameter read by get_attr, so that the site has a plain bias its
student can copy. The teacher is frozen during training, so its bias is a constant anyway."""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

from tunecomp_fx.forms import match_sites
from tunecomp_fx.pipeline import GraphPass, PassContext

FOLDED_ROOT = "_tunecomp_folded"  # holds the folded biases, one frozen parameter per site


class _DependsOnInput(Exception):
    pass


def constant_value(gm: fx.GraphModule, node: fx.Node, memo: dict[fx.Node, Any]) -> Any:
    """The value of `node` when it depends on parameters, buffers and constants only."""
    if node in memo:
        return memo[node]
    if node.op not in ("get_attr", "call_function", "call_method"):
        raise _DependsOnInput(node.name)
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: constant_value(gm, n, memo))
    if node.op == "get_attr":
        value = gm
        for part in node.target.split("."):
            value = getattr(value, part)
    elif node.op == "call_function":
        value = node.target(*args, **kwargs)
    else:
        value = getattr(args[0], node.target)(*args[1:], **kwargs)
    memo[node] = value
    return value


class FoldConstantBiases(GraphPass):
    name = "fold_constant_biases"
    preserves_outputs = True

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        memo: dict[fx.Node, Any] = {}
        for match in match_sites(gm):
            if not isinstance(match.bias, fx.Node):
                continue
            try:
                with torch.no_grad():
                    value = constant_value(gm, match.bias, memo)
            except _DependsOnInput:
                continue  # find_linear_sites reports the site as unsupported
            if not hasattr(gm, FOLDED_ROOT):
                gm.add_module(FOLDED_ROOT, nn.Module())
            key = match.weight.replace(".", "_")
            gm.get_submodule(FOLDED_ROOT).register_parameter(key, nn.Parameter(value.detach().clone(), requires_grad=False))
            with gm.graph.inserting_before(match.entry):
                folded = gm.graph.get_attr(f"{FOLDED_ROOT}.{key}")
            match.entry.replace_input_with(match.bias, folded)
            erase_unused(gm.graph, match.bias)
        return gm


def erase_unused(graph: fx.Graph, node: fx.Node) -> None:
    """Erase a constant subgraph that nothing reads any more, from its output up."""
    if node.users:
        return
    inputs = node.all_input_nodes
    graph.erase_node(node)
    for input_node in inputs:
        erase_unused(graph, input_node)
