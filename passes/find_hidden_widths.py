"""Analysis (when prune_neurons or prune_heads > 0): find every hidden width between compressed sites
that can be sliced without changing anything else in the model: FFN neurons (`neuron_widths`) and
attention heads (`head_widths`), with the masks and biases an attention reads with one entry per head
(seen on the example inputs), which the student path reads sliced to its heads. Widths whose tokens
are flattened to rows (LeViT's batch norms) are kept where the example inputs show rows of neurons."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import fx, nn

from tunecomp_fx.errors import SiteError
from tunecomp_fx.head_widths import attention_reads, head_width
from tunecomp_fx.inputs import Inputs, call_model
from tunecomp_fx.neuron_widths import flattens_tokens, neuron_width
from tunecomp_fx.pipeline import GraphPass, PassContext, observing
from tunecomp_fx.sites import HiddenWidth


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
    reads = [(index, reader, tensor) for index, width in enumerate(widths) if width.kind == "heads" for reader, tensor in attention_reads(gm, width, nodes)]
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
    flattens = {name: nodes[name] for width in widths if width.kind == "neurons" for name in width.between if flattens_tokens(nodes[name])}
    if inputs is None:
        return [width for width in widths if not flattens.keys() & set(width.between)]
    shapes = _observed_shapes(gm, [(node, next(iter(node.users))) for node in flattens.values()], inputs)
    flat = {name for name, shape in zip(flattens, shapes) if len(shape) == 2}
    return [width for width in widths if not (flattens.keys() - flat) & set(width.between)]


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
        # a weight several linear calls share would have to keep the same neurons at each: not sliced
        compressed = [site for site in ctx.compressed_sites if not site.more_calls]
        widths: list[HiddenWidth | None] = []
        sites_by_node = {site.node: site for site in compressed}
        if ctx.config.prune_neurons > 0:
            sites_by_entry = {site.entry_node: site for site in compressed}
            widths += [neuron_width(gm, site, sites_by_node, sites_by_entry, nodes) for site in compressed]
        if ctx.config.prune_heads > 0:
            widths += [head_width(gm, site, sites_by_node, nodes) for site in compressed]
        ctx.hidden_widths = _absorb_squeeze_excitations(ctx, [width for width in widths if width is not None])
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
                "over tokens viewed as an image, as in PVT v2, and a BatchNorm1d of the tokens flattened to rows, as in LeViT); a layer whose weight "
                "several linear calls apply (ALBERT's shared layers) is not sliced. Use prune_neurons=0 "
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
                "also of the output unsqueezed(1) as GPTBigCode's multi-query c_attn; view(..., groups, -1, head_dim) with each key/value group's "
                "query heads, key and value side by side, as Falcon's, or split([heads, 1, 1], dim=-2) as Falcon-7B's; a key/value site split so in two parts) or from nn.MultiheadAttention's "
                "packed in-projection, self- or cross-attention (captured with torch.export); rotary embeddings, casts and "
                "norms of each head may stand between the split and the attention, and a key/value head may be shared by a group of query heads or by all "
                "(repeated, or enable_gqa under torch.export). "
                "Not recognized: projections whose weight several linear calls apply (ALBERT's shared layers), relative position terms computed from the projections in the scores (DeBERTa-v2's), a qkv in model-parallel groups (CodeGen's), "
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
