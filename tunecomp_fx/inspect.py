"""Look inside a run: what each pass added and removed, a summary of a graph, one site's subgraph
printed readably, and a graph as a networkx DiGraph (or GraphML / DOT file) for your own tools.

    prepared = tunecomp_fx.prepare(model, example_inputs, ratio=0.4)
    print(format_pass_log(pass_log(prepared)))
    print(site_subgraph(prepared, "blocks.0.mlp.fc1"))
    write_graphml(prepared, "prepared.graphml")
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path

import networkx as nx
import torch
from torch import fx, nn

from tunecomp_fx.api import REPORT_KEY, STATE_KEY, get_report, prepared_state
from tunecomp_fx.errors import InputError
from tunecomp_fx.forms import match_site
from tunecomp_fx.pipeline import PassRecord
from tunecomp_fx.report import format_table
from tunecomp_fx.sites import LOWRANK_ROOT, TABLE_FORM, Blend, site_key

_ROLE_COLOURS = {"teacher": "#d9d9d9", "down": "#9ecae1", "up": "#9ecae1", "dense": "#a1d99b", "rank_mask": "#fff3b0", "masked": "#fff3b0", "blend": "#fdae6b"}


def pass_log(model: fx.GraphModule) -> list[PassRecord]:
    """Every pass run so far on a prepared model (or, for a compact model, on its way there), in
    order, with the seconds it took and the names of the nodes it added and removed."""
    if isinstance(model, fx.GraphModule) and STATE_KEY in model.meta:
        return list(prepared_state(model).context.log)
    if isinstance(model, fx.GraphModule) and REPORT_KEY in model.meta:
        return list(get_report(model).pass_log)
    raise InputError("this model has no pass log; it was not made by tunecomp_fx.prepare, finalize or compress")


def format_pass_log(records: Iterable[PassRecord], *, names: int = 0) -> str:
    """The pass log as a table; with `names` > 0, up to that many added/removed node names per pass."""
    records = list(records)
    rows = [["pass", "seconds", "added", "removed"]]
    rows += [[r.name, f"{r.seconds:.2f}", f"+{len(r.added)}", f"-{len(r.removed)}"] for r in records]
    lines = format_table(rows)
    if names > 0:
        for record in records:
            for sign, nodes in (("+", record.added), ("-", record.removed)):
                if nodes:
                    more = f" ... and {len(nodes) - names} more" if len(nodes) > names else ""
                    lines.append(f"{record.name} {sign} {', '.join(nodes[:names])}{more}")
    return "\n".join(lines)


def _is_linear(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), nn.Linear)
    return match_site(gm, node) is not None


def graph_summary(gm: fx.GraphModule) -> dict[str, int]:
    """Node counts of a graph: in all, per op kind, and linear maps (any form)."""
    nodes = list(gm.graph.nodes)
    ops = Counter(node.op for node in nodes)
    summary = {"nodes": len(nodes)}
    summary.update({op: ops.get(op, 0) for op in ("placeholder", "get_attr", "call_module", "call_function", "call_method", "output")})
    summary["linear maps"] = sum(_is_linear(gm, node) for node in nodes)
    summary["parameters"] = sum(p.numel() for p in gm.parameters())
    return summary


def format_graph_summaries(summaries: Mapping[str, Mapping[str, int]]) -> str:
    """Graph summaries side by side, one column per graph (e.g. captured, prepared, compact)."""
    labels = list(summaries)
    keys = list(summaries[labels[0]])
    rows = [["", *labels]] + [[key, *(f"{summaries[label][key]:,}" for label in labels)] for key in keys]
    return "\n".join(format_table(rows))


def _target_name(node: fx.Node) -> str:
    if node.op == "call_function":
        if isinstance(node.target, torch._ops.OpOverload):
            return str(node.target)
        return fx.node._get_qualified_name(node.target)
    return str(node.target)


def _shape(node: fx.Node) -> str | None:
    value = node.meta.get("val", node.meta.get("tensor_meta"))
    shape = getattr(value, "shape", None)
    return "x".join(str(size) for size in shape) if shape is not None else None


def _role(node: fx.Node) -> str | None:
    meta = node.meta.get("tunecomp", {})
    role = f"lookup {meta['part']}" if meta.get("role") == "lookup" else meta.get("role")
    if role is None and isinstance(node.target, str) and node.target.startswith(f"{LOWRANK_ROOT}."):
        role = node.target.rpartition(".")[2]
    return role


def _site_of(node: fx.Node) -> str | None:
    site = node.meta.get("tunecomp", {}).get("site")
    if site is None and isinstance(node.target, str) and node.target.startswith(f"{LOWRANK_ROOT}."):
        site = node.target.split(".")[1]  # the site's key; the name itself is not in the graph
    return site


def to_networkx(gm: fx.GraphModule) -> nx.DiGraph:
    """The graph as a networkx DiGraph: one vertex per node (keyed by node name, with op, target,
    module type, shape, site and role where known) and one edge per data dependency."""
    graph = nx.DiGraph(name=type(gm).__name__)
    for index, node in enumerate(gm.graph.nodes):
        attributes = {"op": node.op, "target": _target_name(node), "order": index}
        if node.op == "call_module":
            attributes["module"] = type(gm.get_submodule(node.target)).__name__
        optional = {"shape": _shape(node), "site": _site_of(node), "role": _role(node)}
        attributes.update({k: v for k, v in optional.items() if v is not None})
        graph.add_node(node.name, **attributes)
        for source in node.all_input_nodes:
            graph.add_edge(source.name, node.name)
    return graph


def write_graphml(gm: fx.GraphModule, path: str | Path) -> Path:
    path = Path(path)
    nx.write_graphml(to_networkx(gm), path)
    return path


def _dot_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def write_dot(gm: fx.GraphModule, path: str | Path) -> Path:
    """Graphviz DOT (written directly, no pydot needed); student nodes are coloured by role."""
    graph = to_networkx(gm)
    lines = [f"digraph {_dot_quote(graph.graph['name'])} {{", '  node [shape=box, fontname="Helvetica", fontsize=10];']
    for name, data in graph.nodes(data=True):
        label = f"{name}\n{data['op']}: {data['target']}" + (f"\n{data['shape']}" if "shape" in data else "")
        colour = _ROLE_COLOURS.get(data.get("role", ""))
        style = f", style=filled, fillcolor={_dot_quote(colour)}" if colour else ""
        lines.append(f"  {_dot_quote(name)} [label={_dot_quote(label)}{style}];")
    lines += [f"  {_dot_quote(a)} -> {_dot_quote(b)};" for a, b in graph.edges]
    lines.append("}")
    path = Path(path)
    path.write_text("\n".join(lines) + "\n")
    return path


def site_names(model: fx.GraphModule) -> list[str]:
    """The linear sites of a prepared or compact model, in graph order."""
    if isinstance(model, fx.GraphModule) and STATE_KEY in model.meta:
        return [site.name for site in prepared_state(model).context.sites]
    return [row.name for row in get_report(model).sites]


def _site_description(model: fx.GraphModule, name: str) -> str:
    if STATE_KEY in model.meta:
        state = prepared_state(model)
        site = next(s for s in state.context.sites if s.name == name)
        decision = state.context.ranks.get(name)
        what = site.status if site.status != "compress" else (f"rank {decision.rank}" if decision and decision.rank else "dense")
        calls = f", {len(site.calls)} calls of the weight" if site.more_calls else ""
        lookups = f", {len(site.lookups)} embedding lookup{'s' * (len(site.lookups) > 1)} of the weight" if site.lookups else ""
        return f"{_site_shape(site.form, site.in_features, site.out_features)}, {what}{calls}{lookups} (prepared model)"
    row = next(r for r in get_report(model).sites if r.name == name)
    what = f"rank {row.rank}" if row.rank is not None else row.decision
    return f"{_site_shape(row.form, row.in_features, row.out_features)}, {what} (compact model)"


def _site_shape(form: str, in_features: int, out_features: int) -> str:
    """A linear map's in -> out, a table's rows x features."""
    return f"{form} {out_features} x {in_features}" if form == TABLE_FORM else f"{form} {in_features} -> {out_features}"


def _describe_attribute(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, nn.Linear):
            bias = "" if module.bias is not None else ", no bias"
            return f"Linear {module.in_features} -> {module.out_features}{bias}"
        if isinstance(module, Blend):
            return f"Blend alpha={module.alpha.item():.3g} beta={module.beta.item():.3g}"
        return type(module).__name__
    if node.op == "get_attr":
        value = fx.graph_module._get_attr(gm, node.target)
        return f"tensor {'x'.join(map(str, value.shape))}" if isinstance(value, torch.Tensor) else type(value).__name__
    return ""


def _site_nodes(gm: fx.GraphModule, name: str) -> list[fx.Node]:
    prefix = f"{LOWRANK_ROOT}.{site_key(name)}."
    chosen = {
        node
        for node in gm.graph.nodes
        if node.meta.get("tunecomp", {}).get("site") == name or (isinstance(node.target, str) and node.target.startswith(prefix))
    }
    if not chosen:  # a site left dense: its original linear node
        for node in gm.graph.nodes:
            match = match_site(gm, node)
            if match is not None and match.weight == f"{name}.weight":
                chosen.update(match.nodes)
    # The weights a chosen node reads through get_attr belong to the site too.
    chosen |= {n for node in list(chosen) for n in node.all_input_nodes if n.op == "get_attr" and set(n.users) <= chosen}
    return [node for node in gm.graph.nodes if node in chosen]


def _format_arg(value: object) -> str:
    if isinstance(value, fx.Node):
        return f"%{value.name}"
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(_format_arg(v) for v in value) + ")"
    return repr(value)


def site_subgraph(model: fx.GraphModule, site_name: str) -> str:
    """One site's nodes, in graph order, with what feeds them and what reads them: e.g. in a
    prepared model the teacher, down, rank mask, up and blend; in a compact one down and up."""
    names = site_names(model)
    if site_name not in names:
        close = [n for n in names if site_name in n or n in site_name][:5] or names[:5]
        raise InputError(f"no site named '{site_name}'; sites include {', '.join(close)} ({len(names)} in all)")
    nodes = _site_nodes(model, site_name)
    inside = set(nodes)
    feeds = {arg.name for node in nodes for arg in node.all_input_nodes if arg not in inside}
    lines = [f"site {site_name}: {_site_description(model, site_name)}", f"  in:  {', '.join('%' + n for n in sorted(feeds))}"]
    rows = []
    for node in nodes:
        args = ", ".join([_format_arg(a) for a in node.args] + [f"{k}={_format_arg(v)}" for k, v in node.kwargs.items()])
        call = f"{node.op} {_target_name(node)}" + (f"({args})" if node.op != "get_attr" else "")
        notes = [f"[{_role(node)}]" if _role(node) else "", _describe_attribute(model, node) or _shape(node) or ""]
        rows.append((f"%{node.name} = {call}", "  ".join(n for n in notes if n)))
    width = max(len(text) for text, _ in rows)
    lines += [f"  {text.ljust(width)}  {notes}".rstrip() for text, notes in rows]
    readers = [f"%{node.name} -> {', '.join('%' + u.name for u in node.users if u not in inside)}" for node in nodes if set(node.users) - inside]
    lines.append(f"  out: {'; '.join(readers)}")
    return "\n".join(lines)
