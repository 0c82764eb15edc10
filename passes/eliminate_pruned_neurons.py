"""Transform: slice away the neurons (heads) a width mask switched off (width_slack): the up sites'
students lose those output rows, the down site's student those input columns, each copied shape
entry that counts the width is scaled to what is left (and the heads a tensor with one entry per head
is read for, and the channels of the per-channel modules and squeeze-excitations copied into the
width), and the mask and the products that read it are dropped (at each call of a shared weight)."""

from __future__ import annotations

import torch
from torch import fx

from tunecomp_fx.forms import rebuilt
from tunecomp_fx.graph_nodes import rescale_shape_entry
from tunecomp_fx.per_channel import channels_key, set_group_count, with_channels
from tunecomp_fx.pipeline import GraphPass, PassContext
from tunecomp_fx.sites import HiddenWidth, Site, site_container, student_calls, student_nodes


class EliminatePrunedNeurons(GraphPass):
    name = "eliminate_pruned_neurons"
    preserves_outputs = True

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> str | None:
        dense = [key for key, roles in student_nodes(gm).items() if "width_mask" in roles and "dense" in roles]
        return f"sites {dense[:3]} were densified before their width was sliced" if dense else None

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        sites = {site.name: site for site in ctx.sites}
        found = student_calls(gm)
        for width in ctx.hidden_widths:
            down = sites[width.down]
            calls = found.get(down.key, [{}])
            if "width_mask" in calls[0]:
                _slice_width(gm, width, sites, down, calls)
        return gm

    def ensures(self, gm: fx.GraphModule, ctx: PassContext) -> str | None:
        left = [key for key, roles in student_nodes(gm).items() if "width_mask" in roles]
        return f"width masks left at {left[:3]}" if left else None


def _slice_width(gm: fx.GraphModule, width: HiddenWidth, sites: dict[str, Site], down: Site, calls: list[dict[str, fx.Node]]) -> None:
    container = site_container(gm, down)
    mask = container.width_mask.flatten()
    kept = mask.nonzero().flatten()
    with torch.no_grad():
        weight = container.down.weight
        scale = mask[kept].to(weight.dtype).reshape((1, -1) + (1,) * (weight.dim() - 2))
        container.down = rebuilt(container.down, weight[:, kept] * scale, container.down.bias)
        for name in width.ups:
            rows = torch.tensor(width.up_rows(name, kept.tolist(), len(width.kept)), device=kept.device)
            student = site_container(gm, sites[name])
            bias = student.up.bias[rows] if student.up.bias is not None else None
            student.up = rebuilt(student.up, student.up.weight[rows], bias)
    if hasattr(container, "kept_heads"):  # a tensor with one entry per head is read for the kept heads alone
        container.kept_heads = container.kept_heads[width.heads_of(kept.tolist())]
    for name, side in width.channel_slices.items():
        key = channels_key(name)
        setattr(container, key, with_channels(getattr(container, key), kept, side))
    for node in gm.graph.nodes:
        meta = node.meta.get("tunecomp", {})
        if meta.get("site") != width.down:
            continue
        for index in width.resized_entries(meta.get("copy_of")):
            rescale_shape_entry(node, index, len(kept), len(width.kept))
        if meta.get("copy_of") in width.channelwise:
            set_group_count(node, getattr(container, channels_key(meta["copy_of"])))
    for roles in calls:  # one mask node for each call of a shared weight
        for masked in list(roles["width_mask"].users):  # the down site's input, and any squeeze-excitation's
            masked.replace_all_uses_with(masked.args[0])
            gm.graph.erase_node(masked)
        gm.graph.erase_node(roles["width_mask"])
    del container._buffers["width_mask"]
