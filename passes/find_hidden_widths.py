"""Analysis (when prune_neurons > 0): find every hidden width between two compressed sites, where an
up-projection's output passes only through elementwise nodes (an activation, perhaps a dropout) into
a down-projection, as in a transformer's FFN. Dropping a neuron there removes a row of up, the
activation's element and a column of down, and changes nothing else in the model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from tunecomp_fx.errors import SiteError
from tunecomp_fx.forms import site_input
from tunecomp_fx.pipeline import GraphPass, PassContext
from tunecomp_fx.sites import HiddenWidth, Site

aten = torch.ops.aten

# Elementwise functions of one tensor: a neuron's output depends on that neuron's input alone.
_ACTIVATION_FUNCTIONS = {
    aten.gelu.default, aten.relu.default, aten.silu.default, aten.tanh.default, aten.sigmoid.default,
    F.gelu, F.relu, F.silu, torch.relu, torch.tanh, torch.sigmoid,
}
_ACTIVATION_METHODS = {"relu", "tanh", "sigmoid"}
_ACTIVATION_MODULES = (nn.GELU, nn.ReLU, nn.SiLU, nn.Tanh, nn.Sigmoid)
_DROPOUTS = {aten.dropout.default, F.dropout}


def _elementwise(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """"activation", "dropout", or None when `node` is neither (or reads more than one tensor)."""
    tensors = node.all_input_nodes
    if len(tensors) != 1 or node.args[:1] != (tensors[0],):
        return None
    if node.op == "call_function":
        return "activation" if node.target in _ACTIVATION_FUNCTIONS else "dropout" if node.target in _DROPOUTS else None
    if node.op == "call_method":
        return "activation" if node.target in _ACTIVATION_METHODS else None
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return "activation" if isinstance(module, _ACTIVATION_MODULES) else "dropout" if isinstance(module, nn.Dropout) else None
    return None


def hidden_width(gm: fx.GraphModule, up: Site, sites_by_entry: dict[str, Site], nodes: dict[str, fx.Node]) -> HiddenWidth | None:
    """The width `up` computes, if only elementwise nodes, one an activation, lead from it to a compressed site's input."""
    current, chain, kinds = nodes[up.node], [], set()
    while len(current.users) == 1:
        user = next(iter(current.users))
        down = sites_by_entry.get(user.name)
        if down is not None:
            if site_input(user) is current and "activation" in kinds and down.in_features == up.out_features:
                return HiddenWidth(up.name, down.name, tuple(chain), up.out_features)
            return None
        kind = _elementwise(gm, user)
        if kind is None:
            return None
        chain.append(user.name)
        kinds.add(kind)
        current = user
    return None


class FindHiddenWidths(GraphPass):
    name = "find_hidden_widths"
    preserves_outputs = True

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> str | None:
        return None if ctx.sites else "no sites (run find_linear_sites first)"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        nodes = {node.name: node for node in gm.graph.nodes}
        compressed = ctx.compressed_sites
        sites_by_entry = {site.entry_node: site for site in compressed}
        found = (hidden_width(gm, site, sites_by_entry, nodes) for site in compressed)
        ctx.hidden_widths = [width for width in found if width is not None]
        return gm

    def ensures(self, gm: fx.GraphModule, ctx: PassContext) -> str | None:
        if not ctx.hidden_widths:
            raise SiteError(
                f"prune_neurons={ctx.config.prune_neurons} found no hidden width to prune: no compressed site's "
                "output reaches another compressed site through an elementwise activation alone (up -> "
                "activation -> down, as in a transformer's FFN). Use prune_neurons=0 for this model, or "
                "check that `exclude` leaves both layers of such a pair compressed"
            )
        return None
