"""Analysis: find every compressible linear site, in each form a capture produces."""

from __future__ import annotations

import fnmatch
from collections import Counter, defaultdict

import torch
import torch.nn.functional as F
from torch import fx, nn

from tunecomp_fx.errors import SiteError
from tunecomp_fx.pipeline import GraphPass, PassContext
from tunecomp_fx.sites import Site

_LINEAR_FUNCTIONS = {F.linear: "F.linear", torch.ops.aten.linear.default: "aten.linear"}


def linear_weight_targets(gm: fx.GraphModule, node: fx.Node) -> tuple[str, str | None, str] | None:
    """(weight target, bias target, form) of a linear node whose parameters are attributes, else None."""
    if node.op == "call_module" and type(gm.get_submodule(node.target)) is nn.Linear:
        module = gm.get_submodule(node.target)
        return f"{node.target}.weight", (f"{node.target}.bias" if module.bias is not None else None), "call_module"
    if node.op == "call_function" and node.target in _LINEAR_FUNCTIONS:
        weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
            return None
        if bias is not None and not (isinstance(bias, fx.Node) and bias.op == "get_attr"):
            return None
        return weight.target, (bias.target if bias is not None else None), _LINEAR_FUNCTIONS[node.target]
    return None


class FindLinearSites(GraphPass):
    name = "find_linear_sites"
    preserves_outputs = True

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        found = [(node, linear_weight_targets(gm, node)) for node in gm.graph.nodes]
        found = [(node, targets) for node, targets in found if targets is not None]
        weight_uses = Counter(weight for _, (weight, _, _) in found)
        aliases = _parameter_aliases(gm)
        # Uses of a weight outside linear sites (e.g. a tied embedding lookup) make it shared too.
        linear_nodes = {node for node, _ in found}
        other_uses = _get_attr_uses_outside(gm, linear_nodes)
        sites = []
        for node, (weight_target, bias_target, form) in found:
            weight = gm.get_parameter(weight_target)
            name = weight_target.removesuffix(".weight")
            status, reason = "compress", ""
            if any(fnmatch.fnmatchcase(name, pattern) for pattern in ctx.config.exclude):
                status, reason = "excluded", "excluded by the user's pattern"
            elif weight_uses[weight_target] > 1:
                status, reason = "shared", f"weight used by {weight_uses[weight_target]} linear calls"
            elif len(aliases[weight_target]) > 1:
                others = sorted(set(aliases[weight_target]) - {weight_target})
                status, reason = "shared", f"weight tied with {', '.join(others)}"
            elif weight_target in other_uses:
                status, reason = "shared", "weight also used outside linear calls"
            sites.append(
                Site(
                    name=name,
                    node=node.name,
                    form=form,
                    in_features=weight.shape[1],
                    out_features=weight.shape[0],
                    weight_target=weight_target,
                    bias_target=bias_target,
                    status=status,
                    reason=reason,
                )
            )
        ctx.sites = sites
        return gm

    def ensures(self, gm: fx.GraphModule, ctx: PassContext) -> str | None:
        if not ctx.sites:
            raise SiteError(
                f"{gm.__class__.__name__} has no compressible linear site (nn.Linear, F.linear or aten.linear "
                "with weights held as parameters); there is nothing to compress"
            )
        if not ctx.compressed_sites:
            reasons = Counter(site.status for site in ctx.sites)
            raise SiteError(
                f"all {len(ctx.sites)} linear sites are left dense ({dict(reasons)}); loosen `exclude` "
                "so that at least one site can be compressed"
            )
        return None


def _parameter_aliases(gm: nn.Module) -> dict[str, list[str]]:
    by_identity: dict[int, list[str]] = defaultdict(list)
    for name, parameter in gm.named_parameters(remove_duplicate=False):
        by_identity[id(parameter)].append(name)
    return defaultdict(list, {name: names for names in by_identity.values() for name in names})


def _get_attr_uses_outside(gm: fx.GraphModule, linear_nodes: set[fx.Node]) -> set[str]:
    used = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr" and any(user not in linear_nodes for user in node.users):
            used.add(node.target)
    return used
