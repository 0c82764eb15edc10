"""Analysis (when prune_neurons or prune_heads > 0): find every hidden width between compressed sites
that can be sliced without changing anything else in the model.

- neurons (prune_neurons): an up-projection's output passes only through elementwise nodes (an
  activation, perhaps a dropout or an identity, or an activation written out in arithmetic on the
  width and numbers; reshapes of the tokens) into a down-projection, as in a transformer's FFN; a
  gated activation reads a second up-projection too (LLaMA's SwiGLU). Dropping a neuron removes a
  row of each up, the activation's element and a column of down.
- heads (prune_heads): the query, key and value sites each split their output into heads
  (view (..., heads, head_dim), swap to (batch, heads, seq, head_dim)), scaled_dot_product_attention
  reads them, and the heads are swapped back and merged into the output site's input. Dropping a
  head removes head_dim rows of each of query, key and value and head_dim columns of the output site;
  each head attends on its own, so the others compute what they did. A fused qkv site (timm's ViT:
  reshape (..., 3, heads, head_dim), permute(2, 0, 3, 1, 4), unbind(0)) loses the head's rows in
  each of its three parts. So does nn.MultiheadAttention's packed in-projection under torch.export
  (unflatten (..., 3, width), then select 0/1/2, each viewed as (seq, batch * heads, head_dim),
  swapped to batch-major and viewed as (batch, heads, seq, head_dim); the heads merged by
  permute(2, 0, 1, 3) and a reshape to (seq * batch, width); in cross-attention a query site and a
  key/value site packed in two parts), and a fused site split along its last
  dim into three blocks of width (Hugging Face's GPT-2: c_attn(x).split(width, dim=2)), each split
  into heads as the separate sites are. Rotary embeddings (LLaMA) may stand between a head split and
  the attention; with grouped-query attention a key/value head and the query heads that share it are
  one group, pruned together.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import fx, nn

from tunecomp_fx.errors import SiteError
from tunecomp_fx.forms import site_input
from tunecomp_fx.inputs import Inputs, call_model
from tunecomp_fx.pipeline import GraphPass, PassContext, observing
from tunecomp_fx.sites import HiddenWidth, Site

aten = torch.ops.aten

# Elementwise functions of one tensor: a neuron's output depends on that neuron's input alone.
_ACTIVATION_FUNCTIONS = {
    aten.gelu.default, aten.relu.default, aten.silu.default, aten.tanh.default, aten.sigmoid.default,
    aten.hardtanh.default, aten.hardswish.default, aten.hardsigmoid.default, aten.leaky_relu.default,
    aten.elu.default, aten.selu.default, aten.mish.default, aten.softplus.default,
    F.gelu, F.relu, F.silu, F.relu6, F.hardtanh, F.hardswish, F.hardsigmoid, F.leaky_relu, F.elu, F.selu,
    F.mish, F.softplus, torch.relu, torch.tanh, torch.sigmoid,
}
_ACTIVATION_METHODS = {"relu", "tanh", "sigmoid"}
_ACTIVATION_MODULES = (
    nn.GELU, nn.ReLU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.ReLU6, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid,
    nn.LeakyReLU, nn.ELU, nn.SELU, nn.Mish, nn.Softplus,
)
_DROPOUTS = {aten.dropout.default, F.dropout}
_RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, torch.reshape, "view", "reshape"}
_PERMUTES = {aten.permute.default, torch.permute, "permute"}
_SWAPS = {aten.transpose.int, torch.transpose, "transpose"} | _PERMUTES
_UNBINDS = {aten.unbind.int, torch.unbind, "unbind"}
_SPLITS = {aten.split.Tensor, torch.split, "split"}
_ATTENTION = {aten.scaled_dot_product_attention.default, F.scaled_dot_product_attention}


# Arithmetic of tensors and numbers: a neuron's output depends on that neuron alone when every tensor
# it reads is of the same width (an activation written out, as GPT-2's tanh GELU under torch.export).
_ARITHMETIC = {
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.pow.Tensor_Scalar,
    operator.add, operator.sub, operator.mul, operator.truediv, operator.pow,
    torch.add, torch.sub, torch.mul, torch.div, torch.pow, "add", "sub", "mul", "div", "pow",
}


def _elementwise(gm: fx.GraphModule, node: fx.Node, width: int) -> str | None:
    """"activation", "dropout", "identity" (timm's Mlp has an nn.Identity norm when the norm is off),
    "arithmetic" (`_ARITHMETIC`, of tensors and numbers), "reshape" (of the tokens: the width stays
    last), or None when `node` is none of them. Which tensors it reads is the caller's to check."""
    if _is(node, _ARITHMETIC):
        return "arithmetic" if not node.kwargs and all(isinstance(a, (fx.Node, int, float)) for a in node.args) else None
    if _is(node, _RESHAPES):
        return "reshape" if _keeps_width_last(node, width) else None
    tensors = node.all_input_nodes
    if len(tensors) != 1 or node.args[:1] != (tensors[0],):
        return None
    if node.op == "call_function":
        return "activation" if node.target in _ACTIVATION_FUNCTIONS else "dropout" if node.target in _DROPOUTS else None
    if node.op == "call_method":
        return "activation" if node.target in _ACTIVATION_METHODS else None
    if node.op == "call_module":
        if _is_identity(gm, node):
            return "identity"
        module = gm.get_submodule(node.target)
        return "activation" if isinstance(module, _ACTIVATION_MODULES) else "dropout" if isinstance(module, nn.Dropout) else None
    return None


def _elementwise_region(gm: fx.GraphModule, starts: list[fx.Node], width: int) -> tuple[dict[fx.Node, str], fx.Node | None] | None:
    """The nodes `_elementwise` reaches from `starts`, with their kinds (the starts' is "up"), and the
    one other node that reads them; None as soon as a second one does (a residual stream would
    otherwise take the walk through the rest of the model)."""
    kinds = dict.fromkeys(starts, "up")
    queue, readers = list(starts), set()
    while queue:
        for user in queue.pop().users:
            kind = kinds.get(user) or _elementwise(gm, user, width)
            if kind is None:
                readers.add(user)
                if len(readers) > 1:
                    return None
            elif user not in kinds:
                kinds[user] = kind
                queue.append(user)
    return kinds, next(iter(readers), None)


def neuron_width(
    gm: fx.GraphModule, up: Site, sites_by_node: dict[str, Site], sites_by_entry: dict[str, Site], nodes: dict[str, fx.Node]
) -> HiddenWidth | None:
    """The width `up` computes, if elementwise nodes alone (`_elementwise`, one an activation) lead from
    it to one compressed site's input, reading nothing but it, each other and other compressed sites
    of the same width and layout (a gated activation, act(gate(x)) * up(x), as in LLaMA's SwiGLU).
    The sites share the width's neurons; it is found from the first of them in the graph."""
    width, starts = up.out_features, [nodes[up.node]]
    while True:
        region = _elementwise_region(gm, starts, width)
        if region is None:
            return None
        kinds, reader = region
        # tensors read from outside the region (a reshape's sizes may come from anywhere): other ups, or none
        reads = (([_data_input(n)] if kind == "reshape" else n.all_input_nodes) for n, kind in kinds.items() if kind != "up")
        outside = {tensor for tensors in reads for tensor in tensors} - kinds.keys()
        gates = [t for t in outside if (site := sites_by_node.get(t.name)) and (site.layout, site.out_features) == (up.layout, width)]
        if len(gates) < len(outside):
            return None
        if not gates:
            break
        starts += gates
    leaving = [n for n in kinds if reader in n.users]
    down = sites_by_entry.get(reader.name) if reader is not None else None
    if down is None or len(leaving) != 1 or "activation" not in kinds.values():
        return None
    [output] = leaving
    if site_input(reader) is not output or len(output.users) != 1 or down.in_features != width:
        return None
    ups = tuple(sites_by_node[name].name for name in nodes if kinds.get(nodes[name]) == "up")
    if ups[0] != up.name:
        return None
    between = tuple(name for name in nodes if kinds.get(nodes[name], "up") != "up")
    resized = _width_sizes([n for n, kind in kinds.items() if kind == "reshape"], width)
    return HiddenWidth("neurons", ups, down.name, between, width, resized=tuple(resized.items()))


def shape_entries(node: fx.Node) -> list:
    """The sizes a node sets: the shape a view/reshape asks for (one list or separate arguments), the
    sizes of an unflatten, or the factors of a product that computes a size (batch * heads under
    torch.export)."""
    if node.target is aten.unflatten.int:
        return list(node.args[2])
    if node.target is operator.mul:
        return list(node.args)
    rest = node.args[1:]
    return list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else list(rest)


def with_shape(node: fx.Node, entries: Sequence) -> tuple:
    """`node`'s arguments with its sizes (`shape_entries`) replaced, in the form the node gave them."""
    if node.target is aten.unflatten.int:
        return (*node.args[:2], list(entries))
    if node.target is operator.mul:
        return tuple(entries)
    rest = node.args[1:]
    packed = len(rest) == 1 and isinstance(rest[0], (list, tuple))
    return (node.args[0], list(entries)) if packed else (node.args[0], *entries)


def rescale_shape_entry(node: fx.Node, index: int, kept: int, width: int) -> None:
    """Scale the size `index` of a node (`shape_entries`), which counts `width` neurons (or their
    heads), to `kept` of them."""
    entries = shape_entries(node)
    entries[index] = entries[index] * kept // width
    node.args = with_shape(node, entries)


def _keeps_width_last(node: fx.Node, width: int) -> bool:
    """Whether a reshape leaves `width` as the last dim, by name or inferred (a reshape of the tokens)."""
    return _is(node, _RESHAPES) and shape_entries(node)[-1:] in ([-1], [width])


def _width_sizes(reshapes: Sequence[fx.Node], width: int) -> dict[str, int]:
    """Reshape name -> index of its last size, for the reshapes that name `width` there (the student
    copy scales them to what is kept)."""
    return {n.name: len(shape_entries(n)) - 1 for n in reshapes if shape_entries(n)[-1] == width}


def _is(node: fx.Node, targets: set) -> bool:
    return node.op in ("call_function", "call_method") and node.target in targets


def _dims(node: fx.Node) -> tuple:
    """The dims a transpose, permute or unbind names, whether given as one list or as separate arguments."""
    dims = node.args[1:]
    return tuple(dims[0]) if len(dims) == 1 and isinstance(dims[0], (list, tuple)) else tuple(dims)


def _swaps_heads_and_sequence(node: fx.Node) -> bool:
    """transpose(1, 2) or permute(0, 2, 1, 3) of a 4-d (batch, seq, heads, head_dim) tensor."""
    dims = _dims(node)
    if node.target in _PERMUTES:
        return dims == (0, 2, 1, 3)
    return set(dims) in ({1, 2}, {-3, -2})


def _merges_heads(node: fx.Node) -> bool:
    """A swap of a (batch, heads, seq, head_dim) tensor that leaves heads then head_dim last, ready to
    merge: transpose(1, 2), permute(0, 2, 1, 3), or permute(2, 0, 1, 3) (seq first, nn.MultiheadAttention)."""
    return _swaps_heads_and_sequence(node) or (node.target in _PERMUTES and _dims(node) == (2, 0, 1, 3))


def _is_identity(gm: fx.GraphModule, node: fx.Node) -> bool:
    """An nn.Identity call (timm's q_norm, k_norm and norm when those norms are off)."""
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Identity)


def _data_input(node: fx.Node) -> fx.Node | None:
    """The tensor a reshape, swap, contiguous or identity reads (its other inputs are sizes)."""
    return node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None


_PASS_THROUGH = _RESHAPES | _SWAPS | {"contiguous"}


def _chain_back(gm: fx.GraphModule, end: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """Walk back from `end` through reshapes, swaps, contiguous copies and identities, each read by
    the next alone: the first other node reached, and the chain in graph order (`end` last)."""
    chain, current = [], end
    while (_is(current, _PASS_THROUGH) or _is_identity(gm, current)) and len(current.users) == 1:
        chain.append(current)
        source = _data_input(current)
        if source is None:
            break
        current = source
    return current, chain[::-1]


def _head_size(heads: object, head_dim: object, width: int) -> int | None:
    """The head size, if the sizes (heads or -1, head_dim) or (heads, -1) of a view split `width` into
    heads (BEiT writes reshape(..., 3, heads, -1))."""
    if isinstance(head_dim, int) and head_dim >= 1 and width % head_dim == 0 and heads in (-1, width // head_dim):
        return head_dim
    if head_dim == -1 and isinstance(heads, int) and heads >= 1 and width % heads == 0:
        return width // heads
    return None


class _HeadSplit(NamedTuple):
    """How query, key or value is split into heads: the head size, the sizes that count heads (node
    name -> index, scaled to the kept heads in the student path) and the nodes computing batch * heads."""

    head_dim: int
    sizes: dict[str, int]
    products: list[fx.Node]


def _sequence_major_split(chain: list[fx.Node], width: int) -> _HeadSplit | None:
    """If `chain` is view(..., heads or -1, head_dim) then one heads/sequence swap (Hugging Face's BERT)."""
    reshapes = [n for n in chain if _is(n, _RESHAPES)]
    swaps = [n for n in chain if _is(n, _SWAPS)]
    if len(reshapes) != 1 or len(swaps) != 1 or chain[0] is not reshapes[0] or not _swaps_heads_and_sequence(swaps[0]):
        return None
    entries = shape_entries(reshapes[0])
    head_dim = _head_size(entries[-2], entries[-1], width) if len(entries) == 4 else None
    if head_dim is None:
        return None
    return _HeadSplit(head_dim, {reshapes[0].name: 2} if entries[2] == width // head_dim else {}, [])


class _Projections(NamedTuple):
    """The query, key and value projections of an attention block and the nodes that split their heads."""

    ups: tuple[str, ...]
    head_dim: int
    resized: dict[str, int]  # node name -> index of a size that counts heads
    between: list[fx.Node]
    parts: tuple[int, ...]  # per up site
    repeats: tuple[int, ...] = ()  # per up site: query heads sharing each of its heads


def _site_of(node: fx.Node, sites_by_node: dict[str, Site], width: int, parts: int) -> Site | None:
    """The compressed linear site whose output `node` is, if it holds `parts` copies of `width` and is read once."""
    up = sites_by_node.get(node.name)
    return up if up is not None and up.layout == "linear" and up.out_features == parts * width and len(node.users) == 1 else None


def _part(node: fx.Node) -> tuple[fx.Node, int] | None:
    """(x, i) if `node` is x[i] along x's first dim: getitem of unbind(x, 0) (timm), getitem of x
    itself (`q, k, v = x` under symbolic tracing) or select(x, 0, i) (torch.export)."""
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node):
        source, index = node.args
        if _is(source, _UNBINDS) and (_dims(source) or (source.kwargs.get("dim", 0),)) == (0,):
            return _data_input(source), index
        return (source, index) if _is(source, _PERMUTES) else None
    if _is(node, {aten.select.int}) and node.args[1] == 0:
        return node.args[0], node.args[2]
    return None


def _fused_projection(gm: fx.GraphModule, attention: fx.Node, width: int, sites_by_node: dict[str, Site]) -> _Projections | None:
    """Query, key and value from one compressed site of 3 x `width` outputs, split by
    reshape(..., 3, heads, head_dim) and permute(2, 0, 3, 1, 4) into three parts along the first dim
    (timm's ViT); identities may stand between the parts and the attention."""
    parts, identities = [], []
    for query_key_or_value in attention.args[:3]:
        if not isinstance(query_key_or_value, fx.Node):
            return None
        item, chain = _chain_back(gm, query_key_or_value)
        if not all(_is_identity(gm, n) for n in chain):
            return None
        parts.append((item, _part(item)))
        identities += chain
    permute = parts[0][1][0] if parts[0][1] else None
    if any(part is None or part[0] is not permute for _, part in parts) or sorted(part[1] for _, part in parts) != [0, 1, 2]:
        return None
    items = [item for item, _ in parts]
    unbinds = {item.args[0] for item in items if item.args[0] is not permute}
    if any(set(unbind.users) != set(items) for unbind in unbinds) or set(permute.users) != (unbinds or set(items)):
        return None
    if not _is(permute, _PERMUTES) or _dims(permute) != (2, 0, 3, 1, 4):
        return None
    split = _data_input(permute)
    if split is None or not _is(split, _RESHAPES) or len(split.users) != 1:
        return None
    source, entries = _data_input(split), shape_entries(split)
    up = _site_of(source, sites_by_node, width, 3) if source is not None else None
    if up is None:
        return None
    head_dim = _head_size(entries[3], entries[4], width) if len(entries) == 5 and entries[2] == 3 else None
    if head_dim is None:
        return None
    resized = {split.name: 3} if entries[3] == width // head_dim else {}
    return _Projections((up.name,), head_dim, resized, [split, permute, *unbinds, *items, *identities], parts=(3,))


def _batch_times_heads(node: fx.Node, index: int, heads: int) -> tuple[dict[str, int], list[fx.Node]] | None:
    """If size `index` of `node` is batch * heads: the size to rescale (node name -> index) and the
    product computing it, if any. A static batch makes it one literal; a dynamic one, a product of the
    batch's size and the literal head count (a node of its own)."""
    size = shape_entries(node)[index]
    if isinstance(size, int) and size > 0 and size % heads == 0:
        return {node.name: index}, []
    if isinstance(size, fx.Node) and size.target is operator.mul and list(size.args).count(heads) == 1:
        return {size.name: list(size.args).index(heads)}, [size]
    return None


def _batch_major_split(chain: list[fx.Node], width: int) -> _HeadSplit | None:
    """If `chain` is view(seq, batch * heads, head_dim), transpose(0, 1), view(batch, heads, seq,
    head_dim): nn.MultiheadAttention's head split."""
    if len(chain) != 3 or not (_is(chain[0], _RESHAPES) and _is(chain[1], _SWAPS) and _is(chain[2], _RESHAPES)):
        return None
    split, swap, batch_major = chain
    entries, final = shape_entries(split), shape_entries(batch_major)
    if len(entries) != 3 or len(final) != 4 or set(_dims(swap)) != {0, 1}:
        return None
    head_dim = entries[2]
    if final[3] != head_dim or _head_size(final[1], head_dim, width) != head_dim:
        return None
    heads = width // head_dim
    batch_heads = _batch_times_heads(split, 1, heads)
    if batch_heads is None:
        return None
    sizes, products = batch_heads
    return _HeadSplit(head_dim, sizes | ({batch_major.name: 1} if final[1] == heads else {}), products)


def _mask_expanded_over_heads(mask: fx.Node, heads: int) -> tuple[list[fx.Node], dict[str, int]] | None:
    """(the nodes, the sizes that count heads) if `mask` is a mask expanded over the heads as
    nn.MultiheadAttention expands its key padding mask: expand(-1, heads, -1, -1), reshape(batch *
    heads, 1, keys), view(batch, heads, -1, keys). The mask it expands is checked to have one entry
    for all heads (`_per_head_masks`)."""
    reshape = _data_input(mask) if _is(mask, _RESHAPES) else None
    expand = _data_input(reshape) if reshape is not None and _is(reshape, _RESHAPES) else None
    if expand is None or expand.target is not aten.expand.default or len(reshape.users) != 1 or len(expand.users) != 1:
        return None
    view_heads = shape_entries(mask)[1:2] if len(shape_entries(mask)) == 4 else None
    if view_heads not in ([-1], [heads]) or len(shape_entries(reshape)) != 3 or shape_entries(expand)[:2] != [-1, heads]:
        return None
    batch_heads = _batch_times_heads(reshape, 0, heads)
    if batch_heads is None:
        return None
    sizes, products = batch_heads
    return [*products, expand, reshape, mask], sizes | {expand.name: 1} | ({mask.name: 1} if view_heads == [heads] else {})


# nn.MultiheadAttention's packing of its in-projection's output (x.unflatten(-1, (parts, width)).unsqueeze(0)
# .transpose(0, -2).squeeze(-2).contiguous()) as torch.export records it, read back from the parts:
# (target, arguments after the tensor).
_PACKED_PARTS = (
    (aten.contiguous.default, ()), (aten.squeeze.dim, (-2,)), (aten.transpose.int, (0, -2)), (aten.unsqueeze.default, (0,)),
)


class _Source(NamedTuple):
    """Where query, key or value comes from: part `part` of the `parts` copies of the width side by side
    in compressed site `up`'s output, which `reader` takes from `shared` (the site's output itself when
    it holds one copy), then split into heads; `nodes` from the site to the split, `sizes` those of
    them that count the width."""

    up: Site
    part: int
    parts: int
    shared: fx.Node
    reader: fx.Node
    split: _HeadSplit
    nodes: list[fx.Node]
    sizes: dict[str, int]
    repeats: int = 1


# (site, part, parts, the node the parts are read from, the nodes from the site to it, the sizes of them counting the width)
_Part = tuple[Site, int, int, fx.Node, list[fx.Node], dict[str, int]]


def _packed_part(item: fx.Node, width: int, sites_by_node: dict[str, Site]) -> _Part | None:
    """(site, part, parts, packed, nodes, sizes) if `item` is select(packed, 0, i) of a site's output packed
    as nn.MultiheadAttention packs it: 3 copies for self-attention, 2 (key, value) for cross-attention."""
    if not _is(item, {aten.select.int}) or item.args[1] != 0:
        return None
    packed = node = item.args[0]
    packing = []
    for target, arguments in _PACKED_PARTS:
        if node.target is not target or tuple(node.args[1:]) != arguments or (packing and len(node.users) != 1):
            return None
        packing.append(node)
        node = node.args[0]
    unflatten, entries = node, list(node.args[2]) if node.target is aten.unflatten.int else []
    if unflatten.args[1:2] != (-1,) or len(entries) != 2 or entries[1] != width or len(unflatten.users) != 1:
        return None
    up = _site_of(unflatten.args[0], sites_by_node, width, entries[0])
    return (up, item.args[2], entries[0], packed, [unflatten, *packing], {unflatten.name: 1}) if up is not None else None


def _splits_last_dim_into_blocks(node: fx.Node, width: int) -> bool:
    """Whether `node` splits its input along the last dim into blocks of `width` (x.split(width, dim=-1),
    or dim=2 of a 3-d x as GPT-2 writes it; torch.export records the input's rank)."""
    if not _is(node, _SPLITS) or len(node.args) < 2 or node.args[1] != width:
        return False
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    value = node.args[0].meta.get("val")
    return dim == -1 or (isinstance(value, torch.Tensor) and dim == value.dim() - 1)


def _block_part(gm: fx.GraphModule, item: fx.Node, width: int, sites_by_node: dict[str, Site]) -> _Part | None:
    """(site, part, parts, blocks, nodes, sizes) if `item` is block i of a site's output split along its
    last dim into blocks of `width`, perhaps after reshapes of its tokens (Hugging Face's GPT-2)."""
    if item.target is not operator.getitem or not _splits_last_dim_into_blocks(item.args[0], width):
        return None
    blocks = item.args[0]
    source, tokens = _chain_back(gm, blocks.args[0])
    up = sites_by_node.get(source.name)
    parts = up.out_features // width if up is not None else 0
    if not parts or _site_of(source, sites_by_node, width, parts) is None:
        return None
    if not all(_keeps_width_last(n, parts * width) for n in tokens):
        return None
    return up, item.args[1], parts, blocks, [*tokens, blocks], _width_sizes(tokens, parts * width) | {blocks.name: 0}


# Nodes that compute each head of a (batch, heads, seq, head_dim) tensor from that head alone, given
# other tensors broadcast over the heads and slices and concatenation along head_dim: rotary embeddings.
_WITHIN_HEADS = {aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.neg.default, aten.slice.Tensor, aten.cat.default}


def _along_head_dim(node: fx.Node) -> bool:
    """Whether a slice or concatenation works along the last dim (anything else: true)."""
    if node.target not in (aten.slice.Tensor, aten.cat.default):
        return True
    dim = node.args[1] if len(node.args) > 1 else 0
    tensor = node.args[0][0] if node.target is aten.cat.default else node.args[0]
    value = tensor.meta.get("val")
    return isinstance(value, torch.Tensor) and dim in (-1, value.dim() - 1)


def _per_head_nodes(end: fx.Node) -> tuple[fx.Node, list[fx.Node]] | None:
    """If `end` is computed by `_WITHIN_HEADS` nodes from one (batch, heads, seq, head_dim) tensor and
    tensors broadcast over the heads (size 1 at dim -3), as rotary embeddings are under torch.export
    (which records the shapes): that tensor and the nodes; none of them is read from outside."""
    region: set[fx.Node] = set()
    stack, heads = [end], set()
    while stack:
        node = stack.pop()
        if node in region:
            continue
        if _is(node, _WITHIN_HEADS) and _along_head_dim(node):
            region.add(node)
            stack.extend(node.all_input_nodes)
            continue
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor):
            return None
        if value.dim() >= 3 and value.shape[-3] != 1:
            heads.add(node)
    if not region or len(heads) != 1 or len(end.users) != 1:
        return None
    [root] = heads
    if any(not set(node.users) <= region for node in (region - {end}) | heads):
        return None
    return root, list(region)


def _is_whole_slice(node: fx.Node) -> bool:
    """x[:] along some dim: a slice from 0 to the end (torch.export records x[:, :, None] with them)."""
    start, end = (list(node.args[2:4]) + [None, None])[:2]
    return node.target is aten.slice.Tensor and start in (0, None) and (end is None or end >= 2**62)


def _repeated_heads(end: fx.Node) -> tuple[fx.Node, list[fx.Node], int, dict[str, int]] | None:
    """If `end` repeats each head of a (batch, heads, seq, head_dim) tensor, as grouped-query attention
    does (LLaMA's repeat_kv: x[:, :, None].expand(b, heads, repeats, t, d).reshape(b, heads * repeats,
    t, d)): that tensor, the nodes, the repeats and the sizes that count heads."""
    expand = _data_input(end) if _is(end, _RESHAPES) and len(end.users) == 1 else None
    if expand is None or expand.target is not aten.expand.default or len(expand.users) != 1:
        return None
    nodes, node = [expand, end], _data_input(expand)
    while node is not None and len(node.users) == 1 and (_is_whole_slice(node) or (node.target is aten.unsqueeze.default and node.args[1] == 2)):
        nodes.insert(0, node)
        node = _data_input(node)
    entries, merged = shape_entries(expand), shape_entries(end)
    if [n.target for n in nodes].count(aten.unsqueeze.default) != 1 or len(entries) != 5 or len(merged) != 4:
        return None
    heads, repeats = entries[1], entries[2]
    if not (isinstance(heads, int) and isinstance(repeats, int) and heads > 0 and repeats > 0) or merged[1] not in (-1, heads * repeats):
        return None
    return node, nodes, repeats, {expand.name: 1} | ({end.name: 1} if merged[1] == heads * repeats else {})


def _source(gm: fx.GraphModule, query_key_or_value: object, width: int, sites_by_node: dict[str, Site], shared_by: int = 1) -> _Source | None:
    """Where `query_key_or_value` comes from, if it is split into heads (sequence- or batch-major) from a
    site's output of one copy of `width`, or from a part of a packed or block-split output; rotary
    embeddings may stand between the split and the attention (`_per_head_nodes`), and the heads of a
    key or value may be repeated for groups of query heads (`_repeated_heads`), or each shared by
    `shared_by` query heads in the attention itself (enable_gqa); the site's output then holds
    width / repeats."""
    if not isinstance(query_key_or_value, fx.Node):
        return None
    repeated = _repeated_heads(query_key_or_value)
    end, repeat_nodes, repeats, repeat_sizes = repeated if repeated is not None else (query_key_or_value, [], shared_by, {})
    if width % repeats:
        return None
    width //= repeats
    item, chain = _chain_back(gm, end)
    rotary = _per_head_nodes(end) if not chain else None
    if rotary is not None and _is(rotary[0], _PASS_THROUGH) and _data_input(rotary[0]) is not None:
        item, chain = _chain_back(gm, _data_input(rotary[0]))
        chain.append(rotary[0])  # the split's last node, read by the rotary embedding alone
    split = (_sequence_major_split(chain, width) or _batch_major_split(chain, width)) if chain else None
    if split is None:
        return None
    after_split = [*(rotary[1] if rotary is not None else []), *repeat_nodes]
    up = _site_of(item, sites_by_node, width, 1)
    if up is not None:
        return _Source(up, 0, 1, item, chain[0], split, [*chain, *after_split], repeat_sizes, repeats)
    part = _packed_part(item, width, sites_by_node) or _block_part(gm, item, width, sites_by_node)
    if part is None:
        return None
    up, index, parts, shared, nodes, sizes = part
    return _Source(up, index, parts, shared, item, split, [*nodes, item, *chain, *after_split], sizes | repeat_sizes, repeats)


def _heads_per_key_value_head(attention: fx.Node) -> int | None:
    """How many query heads share each key/value head inside the attention: 1, or with enable_gqa the
    ratio of their head counts (torch.export records the shapes; None when unknown)."""
    if not attention.kwargs.get("enable_gqa", False):
        return 1
    query, key = (argument.meta.get("val") for argument in attention.args[:2])
    if not isinstance(query, torch.Tensor) or not isinstance(key, torch.Tensor) or query.shape[-3] % key.shape[-3]:
        return None
    return int(query.shape[-3] // key.shape[-3])


def _projections(gm: fx.GraphModule, attention: fx.Node, width: int, sites_by_node: dict[str, Site]) -> _Projections | None:
    """Query, key and value each from a compressed site or a part of one (`_source`), every part of each
    site read once: three sites (BERT, MiniLM; nn.MultiheadAttention with its in-projection in blocks),
    one packed or block-split site (nn.MultiheadAttention's self-attention, GPT-2), or a query site and
    a packed key/value site (nn.MultiheadAttention's cross-attention)."""
    shared_by = _heads_per_key_value_head(attention)
    if shared_by is None:
        return None
    sources = [_source(gm, argument, width, sites_by_node, 1 if index == 0 else shared_by) for index, argument in enumerate(attention.args[:3])]
    if any(source is None for source in sources) or len({source.split.head_dim for source in sources}) != 1:
        return None
    for shared in {source.shared for source in sources}:
        parts = [source for source in sources if source.shared is shared]
        if set(shared.users) != {source.reader for source in parts} or sorted(source.part for source in parts) != list(range(parts[0].parts)):
            return None
    if sources[0].repeats != 1 or sources[1].repeats != sources[2].repeats:
        return None  # the queries' heads are the groups; key and value repeat theirs alike
    ups = {source.up.name: (source.parts, source.repeats) for source in sources}
    resized = {name: index for source in sources for name, index in (source.sizes | source.split.sizes).items()}
    between = [node for source in sources for node in (*source.nodes, *source.split.products)]
    parts, repeats = zip(*ups.values())
    return _Projections(tuple(ups), sources[0].split.head_dim, resized, between, parts, repeats if max(repeats) > 1 else ())


def head_width(gm: fx.GraphModule, down: Site, sites_by_node: dict[str, Site], nodes: dict[str, fx.Node]) -> HiddenWidth | None:
    """The attention heads `down` reads, if its input is merged from the heads of one
    scaled_dot_product_attention whose query, key and value are split from compressed sites: one
    each, or one fused site (in parts or in blocks)."""
    width = down.in_features
    attention, after = _chain_back(gm, site_input(nodes[down.entry_node]))
    if not _is(attention, _ATTENTION) or len(attention.users) != 1:
        return None
    swaps = [n for n in after if _is(n, _SWAPS)]
    if len(swaps) != 1 or not _merges_heads(swaps[0]):
        return None
    # the first reshape after the swap merges the heads; later ones (a flattening of the tokens) keep the width last
    merged = after[after.index(swaps[0]) + 1 :]
    reshapes = [n for n in merged if _is(n, _RESHAPES)]
    if not reshapes or not all(_keeps_width_last(n, width) for n in reshapes):
        return None
    if not all(_is_identity(gm, n) for n in merged[merged.index(reshapes[0]) + 1 :] if n not in reshapes):
        return None
    projections = _projections(gm, attention, width, sites_by_node) or _fused_projection(gm, attention, width, sites_by_node)
    if projections is None:
        return None
    head_dim = projections.head_dim
    heads = width // head_dim
    # reshapes between attention and the merge must keep (heads, head_dim) apart without naming the head count
    if any(_is(n, _RESHAPES) and (shape_entries(n)[-1:] != [head_dim] or heads in shape_entries(n)[:-1]) for n in after[: after.index(reshapes[0])]):
        return None
    resized, mask_nodes = projections.resized, []
    resized |= _width_sizes(reshapes, width)
    mask = _mask_argument(attention)
    expansion = _mask_expanded_over_heads(mask, heads) if mask is not None else None
    if expansion is not None:  # the student path expands the mask over its kept heads
        mask_nodes, mask_sizes = expansion
        resized |= mask_sizes
    names = {node.name for node in (attention, *after, *projections.between, *mask_nodes)}
    ordered = tuple(name for name in nodes if name in names)
    # grouped-query attention: a key/value head and the query heads sharing it are pruned together
    group = head_dim * max(projections.repeats, default=1)
    return HiddenWidth("heads", projections.ups, down.name, ordered, width, group, tuple(resized.items()), parts=projections.parts, repeats=projections.repeats)


class _ShapeObserver(nn.Module):
    """Records the shape of what it passes on (inserted for one run, then removed)."""

    def __init__(self) -> None:
        super().__init__()
        self.shape: tuple[int, ...] = ()

    def forward(self, x: torch.Tensor | None) -> torch.Tensor | None:
        self.shape = tuple(x.shape) if isinstance(x, torch.Tensor) else ()  # an optional mask may be None
        return x


def _mask_argument(attention: fx.Node) -> fx.Node | None:
    """The attn_mask tensor a scaled_dot_product_attention reads, if any."""
    mask = attention.kwargs.get("attn_mask", attention.args[3] if len(attention.args) > 3 else None)
    return mask if isinstance(mask, fx.Node) else None


def _attention_mask(width: HiddenWidth, nodes: dict[str, fx.Node]) -> tuple[fx.Node, fx.Node] | None:
    """(the node of the width that reads an attention mask from outside it, that mask), if the width's
    attention reads one: the attn_mask itself, or the mask an expansion over the heads reads."""
    [reader] = [nodes[name] for name in width.between if _is(nodes[name], _ATTENTION)]
    mask = _mask_argument(reader)
    while mask is not None and mask.name in width.between:
        reader, mask = mask, _data_input(mask)
    return (reader, mask) if mask is not None else None


def _per_head_masks(gm: fx.GraphModule, widths: list[HiddenWidth], inputs: Inputs) -> dict[str, tuple[int, ...]]:
    """Site -> shape of the attention mask it reads through the heads, for masks with one entry per
    head (size > 1 at dim -3): one run on `inputs` with an observer on each mask."""
    nodes = {node.name: node for node in gm.graph.nodes}
    masks = {width.down: read for width in widths if width.kind == "heads" and (read := _attention_mask(width, nodes)) is not None}
    if not masks:
        return {}
    observers = {down: _ShapeObserver() for down in masks}
    routes = [(mask, reader, observers[down]) for down, (reader, mask) in masks.items()]
    with observing(gm, "_tunecomp_mask_observers", routes), torch.no_grad():
        call_model(gm, inputs)
    return {down: observer.shape for down, observer in observers.items() if len(observer.shape) >= 3 and observer.shape[-3] > 1}


class FindHiddenWidths(GraphPass):
    name = "find_hidden_widths"
    preserves_outputs = True

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> str | None:
        return None if ctx.sites else "no sites (run find_linear_sites first)"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        nodes = {node.name: node for node in gm.graph.nodes}
        compressed = ctx.compressed_sites
        widths: list[HiddenWidth | None] = []
        sites_by_node = {site.node: site for site in compressed}
        if ctx.config.prune_neurons > 0:
            sites_by_entry = {site.entry_node: site for site in compressed}
            widths += [neuron_width(gm, site, sites_by_node, sites_by_entry, nodes) for site in compressed]
        if ctx.config.prune_heads > 0:
            widths += [head_width(gm, site, sites_by_node, nodes) for site in compressed]
        ctx.hidden_widths = [width for width in widths if width is not None]
        per_head = _per_head_masks(gm, ctx.hidden_widths, ctx.check_inputs) if ctx.check_inputs is not None else {}
        if per_head:
            down, shape = next(iter(per_head.items()))
            raise SiteError(
                f"prune_heads={ctx.config.prune_heads} cannot prune the heads site '{down}' reads: its attention's "
                f"attn_mask has one entry per head (shape {shape}), which pruned heads would leave unmatched. Use "
                "prune_heads=0 for this model, or give a mask that broadcasts over the heads (size 1 at dim -3)"
            )
        return gm

    def ensures(self, gm: fx.GraphModule, ctx: PassContext) -> str | None:
        kinds = {width.kind for width in ctx.hidden_widths}
        if ctx.config.prune_neurons > 0 and "neurons" not in kinds:
            raise SiteError(
                f"prune_neurons={ctx.config.prune_neurons} found no hidden width to prune: no compressed site's "
                "output reaches another compressed site through an elementwise activation alone (up -> "
                "activation -> down, as in a transformer's FFN, or act(gate(x)) * up(x) -> down). Use prune_neurons=0 "
                "for this model, or check that `exclude` leaves every layer of such a group compressed"
            )
        if ctx.config.prune_heads > 0 and "heads" not in kinds:
            raise SiteError(
                f"prune_heads={ctx.config.prune_heads} found no attention heads to prune: no compressed site reads "
                "heads merged (transpose(1, 2), reshape to a literal width or -1) from one "
                "scaled_dot_product_attention whose query, key and value are split from three compressed sites "
                "(view (..., heads, head_dim), transpose(1, 2)), from one fused qkv site (reshape (..., 3, heads, "
                "head_dim), permute(2, 0, 3, 1, 4), or split(width, dim=-1) as GPT-2's) or from nn.MultiheadAttention's "
                "packed in-projection, self- or cross-attention (captured with torch.export); rotary embeddings may stand "
                "between the split and the attention, and a key/value head may be shared by a group of query heads "
                "(repeated, or enable_gqa under torch.export). "
                "Hand-written attention (matmul, softmax), a merge to a width read from a tensor's shape and norms or "
                "per-head scales between the heads and the projections are not recognized; "
                "use prune_heads=0 for this model, or check that `exclude` leaves the projections of a block compressed"
            )
        shared = [name for name in {s for w in ctx.hidden_widths for s in w.ups} if sum(name in w.ups for w in ctx.hidden_widths) > 1]
        if shared:
            return f"site '{shared[0]}' is the up-projection of two hidden widths"
        return None
