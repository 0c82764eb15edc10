"""Analysis (when prune_neurons or prune_heads > 0): find every hidden width between compressed sites
that can be sliced without changing anything else in the model: FFN neurons (`neuron_widths`) and
attention heads (`head_widths`), with the masks and biases an attention reads with one entry per head
(seen on the example inputs), which the student path reads sliced to its heads. Widths whose tokens
are flattened to rows (LeViT's batch norms) are kept where the example inputs show rows of neurons.
The matchers follow each call of a weight that several linear calls apply; the widths of its calls
become one (`_merged_calls`), so that every call keeps the same neurons."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import fx, nn

from tunecomp_fx.errors import SiteError
from tunecomp_fx.forms import site_input
from tunecomp_fx.head_widths import attention_reads, head_width
from tunecomp_fx.inputs import Inputs, call_model
from tunecomp_fx.neuron_widths import flattens_tokens, neuron_width
from tunecomp_fx.pipeline import GraphPass, PassContext, observing
from tunecomp_fx.sites import HiddenWidth, Site


class _ShapeObserver(nn.Module):
    """Records the shape of what it passes on (inserted for one run, then removed)."""

    def __init__(self) -> None:
        super().__init__()
        self.shape: tuple[int, ...] = ()

    def forward(self, x: torch.Tensor | None) -> torch.Tensor | None:
        self.shape = tuple(x.shape) if isinstance(x, torch.Tensor) else ()  # an optional mask may be None
        return x


def _observed_shapes(gm: fx.GraphModule, reads: list[tuple[fx.Node, fx.Node]], inputs: Inputs) -> list[tuple[int, ...]]:
    """The shape of each (tensor, reader)'s tensor on its way to the reader, in one run on `inputs`."""
    if not reads:
        return []
    observers = [_ShapeObserver() for _ in reads]
    with observing(gm, "_tunecomp_shape_observers", [(tensor, reader, observer) for (tensor, reader), observer in zip(reads, observers)]), torch.no_grad():
        call_model(gm, inputs)
    return [observer.shape for observer in observers]


def _with_per_head_reads(gm: fx.GraphModule, widths: list[HiddenWidth], inputs: Inputs) -> list[HiddenWidth]:
    """`widths` with the tensors each heads width's attention reads from outside it (`attention_reads`)
    that have one entry per head (size > 1 at dim -3, which meets the scores' heads) named in
    `per_head_reads`, as seen on `inputs`."""
    nodes = {node.name: node for node in gm.graph.nodes}
    reads = [
        (index, reader, tensor)
        for index, width in enumerate(widths) if width.kind == "heads"
        for between in width.betweens for reader, tensor in attention_reads(gm, between, nodes)
    ]
    per_head: dict[int, list[tuple[str, str]]] = {}
    for (index, reader, tensor), shape in zip(reads, _observed_shapes(gm, [(tensor, reader) for _, reader, tensor in reads], inputs)):
        if len(shape) >= 3 and shape[-3] > 1:
            per_head.setdefault(index, []).append((reader.name, tensor.name))
    return [replace(width, per_head_reads=tuple(per_head.get(index, ()))) for index, width in enumerate(widths)]


def _with_tokens_flattened_to_rows(gm: fx.GraphModule, widths: list[HiddenWidth], inputs: Inputs | None) -> list[HiddenWidth]:
    """`widths` without the neuron widths whose flatten(0, 1) (`flattens_tokens`) does not give (rows,
    width) on `inputs` (the width would not be its dim 1); with no inputs to see it on, without any
    such width. A heads width's flatten (batch and heads merged) is its own matcher's business."""
    nodes = {node.name: node for node in gm.graph.nodes}
    betweens = [{name for between in width.betweens for name in between} for width in widths]
    flattens = {name: nodes[name] for width, names in zip(widths, betweens) if width.kind == "neurons" for name in names if flattens_tokens(nodes[name])}
    if inputs is None:
        return [width for width, names in zip(widths, betweens) if not flattens.keys() & names]
    shapes = _observed_shapes(gm, [(node, next(iter(node.users))) for node in flattens.values()], inputs)
    flat = {name for name, shape in zip(flattens, shapes) if len(shape) == 2}
    return [width for width, names in zip(widths, betweens) if not (flattens.keys() - flat) & names]


def _call_views(sites: list[Site]) -> list[Site]:
    """Each call of each site as a site of its own (that call's node and entry): the width matchers
    follow one call's nodes."""
    return [replace(site, node=node, entry_node=entry, more_calls=()) for site in sites for node, entry in site.calls]


def _same_neurons(width: HiddenWidth) -> tuple[object, ...]:
    """What the calls of one width must agree on to keep the same neurons at each."""
    return (width.kind, width.ups, width.down, width.width, width.group, width.parts, width.repeats, width.per_head_parts)


def _merged_calls(widths: list[HiddenWidth], sites: dict[str, Site], nodes: dict[str, fx.Node]) -> list[HiddenWidth]:
    """The widths found at each call (`_call_views`), one per down site and kind: those of sites whose
    weights several linear calls apply merged into one (`HiddenWidth.more_between`) where each call of
    the down site reads one of the same up sites, which have as many calls each, and they pass through
    no per-channel module or squeeze-excitation (the student path's copies of those would untie them);
    else none of them. A width of sites with one call each is kept as found."""
    found: dict[tuple[str, str], list[HiddenWidth]] = {}
    for width in widths:
        found.setdefault((width.kind, width.down), []).append(width)
    merged = []
    for group in found.values():
        down = sites[group[0].down]
        calls = len(down.calls)
        if any(len(sites[up].calls) != calls for width in group for up in width.ups):
            continue
        if calls == 1:
            merged += group
            continue
        reads = {site_input(nodes[entry]).name: index for index, (_, entry) in enumerate(down.calls)}
        call_of = [[reads[name] for name in width.between if name in reads] for width in group]  # the down call each width feeds
        if sorted(index for indices in call_of for index in indices) != list(range(calls)) or any(len(indices) != 1 for indices in call_of):
            continue
        if len({_same_neurons(width) for width in group}) != 1 or any(width.channelwise or width.squeezes or width.bottleneck_norms for width in group):
            continue
        ordered = [width for _, width in sorted(zip(call_of, group), key=lambda pair: pair[0])]
        resized = tuple(entry for width in ordered for entry in width.resized)
        merged.append(replace(ordered[0], resized=resized, more_between=tuple(width.between for width in ordered[1:])))
    return merged


def _absorb_squeeze_excitations(ctx: PassContext, widths: list[HiddenWidth]) -> list[HiddenWidth]:
    """`widths` without those of sites in a squeeze-excitation another width passes through (its own
    reduce -> activation -> expand): such a site is sliced with that width in the student path, so it
    stays dense ("in_width") rather than have a student of its own the compact model would not read.
    A width whose squeeze-excitation holds a site left alone (excluded by the user) is not pruned."""
    compressed = {site.node for site in ctx.compressed_sites}
    widths = [width for width in widths if all(node in compressed for squeeze in width.squeezes for node in squeeze[1:])]
    absorbed = {node: width.down for width in widths for squeeze in width.squeezes for node in squeeze[1:]}
    ctx.sites = [
        replace(site, status="in_width", reason=f"a squeeze-excitation's layer inside the width pruned at '{absorbed[site.node]}': sliced with it, kept dense")
        if site.node in absorbed and site.status == "compress" else site
        for site in ctx.sites
    ]
    inside = {site.name for site in ctx.sites if site.node in absorbed}
    return [width for width in widths if not inside & set(width.sites)]


class FindHiddenWidths(GraphPass):
    name = "find_hidden_widths"
    preserves_outputs = True

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> str | None:
        return None if ctx.sites else "no sites (run find_linear_sites first)"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        nodes = {node.name: node for node in gm.graph.nodes}
        # a weight that embedding lookups read keeps its rows and columns: the lookups would lose them too
        calls = _call_views([site for site in ctx.compressed_sites if not site.lookups])
        widths: list[HiddenWidth | None] = []
        sites_by_node = {site.node: site for site in calls}
        if ctx.config.prune_neurons > 0:
            sites_by_entry = {site.entry_node: site for site in calls}
            widths += [neuron_width(gm, site, sites_by_node, sites_by_entry, nodes) for site in calls]
        if ctx.config.prune_heads > 0:
            widths += [head_width(gm, site, sites_by_node, nodes) for site in calls]
        found = _merged_calls([width for width in widths if width is not None], {site.name: site for site in ctx.sites}, nodes)
        ctx.hidden_widths = _absorb_squeeze_excitations(ctx, found)
        ctx.hidden_widths = _with_tokens_flattened_to_rows(gm, ctx.hidden_widths, ctx.check_inputs)
        if ctx.check_inputs is not None:
            ctx.hidden_widths = _with_per_head_reads(gm, ctx.hidden_widths, ctx.check_inputs)
        return gm

    def ensures(self, gm: fx.GraphModule, ctx: PassContext) -> str | None:
        kinds = {width.kind for width in ctx.hidden_widths}
        if ctx.config.prune_neurons > 0 and "neurons" not in kinds:
            raise SiteError(
                f"prune_neurons={ctx.config.prune_neurons} found no hidden width to prune: no compressed site's "
                "output reaches another compressed site through an elementwise activation alone (up -> "
                "activation -> down, as in a transformer's FFN, or act(gate(x)) * up(x) -> down; between pointwise "
                "convolutions also batch norms and depthwise or grouped convolutions, as in MobileNetV2, RegNet and ResNeXt, and a squeeze-excitation "
                "(x * gate(conv(act(conv(x.mean((2, 3), keepdim=True))))), as in EfficientNet, or of linear layers as in SENet), a depthwise convolution "
                "over tokens viewed as an image, as in PVT v2, and a BatchNorm1d of the tokens flattened to rows, as in LeViT); the layers of a weight "
                "several linear calls apply (ALBERT's shared layer) are sliced where each call of the down layer reads such a width of the same "
                "up layers' calls, without per-channel modules or a squeeze-excitation. Use prune_neurons=0 "
                "for this model, or check that `exclude` leaves every layer of such a group compressed"
            )
        if ctx.config.prune_heads > 0 and "heads" not in kinds:
            raise SiteError(
                f"prune_heads={ctx.config.prune_heads} found no attention heads to prune: no compressed site reads "
                "heads merged (transpose(1, 2), reshape to a literal width, -1 or a width read from a tensor's shape) from one "
                "scaled_dot_product_attention (or attention written out: matmul(q, k.transpose(-2, -1)), its einsum or bmm over batch * heads, scaled, "
                "masked, clamped, soft-capped by tanh, softmax over the last dim, matmul with v) whose query, key and value are split from three compressed sites "
                "(view (..., heads, head_dim), transpose(1, 2)), from one fused qkv site (reshape (..., 3, heads, "
                "head_dim), permute(2, 0, 3, 1, 4) or transpose(1, 3), or unbind(2) and transpose(1, 2) of each part; view(..., heads, 3 * head_dim), transpose(1, 2), "
                "chunk(3, dim=-1) or split(3 * [head_dim], dim=3); split(width, dim=-1) as GPT-2's or chunk(3, dim=-1) as MPT's or sliced x[..., :width], x[..., width:2 * width], x[..., 2 * width:] "
                "as Phi-3's, key and value narrower with grouped-query attention; split([width, kv_width, kv_width], dim=-1) as DBRX's, "
                "also of the output unsqueezed(1) as GPTBigCode's multi-query c_attn; view(..., groups or -1, 3 * size).split(size, dim=-1) in model-parallel groups of heads, each group's query, value and key side by side, pruned whole, as CodeGen's; view(..., groups, -1, head_dim) with each key/value group's "
                "query heads, key and value side by side, as Falcon's, or split([heads, 1, 1], dim=-2) as Falcon-7B's; a key/value site split so in two parts) or from nn.MultiheadAttention's "
                "packed in-projection, self- or cross-attention (captured with torch.export); rotary embeddings, casts and "
                "norms of each head may stand between the split and the attention, and a key/value head may be shared by a group of query heads or by all "
                "(repeated, or enable_gqa under torch.export). "
                "Not recognized: projections whose weights several linear calls apply unless each call of the output projection reads such an "
                "attention of the same projections' calls (ALBERT's shared layer does), relative position terms computed from the projections in the scores (DeBERTa-v2's), "
                "a shared key/value head sliced out of a fused site, "
                "per-head scales or norm weights between the heads and the projections, norms over all heads together "
                "(normalize each head over its head_dim, with one weight for all heads, to be recognized), and steps of a "
                "written-out attention other than those (or scores whose values something else reads too); "
                "use prune_heads=0 for this model, or check that `exclude` leaves the projections of a block compressed"
            )
        shared = [name for name in {s for w in ctx.hidden_widths for s in w.ups} if sum(name in w.ups for w in ctx.hidden_widths) > 1]
        if shared:
            return f"site '{shared[0]}' is the up-projection of two hidden widths"
        return None
