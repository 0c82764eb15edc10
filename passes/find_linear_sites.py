"""Analysis: find every compressible linear site, in each form a capture produces (see
tunecomp_fx.forms), and the layers the capture hid from it, which stay dense with the reason. A
weight's linear calls of one layout and stride are one site, its further calls in `Site.more_calls`:
compressed with one student if they apply the weight alike (the same bias too). A weight that
embedding lookups read too (an output head tied to its embedding, under any of its parameter names)
is compressed with its lookups (`Site.lookups`); one tied to another parameter read otherwise, used
outside linear calls and lookups, or applied by calls that differ stays dense ("shared"). With
compress_embeddings, a table that lookups alone read and that has more rows than features (a
vocabulary; a smaller table saves nothing worth its rank) is a site of its own (`Site.is_table`), in
graph order with the linear sites (lookups of rows, or bags of them summed or averaged, as
nn.EmbeddingBag's); one that something else reads too (a "max" bag, a lookup with max_norm, any other
op) stays dense ("shared")."""

from __future__ import annotations

import fnmatch
from collections import Counter, defaultdict

from torch import fx, nn

from tunecomp_fx.capture import hidden_layers
from tunecomp_fx.errors import SiteError
from tunecomp_fx.forms import LookupMatch, SiteMatch, match_lookup, match_sites, read_table
from tunecomp_fx.pipeline import GraphPass, PassContext
from tunecomp_fx.sites import TABLE_FORM, Site


class FindLinearSites(GraphPass):
    name = "find_linear_sites"
    preserves_outputs = True

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        matches = match_sites(gm)
        # a site: a weight's linear calls of one layout and stride (several for a shared weight), in graph order
        calls_of: dict[tuple[str, str, int], list[SiteMatch]] = defaultdict(list)
        for match in matches:
            calls_of[(match.weight, match.layout, match.stride)].append(match)
        sites_of_weight = Counter(weight for weight, _, _ in calls_of)
        aliases = _parameter_aliases(gm)
        lookups = [lookup for node in gm.graph.nodes if (lookup := match_lookup(gm, node)) is not None]
        readers = _parameter_readers(gm)

        def status(weight: str, calls: list[SiteMatch], name: str, own_lookups: list[LookupMatch]) -> tuple[str, str]:
            if any(fnmatch.fnmatchcase(name, pattern) for pattern in ctx.config.exclude):
                return "excluded", "excluded by the user's pattern"
            outside = set().union(*(readers[alias] for alias in aliases[weight])) - {node for call in calls for node in call.nodes}
            if outside - {lookup.table_reader for lookup in own_lookups}:
                if not calls:  # a "max" bag, a lookup with max_norm (renormalizing the table in place), another op
                    return "shared", "table also read outside embedding lookups and sum or mean bags"
                tied = sorted(set(aliases[weight]) - {weight})
                return "shared", f"weight tied with {', '.join(tied)}" if tied else "weight also used outside linear calls"
            if outside and ctx.config.method != "tunecomp":
                return "shared", "weight also read by embedding lookups, compressed with them by method='tunecomp' alone"
            computed = [call.bias for call in calls if isinstance(call.bias, fx.Node)]
            if computed:
                return "unsupported", f"bias computed from the model's input at node '{computed[0].name}'"
            # one student serves every call only if each applies the weight alike
            if sites_of_weight[weight] > 1 or len({call.bias for call in calls}) > 1:
                return "shared", "weight applied by linear calls that differ in layout, stride or bias"
            return "compress", ""

        sites = []
        for calls in calls_of.values():
            first = calls[0]
            weight = gm.get_parameter(first.weight)
            name = first.weight.removesuffix(".weight")
            own_lookups = [lookup for lookup in lookups if lookup.weight in aliases[first.weight]]  # under any of its names
            site_status, reason = status(first.weight, calls, name, own_lookups)
            sites.append(
                Site(
                    name=name,
                    node=first.output.name,
                    form=first.form,
                    in_features=weight.shape[1],
                    out_features=weight.shape[0],
                    weight_target=first.weight,
                    bias_target=first.bias if isinstance(first.bias, str) else None,
                    status=site_status,
                    reason=reason,
                    entry_node=first.entry.name,
                    layout=first.layout,
                    stride=first.stride,
                    more_calls=tuple((call.output.name, call.entry.name) for call in calls[1:]),
                    lookups=tuple(lookup.node.name for lookup in own_lookups) if site_status == "compress" else (),
                )
            )
        if ctx.config.compress_embeddings:
            linear_weights = {alias for weight, _, _ in calls_of for alias in aliases[weight]}
            # every table an embedding read of any kind takes rows of (by its first name), with its plain lookups
            first_reads: dict[str, fx.Node] = {}
            for node in gm.graph.nodes:
                if (table := read_table(gm, node)) is not None and table not in linear_weights:
                    first_reads.setdefault(aliases[table][0], node)
            tables: dict[str, list[LookupMatch]] = defaultdict(list)
            for lookup in lookups:
                tables[aliases[lookup.weight][0]].append(lookup)
            for weight, first_read in first_reads.items():
                rows, features = gm.get_parameter(weight).shape
                if rows <= features:
                    continue
                name, table_lookups = weight.removesuffix(".weight"), tables[weight]
                site_status, reason = status(weight, [], name, table_lookups)
                node = table_lookups[0].node if table_lookups else first_read  # a table no plain lookup reads stays dense
                sites.append(
                    Site(
                        name=name, node=node.name, form=TABLE_FORM, in_features=features, out_features=rows,
                        weight_target=weight, bias_target=None, status=site_status, reason=reason,
                        lookups=tuple(lookup.node.name for lookup in table_lookups) if site_status == "compress" else (),
                    )
                )
            order = {node.name: index for index, node in enumerate(gm.graph.nodes)}
            sites.sort(key=lambda site: order[site.node])
        ctx.sites = sites + hidden_layers(gm)
        return gm

    def ensures(self, gm: fx.GraphModule, ctx: PassContext) -> str | None:
        if not ctx.sites:
            raise SiteError(
                f"{gm.__class__.__name__} has no compressible linear site (nn.Linear, F.linear, aten.linear, "
                "x @ W.T + b, addmm with an (in, out) weight, or a pointwise convolution: 1x1 Conv2d, kernel-1 Conv1d; "
                "with weights held as parameters); there is nothing "
                "to compress"
            )
        if not ctx.compressed_sites:
            reasons = Counter(site.status for site in ctx.sites)
            examples = {site.status: site for site in reversed(ctx.sites)}  # the first site of each status
            why = "; ".join(f"{status}: '{site.name}', {site.reason}" for status, site in examples.items())
            capture = f" (capture: {ctx.capture_reason})" if "hidden" in examples and ctx.capture_reason else ""
            remedies = " or ".join(_REMEDIES[status] for status in examples)
            raise SiteError(
                f"all {len(ctx.sites)} linear sites are left dense ({dict(reasons)}): {why}{capture}. "
                f"To compress at least one, {remedies}"
            )
        return None


# What makes a site of each status (but "compress") compressible.
_REMEDIES = {
    "excluded": "loosen `exclude`",
    "shared": "give the layers weights of their own (a weight tied to another parameter, used outside linear calls and "
    "embedding lookups, or applied by linear calls that differ stays dense)",
    "unsupported": "compute the bias from parameters, not from the input",
    "hidden": "make the layers visible to a capture (symbolic tracing does not enter leaf modules; torch.export needs "
    "example inputs whose dynamic axes, `dynamic_dims`, the model also runs at other sizes)",
}


def _parameter_aliases(gm: nn.Module) -> dict[str, list[str]]:
    by_identity: dict[int, list[str]] = defaultdict(list)
    for name, parameter in gm.named_parameters(remove_duplicate=False):
        by_identity[id(parameter)].append(name)
    return defaultdict(list, {name: names for names in by_identity.values() for name in names})


def _parameter_readers(gm: fx.GraphModule) -> dict[str, set[fx.Node]]:
    """The nodes that read each parameter name: its get_attrs' users, and calls of the modules that hold it."""
    readers: dict[str, set[fx.Node]] = defaultdict(set)
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            readers[node.target].update(node.users)
        elif node.op == "call_module":
            for name, _ in gm.get_submodule(node.target).named_parameters(remove_duplicate=False):
                readers[f"{node.target}.{name}"].add(node)
    return readers
