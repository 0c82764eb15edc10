"""Head widths (prune_heads): the query, key and value sites each split their output into heads
(view (..., heads, head_dim), swap to (batch, heads, seq, head_dim)), an attention reads them
(scaled_dot_product_attention, or written out: softmax(scale * q @ k^T + mask) @ v, as Hugging
Face's eager attention, also with bmm over the heads merged into the batch, as XGLM's and
BLOOM's, or with einsum, as CvT's), and the heads are swapped back and merged into the output site's input. Dropping a head
removes head_dim rows of each of query, key and value and head_dim columns of the output site; each
head attends on its own, so the others compute what they did. A fused qkv site (timm's ViT:
reshape (..., 3, heads, head_dim), permute(2, 0, 3, 1, 4), unbind(0); timm's MaxViT: the same reshape,
transpose(1, 3), unbind(2); ModernBERT: the same reshape, unbind(2), each part transpose(1, 2)) loses the
head's rows in each of its three parts; one holding each head's
parts side by side (MaxViT's other layout, and GPT-NeoX's: view (..., heads, 3 * head_dim), transpose(1, 2),
chunk(3, dim=-1); GPTBigCode's split(3 * [head_dim], dim=3)) loses the head's block of rows (`HiddenWidth.per_head_parts`); a key/value site split
the same way in two parts beside a query site (PVT v2) loses the head's rows in both. So does
nn.MultiheadAttention's packed in-projection under torch.export (unflatten (..., 3, width), then
select 0/1/2, each viewed as (seq, batch * heads, head_dim), swapped
to batch-major and viewed as (batch, heads, seq, head_dim); the heads merged by permute(2, 0, 1, 3)
and a reshape to (seq * batch, width); in cross-attention a query site and a key/value site packed
in two parts), and a fused site split along its last dim into three blocks of width (Hugging Face's
GPT-2: c_attn(x).split(width, dim=2); MPT: Wqkv(x).chunk(3, dim=2); Phi-3: qkv[..., :width], qkv[..., width:2 * width],
qkv[..., 2 * width:]), each split into heads as the separate sites are. Rotary
embeddings (LLaMA) may stand between a head split and the attention, a scale by a number between a
site and its split (OPT's query), and norms over each head's
head_dim with one weight for all heads (timm's qk_norm; Qwen3's q_norm and k_norm; Persimmon's on the
parts of its fused view); with grouped-query
attention a key/value head and the query heads that share it are one group, pruned together, also
when key and value are narrower slices of one fused site than the query (Phi-3-medium, Phi-4-mini)
or narrower blocks of a split into listed sizes (DBRX's Wqkv), and when one fused site holds each group's query heads, key and value side by side (Falcon's
query_key_value: the group's block of rows); a key/value head every query head shares (multi-query
attention, also split from one fused site: Falcon-7B's split along the heads, GPTBigCode's
c_attn(x).unsqueeze(1).split((width, head_dim, head_dim), dim=3), its key and value one head each)
is kept whole while the query heads are pruned one by one."""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import fx, nn

from tunecomp_fx.forms import site_input
from tunecomp_fx.graph_nodes import (
    MAX_END, PERMUTES, RESHAPES, TRANSPOSES, chunk_parts, data_input, is_dropout, is_identity, is_last_dim, is_op, keeps_width_last, shape_entries,
    splits_the_last_dim, tensor_rank, width_sizes,
)
from tunecomp_fx.sites import HiddenWidth, Site

aten = torch.ops.aten

_SWAPS = TRANSPOSES | PERMUTES
_UNBINDS = {aten.unbind.int, torch.unbind, "unbind"}
_SPLITS = {aten.split.Tensor, torch.split, "split"}
ATTENTION = {aten.scaled_dot_product_attention.default, F.scaled_dot_product_attention}


def _dims(node: fx.Node) -> tuple:
    """The dims a transpose, permute or unbind names, whether given as one list or as separate arguments."""
    dims = node.args[1:]
    return tuple(dims[0]) if len(dims) == 1 and isinstance(dims[0], (list, tuple)) else tuple(dims)


def _swaps_heads_and_sequence(node: fx.Node) -> bool:
    """transpose(1, 2) or permute(0, 2, 1, 3) of a 4-d (batch, seq, heads, head_dim) tensor."""
    dims = _dims(node)
    if node.target in PERMUTES:
        return dims == (0, 2, 1, 3)
    return set(dims) in ({1, 2}, {-3, -2})


def _merges_heads(node: fx.Node) -> bool:
    """A swap of a (batch, heads, seq, head_dim) tensor that leaves heads then head_dim last, ready to
    merge: transpose(1, 2), permute(0, 2, 1, 3), or permute(2, 0, 1, 3) (seq first, nn.MultiheadAttention)."""
    return _swaps_heads_and_sequence(node) or (node.target in PERMUTES and _dims(node) == (2, 0, 1, 3))


_PASS_THROUGH = RESHAPES | _SWAPS | {"contiguous", aten.contiguous.default}


_NORMS = {F.layer_norm, F.rms_norm, aten.layer_norm.default, aten.rms_norm.default}


def _norms_last_dim(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A layer or RMS norm over the last dim alone, as a module or a call on the graph's weights
    (timm's q_norm and k_norm: each head over its head_dim, one weight for all heads)."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) and len(module.normalized_shape) == 1
    return _norm_call_over_last_dim(node)


def _norm_call_over_last_dim(node: fx.Node) -> bool:
    """F.layer_norm, F.rms_norm or their aten ops over the last dim alone, its weights the graph's."""
    if not is_op(node, _NORMS) or len(node.args) < 2 or not isinstance(node.args[1], (list, tuple)) or len(node.args[1]) != 1:
        return False
    return all(tensor is node.args[0] or tensor.op == "get_attr" for tensor in node.all_input_nodes)


def _scales_by_a_number(node: fx.Node) -> bool:
    """x * c or x / c for a number c (`_SCALES`): every head scaled alike."""
    return is_op(node, _SCALES) and not node.kwargs and len(node.args) == 2 and isinstance(node.args[0], fx.Node) and isinstance(node.args[1], (int, float))


def _chain_back(gm: fx.GraphModule, end: fx.Node, head_norms: bool = False) -> tuple[fx.Node, list[fx.Node]]:
    """Walk back from `end` through reshapes, swaps, contiguous copies and identities (and with
    `head_norms`, norms over the last dim), each read by the next alone (torch.export's dtype checks
    aside): the first other node reached, and the chain in graph order (`end` last)."""
    chain, current = [], end
    while (is_op(current, _PASS_THROUGH) or is_identity(gm, current) or (head_norms and _norms_last_dim(gm, current))) and len(_readers(current)) == 1:
        chain.append(current)
        source = data_input(current)
        if source is None:
            break
        current = source
    return current, chain[::-1]


def _head_size(heads: object, head_dim: object, width: int) -> int | None:
    """The head size, if the sizes (heads or -1, head_dim) or (heads, -1 or a size read at run time) of
    a view split `width` into heads (BEiT writes reshape(..., 3, heads, -1); a traced
    reshape(..., heads, d // heads) reads d from a tensor's shape, and then must be width // heads)."""
    if isinstance(head_dim, int) and head_dim >= 1 and width % head_dim == 0 and heads in (-1, width // head_dim):
        return head_dim
    if (head_dim == -1 or isinstance(head_dim, fx.Node)) and isinstance(heads, int) and heads >= 1 and width % heads == 0:
        return width // heads
    return None


class _HeadSplit(NamedTuple):
    """How query, key or value is split into heads: the head size, the sizes that count heads (node
    name -> index, scaled to the kept heads in the student path) and the nodes computing batch * heads."""

    head_dim: int
    sizes: dict[str, int]
    products: list[fx.Node]


def _sequence_major_split(chain: list[fx.Node], width: int) -> _HeadSplit | None:
    """If `chain` is view(..., heads or -1, head_dim) then one heads/sequence swap (Hugging Face's BERT;
    traced, the view may keep the leading sizes read at run time: Hugging Face's PVT v2)."""
    reshapes = [n for n in chain if is_op(n, RESHAPES)]
    swaps = [n for n in chain if is_op(n, _SWAPS)]
    if len(reshapes) != 1 or len(swaps) != 1 or chain[0] is not reshapes[0] or not _swaps_heads_and_sequence(swaps[0]):
        return None
    entries = shape_entries(reshapes[0])
    leading = len(entries) == 4 or len(entries) == 3 and splits_the_last_dim(reshapes[0])  # (batch, seq) kept
    head_dim = _head_size(entries[-2], entries[-1], width) if leading else None
    if head_dim is None:
        return None
    return _HeadSplit(head_dim, {reshapes[0].name: len(entries) - 2} if entries[-2] == width // head_dim else {}, [])


class _Projections(NamedTuple):
    """The query, key and value projections of an attention block and the nodes that split their heads."""

    ups: tuple[str, ...]
    head_dim: int
    resized: tuple[tuple[str, int], ...]  # (node name, index of a size that counts heads)
    between: list[fx.Node]
    parts: tuple[int, ...]  # per up site
    repeats: tuple[tuple[int, ...], ...] = ()  # per up site, per part: query heads sharing each of its heads
    per_head_parts: tuple[str, ...] = ()  # up sites holding each head's parts side by side
    heads_per_group: int = 1


def _site_of(node: fx.Node, sites_by_node: dict[str, Site], width: int, parts: int) -> Site | None:
    """The compressed linear site whose output `node` is, if it holds `parts` copies of `width` and is read once."""
    up = sites_by_node.get(node.name)
    return up if up is not None and up.layout == "linear" and up.out_features == parts * width and len(_readers(node)) == 1 else None


# How a (batch, seq, 3, heads, head_dim) split of a fused qkv output is swapped to put the parts on a dim
# of their own and the heads before the sequence: (swap's dims, the dim the parts are then taken along)
_PARTS_SWAPS = (((2, 0, 3, 1, 4), 0), ((1, 3), 2), ((3, 1), 2))  # timm's ViT; MaxViT's transpose(1, 3), unbind(2)


def _part(node: fx.Node) -> tuple[fx.Node, int, int] | None:
    """(x, i, dim) if `node` is x[i] along dim `dim` of x: getitem of unbind(x, dim) (timm), getitem of x
    itself (`q, k, v = x` under symbolic tracing, dim 0) or select(x, dim, i) (torch.export)."""
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node):
        source, index = node.args
        if is_op(source, _UNBINDS):
            return data_input(source), index, (_dims(source) or (source.kwargs.get("dim", 0),))[0]
        return (source, index, 0) if is_op(source, PERMUTES) else None
    if is_op(node, {aten.select.int}):
        return node.args[0], node.args[2], node.args[1]
    return None


def _permuted_part(gm: fx.GraphModule, end: fx.Node, width: int, sites_by_node: dict[str, Site]) -> _Source | None:
    """If `end` is part i of a site's output split by reshape(..., parts, heads, head_dim) and
    permute(2, 0, 3, 1, 4) into parts along the first dim (timm's ViT: query, key and value; PVT v2's
    key and value), or transpose(1, 3) and the parts along dim 2 (timm's MaxViT); identities and norms
    of each head (timm's q_norm, k_norm) may stand between the part and the attention."""
    item, through = _chain_back(gm, end, head_norms=True)
    part = _part(item) if all(is_identity(gm, n) or _norms_last_dim(gm, n) for n in through) else None
    if part is None:
        return None
    permute, index, along = part
    shared = item.args[0]  # the unbind, or the swap itself when its parts are taken one by one
    if not is_op(permute, _SWAPS) or (_dims(permute), along) not in _PARTS_SWAPS or (shared is not permute and len(permute.users) != 1):
        return None
    split = data_input(permute)
    if split is None or not is_op(split, RESHAPES) or len(split.users) != 1 or data_input(split) is None:
        return None
    entries = shape_entries(split)
    parts = entries[2] if len(entries) == 5 and isinstance(entries[2], int) and entries[2] > 0 else 0
    up = _site_of(data_input(split), sites_by_node, width, parts) if parts else None
    head_dim = _head_size(entries[3], entries[4], width) if up is not None else None
    if head_dim is None:
        return None
    heads = _HeadSplit(head_dim, {split.name: 3} if entries[3] == width // head_dim else {}, [])
    nodes = [split, permute, *([shared] if shared is not permute else []), item, *through]
    return _Source(up, index * width, shared, item, heads, nodes, {})


def _batch_times_heads(node: fx.Node, index: int, heads: int) -> tuple[dict[str, int], list[fx.Node]] | None:
    """If size `index` of `node` is batch * heads: the size to rescale (node name -> index) and the
    product computing it, if any. A static batch makes it one literal; a dynamic one, a product of the
    batch's size and the literal head count (a node of its own); -1 infers it (nothing to rescale)."""
    size = shape_entries(node)[index]
    if size == -1:
        return {}, []
    if isinstance(size, int) and size > 0 and size % heads == 0:
        return {node.name: index}, []
    if isinstance(size, fx.Node) and size.target is operator.mul and list(size.args).count(heads) == 1:
        return {size.name: list(size.args).index(heads)}, [size]
    return None


def _merged_into_batch(node: fx.Node, heads: int, head_dim: int) -> tuple[dict[str, int], list[fx.Node]] | None:
    """`_batch_times_heads` of `node` if it is reshape(batch * heads, -1 or seq, head_dim) of (batch, heads,
    seq, head_dim): the heads merged into the batch for attention written with bmm."""
    entries = shape_entries(node) if is_op(node, RESHAPES) else []
    return _batch_times_heads(node, 0, heads) if len(entries) == 3 and entries[2] == head_dim else None


def _batch_merged_split(chain: list[fx.Node], width: int) -> _HeadSplit | None:
    """If `chain` is view(..., heads or -1, head_dim), one heads/sequence swap, then the heads merged into
    the batch (`_merged_into_batch`; Hugging Face's XGLM and MVP, BART's attention of old; DeBERTa-v2's
    with a contiguous() before the merge)."""
    steps = [node for node in chain if not is_op(node, {"contiguous", aten.contiguous.default})]
    split = _sequence_major_split(steps[:2], width) if len(steps) == 3 else None
    merged = _merged_into_batch(steps[2], width // split.head_dim, split.head_dim) if split is not None else None
    if merged is None:
        return None
    sizes, products = merged
    return _HeadSplit(split.head_dim, split.sizes | sizes, split.products + products)


def _batch_major_split(chain: list[fx.Node], width: int) -> _HeadSplit | None:
    """If `chain` is view(seq, batch * heads, head_dim), transpose(0, 1), view(batch, heads, seq,
    head_dim): nn.MultiheadAttention's head split."""
    if len(chain) != 3 or not (is_op(chain[0], RESHAPES) and is_op(chain[1], _SWAPS) and is_op(chain[2], RESHAPES)):
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
    reshape = data_input(mask) if is_op(mask, RESHAPES) else None
    expand = data_input(reshape) if reshape is not None and is_op(reshape, RESHAPES) else None
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
    """Where query, key or value comes from: the part of compressed site `up`'s output from neuron
    `offset` on (its parts side by side: one copy of the width, or width / `repeats` for grouped-query
    key and value), which `reader` takes from `shared` (the site's output itself when it holds one part),
    then split into heads; `nodes` from the site to the split, `sizes` those of them that count the width."""

    up: Site
    offset: int
    shared: fx.Node
    reader: fx.Node
    split: _HeadSplit
    nodes: list[fx.Node]
    sizes: dict[str, int]
    repeats: int = 1
    per_head_parts: bool = False  # each head's parts side by side in the site's output (MaxViT), not each part's heads
    heads_per_group: int = 1  # heads whose parts sit side by side as one group, pruned together (CodeGen's model-parallel groups)


# (site, the part's first neuron, the node the parts are read from, the nodes from the site to it, the sizes of them counting the width)
_Part = tuple[Site, int, fx.Node, list[fx.Node], dict[str, int]]


def _packed_part(item: fx.Node, width: int, sites_by_node: dict[str, Site]) -> _Part | None:
    """(site, offset, packed, nodes, sizes) if `item` is select(packed, 0, i) of a site's output packed
    as nn.MultiheadAttention packs it: 3 copies for self-attention, 2 (key, value) for cross-attention."""
    if not is_op(item, {aten.select.int}) or item.args[1] != 0:
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
    return (up, item.args[2] * width, packed, [unflatten, *packing], {unflatten.name: 1}) if up is not None else None


def _block_offset(node: fx.Node, index: int, width: int) -> int | None:
    """Where block `index` starts if `node` splits its input along the last dim into blocks and that
    block is `width` wide: blocks of `width` each (x.split(width, dim=-1), or dim=2 of a 3-d x as GPT-2
    writes it; torch.export records the input's rank; or x.chunk(parts, dim=-1)), or of the sizes
    listed (DBRX's split([width, kv_width, kv_width], dim=2); GPTBigCode's multi-query split((width,
    head_dim, head_dim), dim=3))."""
    chunks = chunk_parts(node)
    if is_op(node, _SPLITS) and len(node.args) >= 2 and node.args[1] == width:
        offset, dim = index * width, node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    elif chunks is not None:  # x.chunk(parts, dim=-1), MPT's Wqkv: blocks of width if the site holds parts * width (_block_part)
        offset, dim = index * width, chunks[1]
    elif node.target is aten.split_with_sizes.default and node.args[1][index] == width:
        offset, dim = sum(node.args[1][:index]), node.args[2] if len(node.args) > 2 else 0
    else:
        return None
    return offset if is_last_dim(node.args[0], dim) else None


def _adds_a_dim_before_the_last(node: fx.Node) -> bool:
    """x.unsqueeze(d) for a d before the new last dim, read once (GPTBigCode's c_attn(x).unsqueeze(1))."""
    return node.target is aten.unsqueeze.default and not is_last_dim(node, node.args[1]) and len(node.users) == 1


def _block_part(gm: fx.GraphModule, item: fx.Node, width: int, sites_by_node: dict[str, Site]) -> _Part | None:
    """(site, offset, blocks, nodes, sizes) if `item` is block i of a site's output split along its
    last dim into blocks (`_block_offset`), perhaps after reshapes of its tokens (Hugging Face's GPT-2)
    or a new dim before the last (GPTBigCode's)."""
    offset = _block_offset(item.args[0], item.args[1], width) if item.target is operator.getitem and isinstance(item.args[0], fx.Node) else None
    if offset is None:
        return None
    blocks = item.args[0]
    source, tokens = _chain_back(gm, blocks.args[0])
    if _adds_a_dim_before_the_last(source) and data_input(source) is not None:
        before, reshapes = _chain_back(gm, data_input(source))
        source, tokens = before, [*reshapes, source, *tokens]
    up = sites_by_node.get(source.name)
    listed = blocks.target is aten.split_with_sizes.default
    total = sum(blocks.args[1]) if listed else up.out_features if up is not None else 0
    chunks = chunk_parts(blocks)
    if _site_of(source, sites_by_node, total, 1) is None or total % width and not listed or chunks and chunks[0] * width != total:
        return None
    if not all(keeps_width_last(n, total) or _adds_a_dim_before_the_last(n) for n in tokens):
        return None
    sizes = width_sizes([n for n in tokens if is_op(n, RESHAPES)], total)
    if listed and sizes:
        return None  # the total of parts that may not all shrink alike: not a proportion of the kept heads
    # split(width) names the block's width; a listed split, each block's; chunk(parts) none
    return up, offset, blocks, [*tokens, blocks], sizes | ({} if chunks else {blocks.name: item.args[1] if listed else 0})


def _one_head_part(gm: fx.GraphModule, item: fx.Node, chain: list[fx.Node], width: int, sites_by_node: dict[str, Site]) -> tuple[_Part, _HeadSplit] | None:
    """(part, split) if `item` is already one head, (batch, 1, seq, head_dim), a block of a site's output
    (`_block_part`) with no head split: GPTBigCode's multi-query key and value,
    c_attn(x).unsqueeze(1).split((width, head_dim, head_dim), dim=3)[1] and [2]. The head is every
    query head's, kept whole (`_kept_whole`)."""
    value = item.meta.get("val")
    if chain or not isinstance(value, torch.Tensor) or value.dim() != 4 or value.shape[1] != 1 or value.shape[-1] != width:
        return None
    part = _block_part(gm, item, width, sites_by_node)
    return (part, _HeadSplit(width, {}, [])) if part is not None else None


def _sliced_part(item: fx.Node, width: int, sites_by_node: dict[str, Site]) -> _Part | None:
    """(site, offset, the site's output, [], sizes) if `item` is `width` neurons of a site's output sliced
    along its last dim, x[..., offset:offset + width] (the last part may run to the end), as Phi-3 takes
    query, key and value from its qkv_proj (torch.export records the slices); with grouped-query
    attention key and value are narrower than the query (_projections checks that the parts tile the output)."""
    if item.target is not aten.slice.Tensor or len(item.args) != 4 or item.kwargs:
        return None
    source, dim, start, end = item.args
    up = sites_by_node.get(source.name)
    if up is None or up.layout != "linear" or not is_last_dim(source, dim):
        return None
    if not isinstance(start, int) or end != start + width and not (start + width == up.out_features and end == MAX_END):
        return None
    return up, start, source, [], {item.name: 1}  # its bounds count the width


def _model_parallel_part(item: fx.Node, head_dim: int, width: int, sites_by_node: dict[str, Site]) -> tuple[_Part, int] | None:
    """(part, heads per group) if `item` is part i of a site's output viewed as (batch, seq, groups or
    -1, parts * size) and split along the last dim in `parts` of `size`: model-parallel groups, each
    holding its heads' parts side by side, CodeGen's qkv_proj(x).view(b, t, -1, 3 * local).split(local,
    dim=-1) (query, value, key), each part then split into heads of `head_dim`. A group's heads are
    pruned together: its rows in every part go with it (`HiddenWidth.per_head_parts`)."""
    blocks = item.args[0] if item.target is operator.getitem and isinstance(item.args[0], fx.Node) else None
    if blocks is None or not is_op(blocks, _SPLITS) or len(blocks.args) < 2 or not isinstance(blocks.args[1], int):
        return None
    size, dim, view = blocks.args[1], blocks.args[2] if len(blocks.args) > 2 else blocks.kwargs.get("dim", 0), blocks.args[0]
    entries = shape_entries(view) if is_op(view, RESHAPES) else []
    if len(entries) != 4 or not is_last_dim(view, dim) or len(view.users) != 1 or width % size or size % head_dim or size == width:
        return None
    groups = width // size
    source = data_input(view)
    parts = sites_by_node[source.name].out_features // width if source is not None and source.name in sites_by_node else 0
    up = _site_of(source, sites_by_node, width, parts) if parts else None
    if up is None or entries[2] not in (groups, -1) or entries[3] not in (parts * size, -1) or entries[2] == entries[3] == -1:
        return None
    sizes = {view.name: 2} if entries[2] == groups else {}  # a literal group count; a group's size stays
    return (up, item.args[1] * width, blocks, [view, blocks], sizes), size // head_dim


def _unbound_part(item: fx.Node, chain: list[fx.Node], width: int, sites_by_node: dict[str, Site]) -> tuple[_Part, _HeadSplit] | None:
    """(part, split) if `item` is part i of a site's output viewed as (batch, seq, parts, heads, head_dim)
    and taken along the parts (unbound or selected), and `chain` then swaps its heads and sequence:
    ModernBERT's Wqkv, view(b, t, 3, heads or -1, head_dim).unbind(dim=2), each part transpose(1, 2)."""
    found = _part(item)
    if found is None or len(chain) != 1 or not _swaps_heads_and_sequence(chain[0]):
        return None
    view, index, dim = found
    shared = item.args[0]  # the unbind, or the view itself when its parts are selected one by one
    entries = shape_entries(view) if is_op(view, RESHAPES) else []
    if len(entries) != 5 or dim not in (2, -3) or shared is not view and len(view.users) != 1:
        return None
    parts = entries[2] if isinstance(entries[2], int) and entries[2] > 0 else 0
    up = _site_of(data_input(view), sites_by_node, width, parts) if parts else None
    head_dim = _head_size(entries[3], entries[4], width) if up is not None else None
    if head_dim is None:
        return None
    sizes = {view.name: 3} if entries[3] == width // head_dim else {}
    return (up, index * width, shared, [view, *([shared] if shared is not view else [])], sizes), _HeadSplit(head_dim, {}, [])


# Nodes that compute each head of a tensor split into heads from that head alone, given other tensors
# broadcast over the heads: elementwise arithmetic and casts, and slices, concatenation, stacking,
# flattening, means and vector norms along head_dim (`_within_heads`), as torch.export records rotary
# embeddings (Cohere's interleaved one stacks and flattens, RoFormer's stacks and reshapes as the heads), norms of each head over its head_dim
# (Qwen3's and Gemma 3's q_norm and k_norm, Swin V2's F.normalize for its cosine attention) and casts
# of query and key to float (OLMo's, GPT-Neo's).
_WITHIN_HEADS = {
    aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.div.Tensor, aten.neg.default, aten.pow.Tensor_Scalar,
    aten.rsqrt.default, aten.clamp_min.default, aten.to.dtype, aten._to_copy.default, aten.type_as.default, aten.expand_as.default,
    aten.slice.Tensor, aten.cat.default, aten.stack.default, aten.flatten.using_ints, aten.mean.dim, aten.linalg_vector_norm.default,
    aten.alias.default,  # Phi-3's partial rotary embedding reads the heads through an alias
    aten.reshape_as.default,  # RoFormer's interleaved rotary embedding: a stack flattened into the heads' shape
}


def _within_heads(node: fx.Node) -> bool:
    """A `_WITHIN_HEADS` node that leaves the heads apart: slices, concatenation, stacking, flattening
    (also by reshape_as), means and vector norms work along the last dim, head_dim (a slice may also
    take a whole dim, as GPT-J's x[:, :, :, :8] does)."""
    if is_op(node, _NORMS):  # each head normed over its head_dim, one weight for all heads (Persimmon's q and k layernorms)
        return _norm_call_over_last_dim(node)
    if not is_op(node, _WITHIN_HEADS):
        return False
    first = node.args[0][0] if node.target in (aten.cat.default, aten.stack.default) else node.args[0]
    if node.target is aten.mean.dim:
        return _reduces_last_dim(node, *(list(node.args[1:3]) + [False])[:2])
    if node.target is aten.linalg_vector_norm.default:
        return _reduces_last_dim(node, *(list(node.args[2:4]) + [False])[:2])
    if node.target is aten.flatten.using_ints:  # the last two dims into one
        start, end = (list(node.args[1:3]) + [-1])[:2]
        return isinstance(start, int) and is_last_dim(first, start + 1) and is_last_dim(first, end)
    if node.target is aten.stack.default:  # along a new last dim
        return is_last_dim(node, node.args[1] if len(node.args) > 1 else 0)
    if node.target is aten.reshape_as.default:  # x.reshape_as(y), x's last two dims flattened into y's last
        x, y = (argument.meta.get("val") for argument in node.args[:2])
        return isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.dim() == y.dim() + 1 and x.shape[:-2] == y.shape[:-1]
    if node.target in (aten.slice.Tensor, aten.cat.default):
        return is_last_dim(first, node.args[1] if len(node.args) > 1 else 0) or _is_whole_slice(node)
    return True


def _head_region(end: fx.Node, within: Callable[[fx.Node], bool], heads_at: int) -> tuple[fx.Node, list[fx.Node]] | None:
    """If `end` is computed by nodes `within` from one tensor with its heads at dim `heads_at` and
    tensors broadcast over the heads (size 1 there, as torch.export records the shapes; also when
    `within` nodes compute them from such tensors alone): that tensor and the nodes that read it; none
    of them, nor `end`, is read from outside (torch.export's dtype checks aside)."""
    region: set[fx.Node] = set()
    stack, leaves = [end], set()
    while stack:
        node = stack.pop()
        if node in region:
            continue
        if within(node):
            region.add(node)
            stack.extend(node.all_input_nodes)
            continue
        if not isinstance(node.meta.get("val"), torch.Tensor):
            return None
        leaves.add(node)
    heads = {node for node in leaves if node.meta["val"].dim() >= -heads_at and node.meta["val"].shape[heads_at] != 1}
    if not heads:  # a single head (a multi-query key or value): the tensor the head split computes
        heads = {node for node in leaves if is_op(node, _PASS_THROUGH)}
    if not region or len(heads) != 1 or len(_readers(end)) != 1:
        return None
    [root] = heads
    # nodes that do not read the heads (RoFormer's cos and sin, stacked and reshaped as the heads) stay
    # outside: computed from the leaves broadcast over the heads alone, the student path's copies read
    # them as they read those leaves
    reads_heads: dict[fx.Node, bool] = {}

    def reads(node: fx.Node) -> bool:
        if node not in reads_heads:
            reads_heads[node] = node is root or (node in region and any(reads(source) for source in node.all_input_nodes))
        return reads_heads[node]

    region = {node for node in region if reads(node)}
    if any(not set(_readers(node)) <= region for node in (region - {end}) | heads):
        return None
    return root, list(region)


def _per_head_nodes(end: fx.Node) -> tuple[fx.Node, list[fx.Node]] | None:
    """`_head_region` of `_WITHIN_HEADS` nodes on a (batch, heads, seq, head_dim) tensor: rotary
    embeddings, norms of each head (Gemma 3's, Swin V2's) and casts between the swap and the attention."""
    return _head_region(end, _within_heads, -3)


def _head_norm_nodes(end: fx.Node) -> tuple[fx.Node, list[fx.Node]] | None:
    """`_head_region` of `_WITHIN_HEADS` nodes on a (batch, seq, heads, head_dim) tensor between the view
    and the swap: Qwen3's q_norm and k_norm, GPT-J's rotary embedding. (A norm over the whole projection
    before the split, as OLMo2's, mixes the heads: it is not between the split and the swap, and leaves
    no head width.)"""
    return _head_region(end, _within_heads, -2)


def _reduces_last_dim(node: fx.Node, dims: object, keepdim: object) -> bool:
    """Whether a reduction (a mean, a vector norm) of `dims` works over the last dim of its input alone, keeping it."""
    rank = tensor_rank(node.args[0]) if isinstance(node.args[0], fx.Node) else None
    return rank is not None and keepdim is True and isinstance(dims, (list, tuple)) and list(dims) in ([-1], [rank - 1])


def _is_whole_slice(node: fx.Node) -> bool:
    """x[:] along some dim: a slice from 0 to the end (torch.export records x[:, :, None] with them)."""
    start, end = (list(node.args[2:4]) + [None, None])[:2]
    return node.target is aten.slice.Tensor and start in (0, None) and (end is None or end >= 2**62)


def _repeated_heads(end: fx.Node) -> tuple[fx.Node, list[fx.Node], int, dict[str, int]] | None:
    """If `end` repeats each head of a (batch, heads, seq, head_dim) tensor, as grouped-query attention
    does (LLaMA's repeat_kv: x[:, :, None].expand(b, heads, repeats, t, d).reshape(b, heads * repeats,
    t, d)): that tensor, the nodes, the repeats and the sizes that count heads."""
    expand = data_input(end) if is_op(end, RESHAPES) and len(end.users) == 1 else None
    if expand is None or expand.target is not aten.expand.default or len(expand.users) != 1:
        return None
    nodes, node = [expand, end], data_input(expand)
    while node is not None and len(node.users) == 1 and (_is_whole_slice(node) or (node.target is aten.unsqueeze.default and node.args[1] == 2)):
        nodes.insert(0, node)
        node = data_input(node)
    entries, merged = shape_entries(expand), shape_entries(end)
    if [n.target for n in nodes].count(aten.unsqueeze.default) != 1 or len(entries) != 5 or len(merged) != 4:
        return None
    heads, repeats = entries[1], entries[2]
    if not (isinstance(heads, int) and isinstance(repeats, int) and heads > 0 and repeats > 0) or merged[1] not in (-1, heads * repeats):
        return None
    # with one key/value head (multi-query) the query heads it is repeated for are what pruning shrinks
    return node, nodes, repeats, {expand.name: 1 if heads > 1 else 2} | ({end.name: 1} if merged[1] == heads * repeats else {})


def _each_heads_parts(node: fx.Node) -> tuple[int, int] | None:
    """(parts, dim) of x.chunk(parts, dim) or x.split([size] * parts, dim): parts of equal size within
    each head, which pruning whole heads leaves as they are."""
    if node.target is not aten.split_with_sizes.default:
        return chunk_parts(node)
    sizes = node.args[1]
    return (len(sizes), node.args[2] if len(node.args) > 2 else 0) if len(set(sizes)) == 1 else None


def _per_head_part(gm: fx.GraphModule, item: fx.Node, width: int, sites_by_node: dict[str, Site]) -> _Source | None:
    """If `item` is part i of each head of one site's output, view(..., heads, parts * head_dim),
    transpose(1, 2), chunk(parts, dim=-1)[i] (timm's MaxViT: each head's query, key and value side by
    side in the site's rows; GPTBigCode's split(3 * [head_dim], dim=3))."""
    if item.op != "call_function" or item.target is not operator.getitem or not isinstance(item.args[0], fx.Node):
        return None
    chunk = item.args[0]
    parts, dim = _each_heads_parts(chunk) or (0, 0)
    if not parts or dim not in (3, -1):
        return None
    source, chain = _chain_back(gm, chunk.args[0])
    split = _sequence_major_split(chain, parts * width) if chain else None
    up = _site_of(source, sites_by_node, width, parts)
    if split is None or up is None or split.head_dim % parts:
        return None
    heads = _HeadSplit(split.head_dim // parts, split.sizes, split.products)
    return _Source(up, item.args[1] * width, chunk, item, heads, [*chain, chunk, item], {}, per_head_parts=True)


def _grouped_part(gm: fx.GraphModule, item: fx.Node, chain: list[fx.Node], width: int, sites_by_node: dict[str, Site]) -> _Source | None:
    """If `item` is taken from one site's output viewed as (batch, seq, groups, slots, head_dim), each
    key/value group's query heads then its key and its value side by side, and `chain` swaps its heads
    and sequence: the queries (slots [:-2] flattened into heads; slot 0 when a group has one query head),
    the key (slot -2) or the value (slot -1) of every group. Falcon's new_decoder_architecture:
    view(b, t, groups, -1, head_dim), [..., :-2, :].flatten(-3, -2), [..., -2, :], [..., -1, :]; its
    older layout: unflatten(-2, (heads, 3)).unbind(-2); BLOOM's: view(b, t, heads, 3, head_dim), each part
    selected, swapped, then merged into the batch for its bmm (`_merged_into_batch`)."""
    if len(chain) not in (1, 2) or not _swaps_heads_and_sequence(chain[0]):
        return None
    flattened = item.target is aten.flatten.using_ints and list(item.args[1:3]) in ([-3, -2], [2, 3])
    taken = data_input(item) if flattened else item
    if flattened and taken is not None and taken.target is aten.slice.Tensor and len(taken.args) == 4 and taken.args[1:3] in ((3, 0), (-2, 0)):
        grouped, slot = taken.args[0], None  # the queries: slots 0 up to the group's key
    else:
        part = None if flattened else _part(taken)
        if part is None or part[2] not in (3, -2):
            return None
        grouped, slot = part[0], part[1]
    value = grouped.meta.get("val")
    entries = shape_entries(grouped)
    index = 0 if grouped.target is aten.unflatten.int and grouped.args[1] in (-2, 2) else 2 if is_op(grouped, RESHAPES) and len(entries) == 5 else None
    if index is None or not isinstance(value, torch.Tensor) or value.dim() != 5:
        return None
    groups, slots, head_dim = value.shape[2:]
    queries = slots - 2  # query heads per group
    if entries[index] != groups or entries[index + 1] not in (slots, -1) or queries < 1:
        return None
    if slot is None:
        kind = "queries" if taken.args[3] in (-2, queries) else None
    else:
        kind = {0: "queries" if queries == 1 else None, queries: "key", queries + 1: "value"}.get(slot % slots)
    if kind is None or width != groups * head_dim * (queries if kind == "queries" else 1):
        return None
    merged = _merged_into_batch(chain[1], width // head_dim, head_dim) if len(chain) == 2 else ({}, [])
    if merged is None:
        return None
    source, views = _chain_back(gm, data_input(grouped))
    up = _site_of(source, sites_by_node, groups * slots * head_dim, 1)
    if up is None:
        return None
    if any(shape_entries(view)[-2:] != [-1, head_dim] for view in views):
        return None  # views before the grouping may not count heads
    shared = taken.args[0]  # the grouped view, or its unbind
    offset = {"queries": 0, "key": groups * queries * head_dim, "value": groups * (queries + 1) * head_dim}[kind]
    nodes = [*views, grouped, *([shared] if shared is not grouped else []), taken, *([item] if flattened else []), *chain]
    return _Source(up, offset, shared, taken, _HeadSplit(head_dim, *merged), nodes, {grouped.name: index}, per_head_parts=True)


def _split_heads_part(item: fx.Node, chain: list[fx.Node], width: int, sites_by_node: dict[str, Site]) -> _Source | None:
    """If `item` is part i of one site's output viewed as (batch, seq, -1, head_dim) and split along its
    heads into the query heads and one key and one value head (multi-query attention), and `chain`
    swaps heads and sequence: Falcon-7B's view(b, t, -1, head_dim).split([heads, 1, 1], dim=-2). The
    split's sizes count heads; the shared key and value heads stay whole (`_kept_whole`)."""
    split = item.args[0] if item.target is operator.getitem and isinstance(item.args[0], fx.Node) else None
    if split is None or split.target is not aten.split_with_sizes.default or len(chain) != 1 or not _swaps_heads_and_sequence(chain[0]):
        return None
    sizes, dim = split.args[1], split.args[2] if len(split.args) > 2 else 0
    view = data_input(split)
    entries = shape_entries(view) if is_op(view, RESHAPES) else []
    if dim not in (2, -2) or len(entries) != 4 or entries[2] != -1 or list(sizes[1:]) != [1, 1] or sizes[0] < 2:
        return None
    head_dim = entries[3]
    up = _site_of(data_input(view), sites_by_node, sum(sizes) * head_dim, 1) if len(view.users) == 1 else None
    if up is None:
        return None
    index = item.args[1]
    if width != sizes[index] * head_dim:
        return None
    offset = sum(sizes[:index]) * head_dim
    return _Source(up, offset, split, item, _HeadSplit(head_dim, {}, []), [view, split, item, *chain], {split.name: index})


def _kept_whole(source: _Source, width: int) -> _Source | None:
    """`source` as it must be if it is one key/value head every query head shares (repeated for all,
    `width` its head), which pruning keeps whole: the head count of its split and its size in a split
    into listed sizes stay (the query's size there is rescaled by the query's part); a slice's bounds
    would have to shift, not scale, and are refused (None)."""
    if source.repeats == 1 or width != source.split.head_dim:
        return source
    listed = {n.name for n in source.nodes if n.target is aten.split_with_sizes.default}
    sizes = {name: index for name, index in source.sizes.items() if name not in listed}
    if any(n.target is aten.slice.Tensor and n.name in sizes for n in source.nodes):
        return None
    return source._replace(split=source.split._replace(sizes={}), sizes=sizes)


def _source(gm: fx.GraphModule, query_key_or_value: object, width: int, sites_by_node: dict[str, Site], shared_by: int = 1) -> _Source | None:
    """Where `query_key_or_value` comes from, if it is split into heads (sequence- or batch-major) from a
    site's output of one copy of `width`, or from a part of a packed or block-split output; rotary
    embeddings may stand between the split and the attention (`_per_head_nodes`), and the heads of a
    key or value may be repeated for groups of query heads (`_repeated_heads`), or each shared by
    `shared_by` query heads in the attention itself (enable_gqa); the site's output then holds
    width / repeats."""
    if not isinstance(query_key_or_value, fx.Node):
        return None
    in_parts = (_per_head_part(gm, query_key_or_value, width, sites_by_node) or _permuted_part(gm, query_key_or_value, width, sites_by_node)) if shared_by == 1 else None
    if in_parts is not None:
        return in_parts
    repeated = _repeated_heads(query_key_or_value)
    end, repeat_nodes, repeats, repeat_sizes = repeated if repeated is not None else (query_key_or_value, [], shared_by, {})
    if width % repeats:
        return None
    width //= repeats
    item, chain = _chain_back(gm, end)
    rotary = _per_head_nodes(end) if not chain else None
    in_parts = _per_head_part(gm, rotary[0], width, sites_by_node) if rotary is not None and repeats == 1 else None
    if in_parts is not None:  # GPT-NeoX: a rotary embedding on part of each head of a per-head chunk
        return in_parts._replace(nodes=[*in_parts.nodes, *rotary[1]])
    if rotary is not None and is_op(rotary[0], _PASS_THROUGH) and data_input(rotary[0]) is not None:
        item, chain = _chain_back(gm, data_input(rotary[0]))
        chain.append(rotary[0])  # the split's last node, read by the rotary embedding alone
    norm = _head_norm_nodes(item) if chain and is_op(chain[0], _SWAPS) else None
    normed: list[fx.Node] = []
    if norm is not None and is_op(norm[0], _PASS_THROUGH) and data_input(norm[0]) is not None:
        item, split_chain = _chain_back(gm, data_input(norm[0]))
        chain = [*split_chain, norm[0], *norm[1], *chain]  # the view, read by the norm alone, its nodes (ordered later), the swap
    elif norm is not None:  # a part taken from a grouped view, normed head by head, then swapped (Persimmon's)
        item, normed = norm
    after_split = [*normed, *(rotary[1] if rotary is not None else []), *repeat_nodes]
    split = (_sequence_major_split(chain, width) or _batch_major_split(chain, width) or _batch_merged_split(chain, width)) if chain else None
    heads_per_group = 0  # model-parallel groups of heads: none
    if split is None:
        grouped = _grouped_part(gm, item, chain, width, sites_by_node) or _split_heads_part(item, chain, width, sites_by_node)
        if grouped is not None:
            return _kept_whole(grouped._replace(nodes=[*grouped.nodes, *after_split], sizes=grouped.sizes | repeat_sizes, repeats=repeats), width)
        unbound = _unbound_part(item, chain, width, sites_by_node) or _one_head_part(gm, item, chain, width, sites_by_node)
        if unbound is None:
            return None
        part, split = unbound
    else:
        scaled = _scales_by_a_number(item) and len(item.users) == 1  # OPT's q_proj(x) * scaling
        output = item.args[0] if scaled else item
        up = _site_of(output, sites_by_node, width, 1)
        if up is not None:  # the site's output itself: the split (or OPT's scale) reads it
            steps = [item, *chain] if scaled else chain
            part, item, chain = (up, 0, output, [], {}), steps[0], steps[1:]
        elif repeats == 1 and (model_parallel := _model_parallel_part(item, split.head_dim, width, sites_by_node)) is not None:
            part, heads_per_group = model_parallel
        else:
            part = _packed_part(item, width, sites_by_node) or _block_part(gm, item, width, sites_by_node) or _sliced_part(item, width, sites_by_node)
        if part is None:
            return None
    up, offset, shared, nodes, sizes = part
    source = _Source(
        up, offset, shared, item, split, [*nodes, item, *chain, *after_split], sizes | repeat_sizes, repeats,
        per_head_parts=heads_per_group > 0, heads_per_group=max(heads_per_group, 1),
    )
    return _kept_whole(source, width)


class _Attention(NamedTuple):
    """Attention over (batch, heads, seq, head_dim) query, key and value: the nodes computing it (a
    scaled_dot_product_attention call, or one written out), the tensors from outside them it reads
    beside the heads ((reader, tensor): an attn_mask, a mask or scale applied to the scores) and how
    many query heads share each key/value head inside it (None: unknown)."""

    inputs: tuple[object, object, object]
    nodes: list[fx.Node]
    reads: list[tuple[fx.Node, fx.Node]]
    shared_by: int | None


_MATMULS = {aten.matmul.default, torch.matmul, operator.matmul, "matmul", aten.bmm.default, torch.bmm, "bmm"}
_EINSUMS = {aten.einsum.default, torch.einsum, torch.functional.einsum}
_SOFTMAXES = {aten.softmax.int, aten._softmax.default, torch.softmax, F.softmax, "softmax"}
# What a written-out attention may do to its scores between the two matmuls, head by head: scale,
# add or fill a mask (whose entries are checked to be shared by the heads; MPNet adds its bias in place),
# soft-cap (Gemma 2's tanh between two scales), cast.
_SCALES = {aten.mul.Tensor, aten.div.Tensor, operator.mul, operator.truediv, torch.mul, torch.div, "mul", "div"}
_MASKS = {
    aten.add.Tensor, aten.add_.Tensor, aten.sub.Tensor, operator.add, operator.sub, torch.add, torch.sub, "add", "add_", "sub",
    aten.masked_fill.Scalar, aten.masked_fill.Tensor, torch.masked_fill, "masked_fill", aten.where.self, torch.where,
    aten.max.other, aten.maximum.default,  # XGLM's torch.max(scores, the dtype's minimum)
}
_SOFT_CAPS = {aten.tanh.default, torch.tanh, "tanh"}
_CASTS = {aten.to.dtype, aten._to_copy.default, "to", "float"}


def _is_cast(node: fx.Node) -> bool:
    """A cast of one tensor to a dtype given as a constant (not read from another tensor)."""
    return is_op(node, _CASTS) and node.all_input_nodes == list(node.args[:1])


def _is_timm_attention_function(node: fx.Node, name: str) -> bool:
    """A call of timm.layers.attention's `name`, which timm keeps whole under symbolic tracing."""
    return node.op == "call_function" and getattr(node.target, "__module__", None) == "timm.layers.attention" and node.target.__name__ == name


def _reads_only_metadata(reader: fx.Node, node: fx.Node) -> bool:
    """Whether `reader` takes nothing of `node` but its dtype, device or sizes: torch.export's checks of
    a dtype before a cast (they go with the tensor: eliminate_dead_code), x.size() and x.shape under
    symbolic tracing (Hugging Face's PVT v2 and CvT read a projection's leading sizes for its head
    split), and timm's resolve_self_attn_mask(seq_len, attn, attn_mask, is_causal), which builds a
    mask like the scores."""
    if reader.target is aten._assert_tensor_metadata.default or reader.op == "call_method" and reader.target == "size" and reader.args == (node,):
        return True
    if reader.target is getattr and reader.args == (node, "shape"):
        return True
    return _is_timm_attention_function(reader, "resolve_self_attn_mask") and reader.args[1] is node and node not in (reader.args[0], *reader.args[2:])


def _readers(node: fx.Node) -> list[fx.Node]:
    """The nodes reading `node` for its values (`_reads_only_metadata`)."""
    return [user for user in node.users if not _reads_only_metadata(user, node)]


def _einsum_operands(node: fx.Node, product: str) -> tuple[fx.Node, fx.Node] | None:
    """(a, b) if `node` is an einsum of two (batch, heads, ., .) operands that computes a @ b^T
    (`product` "scores": "bhlk,bhtk->bhlt") or a @ b ("context": "bhlt,bhtv->bhlv"), as Hugging Face's
    CvT writes its attention; its equation and operands as symbolic tracing or torch.export records them."""
    if not is_op(node, _EINSUMS) or node.kwargs or not node.args or not isinstance(node.args[0], str):
        return None
    equation, *operands = node.args
    operands = list(operands[0]) if len(operands) == 1 and isinstance(operands[0], (list, tuple)) else operands
    inputs, _, output = equation.replace(" ", "").partition("->")
    a, _, b = inputs.partition(",")
    if len(operands) != 2 or not all(isinstance(o, fx.Node) for o in operands) or len(a) != 4 or len(b) != 4 or a[:2] != b[:2] or len(set(a + b)) != 5:
        return None
    matches = {"scores": a[3] == b[3] and output == a[:3] + b[2], "context": a[3] == b[2] and output == a[:3] + b[3]}[product]
    return (operands[0], operands[1]) if matches else None


def _swaps_last_two_dims(node: fx.Node) -> bool:
    """transpose(-2, -1) (or (2, 3)) or permute(0, 1, 3, 2) of a 4-d tensor, or transpose(1, 2) of a 3-d one
    (batch * heads first, for bmm): the key turned for q @ k^T."""
    dims = _dims(node)
    if node.target in PERMUTES:
        return dims == (0, 1, 3, 2)
    return is_op(node, _SWAPS) and (set(dims) in ({-2, -1}, {2, 3}) or (set(dims) == {1, 2} and tensor_rank(data_input(node)) == 3))


def _scaled_by_a_scalar(node: object) -> bool:
    """x * s or x / s, read once, with s a number or a tensor of one element (the same for every head)."""
    if not isinstance(node, fx.Node) or not is_op(node, _SCALES) or len(_readers(node)) != 1 or len(node.args) != 2:
        return False
    scale = node.args[1]
    value = scale.meta.get("val") if isinstance(scale, fx.Node) else None
    return isinstance(scale, (int, float)) or isinstance(value, torch.Tensor) and value.numel() == 1


def _scores_of(gm: fx.GraphModule, node: fx.Node, nodes: list[fx.Node], reads: list[tuple[fx.Node, fx.Node]]) -> tuple[fx.Node, fx.Node] | None:
    """(query, key) if `node` is q @ k^T (q perhaps scaled by a number, k^T by a number or a one-element
    tensor), perhaps scaled, masked, cast and viewed, each step read by the next alone; collects the
    steps in `nodes` and the tensors they read from elsewhere in `reads`."""
    added = node.target is aten.baddbmm.default  # beta * bias + alpha * q @ k^T (BLOOM's ALiBi)
    if len(_readers(node)) != 1 or node.kwargs and not (_is_cast(node) or added and all(isinstance(v, (int, float)) for v in node.kwargs.values())):
        return None
    operands = _einsum_operands(node, "scores")
    if operands is not None:
        nodes.append(node)
        return operands
    if is_op(node, _MATMULS) or added:
        query, turned = node.args[1:3] if added else node.args[:2]
        if _scaled_by_a_scalar(turned):  # DeBERTa-v2's bmm(q, k^T / scale), scale a 0-d tensor
            nodes.append(turned)
            reads += [(turned, turned.args[1])] if isinstance(turned.args[1], fx.Node) else []
            turned = turned.args[0]
        if not isinstance(turned, fx.Node) or not _swaps_last_two_dims(turned) or len(_readers(turned)) != 1:
            return None
        if added and not isinstance(node.args[0], fx.Node):
            return None
        if isinstance(query, fx.Node) and is_op(query, _SCALES) and len(_readers(query)) == 1 and isinstance(query.args[1], (int, float)):
            nodes.append(query)
            query = query.args[0]
        nodes += [turned, node]
        reads += [(node, node.args[0])] if added else []
        return query, data_input(turned)
    if is_op(node, RESHAPES) and data_input(node) is not None:  # regrouping the batch (Swin's shifted windows)
        found = _scores_of(gm, data_input(node), nodes, reads)
        if found is not None:
            nodes.append(node)
        return found
    if not (is_op(node, _SCALES | _MASKS | _SOFT_CAPS) or _is_cast(node) or is_dropout(gm, node) or _is_timm_attention_function(node, "maybe_add_mask")):
        return None
    for scores in node.all_input_nodes:  # the scores are the operand that leads back to q @ k^T
        found = _scores_of(gm, scores, before := [], reads_before := [])
        if found is None:
            continue
        others = [other for other in node.all_input_nodes if other is not scores]
        # a mask built from the scores' metadata (timm's resolve_self_attn_mask) goes with them: the student
        # path's reads its own scores; the mask it takes from outside is read as a mask is
        built = [other for other in others if any(_reads_only_metadata(other, step) for step in before)]
        nodes += [*before, *built, node]
        reads += reads_before + [(node, other) for other in others if other not in built]
        reads += [(mask_builder, mask_builder.args[2]) for mask_builder in built if isinstance(mask_builder.args[2], fx.Node)]
        return found
    return None


def _softmax_dim(gm: fx.GraphModule, node: fx.Node) -> int | None:
    """The dim a softmax (function, method, aten op or nn.Softmax) normalizes over; None for anything else."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return module.dim if isinstance(module, nn.Softmax) else None
    if not is_op(node, _SOFTMAXES):
        return None
    return node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")


def _written_out_attention(gm: fx.GraphModule, context: fx.Node) -> _Attention | None:
    """softmax(scale * q @ k^T + mask) @ v as written out with matmuls (Hugging Face's eager attention,
    Swin's window attention) or with bmm over batch * heads (XGLM's): the weights over the last dim,
    perhaps dropped out, cast or viewed with the batch regrouped."""
    operands = _einsum_operands(context, "context")
    if operands is None and (not is_op(context, _MATMULS) or context.kwargs or not all(isinstance(a, fx.Node) for a in context.args[:2])):
        return None
    weights, value = operands or context.args[:2]
    after: list[fx.Node] = []
    while (is_dropout(gm, weights) or _is_cast(weights) or is_identity(gm, weights) or is_op(weights, RESHAPES)) and len(_readers(weights)) == 1:
        after.insert(0, weights)
        weights = data_input(weights)
    if weights is None or _softmax_dim(gm, weights) not in (-1, 3) or len(_readers(weights)) != 1:
        return None
    if not isinstance(weights.args[0], fx.Node):
        return None
    nodes: list[fx.Node] = []
    reads: list[tuple[fx.Node, fx.Node]] = []
    found = _scores_of(gm, weights.args[0], nodes, reads)
    if found is None:
        return None
    query, key = found
    return _Attention((query, key, value), [*nodes, weights, *after, context], reads, 1)


def attention_at(gm: fx.GraphModule, node: fx.Node) -> _Attention | None:
    """The attention `node` ends: a scaled_dot_product_attention call or a written-out one."""
    if not is_op(node, ATTENTION):
        return _written_out_attention(gm, node)
    mask = mask_argument(node)
    return _Attention(tuple(node.args[:3]), [node], [(node, mask)] if mask is not None else [], _heads_per_key_value_head(node))


def _heads_per_key_value_head(attention: fx.Node) -> int | None:
    """How many query heads share each key/value head inside the attention: 1, or with enable_gqa the
    ratio of their head counts (torch.export records the shapes; None when unknown)."""
    if not attention.kwargs.get("enable_gqa", False):
        return 1
    query, key = (argument.meta.get("val") for argument in attention.args[:2])
    if not isinstance(query, torch.Tensor) or not isinstance(key, torch.Tensor) or query.shape[-3] % key.shape[-3]:
        return None
    return int(query.shape[-3] // key.shape[-3])


def _projections(gm: fx.GraphModule, attention: _Attention, width: int, sites_by_node: dict[str, Site]) -> _Projections | None:
    """Query, key and value each from a compressed site or a part of one (`_source`), every part of each
    site read once: three sites (BERT, MiniLM; nn.MultiheadAttention with its in-projection in blocks),
    one packed or block-split site (nn.MultiheadAttention's self-attention, GPT-2), or a query site and
    a packed key/value site (nn.MultiheadAttention's cross-attention)."""
    shared_by = attention.shared_by
    if shared_by is None:
        return None
    sources = [_source(gm, argument, width, sites_by_node, 1 if index == 0 else shared_by) for index, argument in enumerate(attention.inputs)]
    if any(source is None for source in sources) or len({(source.split.head_dim, source.heads_per_group) for source in sources}) != 1:
        return None
    if sources[0].repeats != 1 or sources[1].repeats != sources[2].repeats:
        return None  # the queries' heads are the groups; key and value repeat theirs alike
    heads = width // sources[0].split.head_dim
    ups: dict[str, tuple[int, ...]] = {}  # up site -> the repeats of its parts, in the order of its rows
    for up in dict.fromkeys(source.up.name for source in sources):
        parts = sorted((source for source in sources if source.up.name == up), key=lambda source: source.offset)
        ends = list(itertools.accumulate(width // source.repeats for source in parts))
        shared = parts[0].shared
        if any(source.shared is not shared for source in parts) or set(_readers(shared)) != {source.reader for source in parts}:
            return None
        if [source.offset for source in parts] != [0, *ends[:-1]] or ends[-1] != parts[0].up.out_features:
            return None  # every part read once, side by side, filling the site's output
        # a key/value head every query head shares (multi-query) stays whole as query heads are pruned: 0
        ups[up] = tuple(0 if heads > 1 and source.repeats == heads else source.repeats for source in parts)
        if 0 in ups[up] and any(source.per_head_parts for source in parts):
            return None
    # a split into listed sizes may count heads in several of its sizes, one per part
    resized = tuple(dict.fromkeys(entry for source in sources for entry in (source.sizes | source.split.sizes).items()))
    between = [node for source in sources for node in (*source.nodes, *source.split.products)]
    parts = tuple(len(repeats) for repeats in ups.values())
    repeated = any(source.repeats > 1 for source in sources)
    per_head_parts = tuple(dict.fromkeys(source.up.name for source in sources if source.per_head_parts))
    return _Projections(tuple(ups), sources[0].split.head_dim, resized, between, parts, tuple(ups.values()) if repeated else (), per_head_parts, sources[0].heads_per_group)


def head_width(gm: fx.GraphModule, down: Site, sites_by_node: dict[str, Site], nodes: dict[str, fx.Node]) -> HiddenWidth | None:
    """The attention heads `down` reads, if its input is merged from the heads of one attention
    (`attention_at`) whose query, key and value are split from compressed sites: one each, or one
    fused site (in parts or in blocks)."""
    width = down.in_features
    end, after = _chain_back(gm, site_input(nodes[down.entry_node]))
    attention = attention_at(gm, end)
    if attention is None or len(_readers(end)) != 1:
        return None
    swaps = [n for n in after if is_op(n, _SWAPS)]
    if len(swaps) != 1 or not _merges_heads(swaps[0]):
        return None
    # the first reshape after the swap merges the heads; later ones (a flattening of the tokens) keep the width last
    merged = after[after.index(swaps[0]) + 1 :]
    reshapes = [n for n in merged if is_op(n, RESHAPES)]
    # a merge may read the width from a tensor's shape (reshape(b, t, x.shape[-1])): the copy infers it
    inferred = {n.name: len(shape_entries(n)) - 1 for n in reshapes[:1] if isinstance(shape_entries(n)[-1], fx.Node) and -1 not in shape_entries(n)}
    if not reshapes or not all(keeps_width_last(n, width) or n.name in inferred for n in reshapes):
        return None
    if not all(is_identity(gm, n) for n in merged[merged.index(reshapes[0]) + 1 :] if n not in reshapes):
        return None
    projections = _projections(gm, attention, width, sites_by_node)
    if projections is None:
        return None
    head_dim = projections.head_dim
    heads = width // head_dim
    resized, mask_nodes, products = width_sizes(reshapes, width) | inferred, [], []
    # reshapes between attention and the merge keep (heads, head_dim) apart without naming the head count,
    # or split bmm's (batch * heads, seq, head_dim) into (batch, heads, seq, head_dim)
    for n in (n for n in after[: after.index(reshapes[0])] if is_op(n, RESHAPES)):
        entries = shape_entries(n)
        splits_batch = len(entries) == 4 and entries[1] == heads and tensor_rank(data_input(n)) == 3
        if entries[-1:] != [head_dim] or entries[:-1].count(heads) > splits_batch:
            return None
        resized |= {n.name: 1} if splits_batch else {}
    # views of written-out scores regroup the batch: (..., heads or -1, queries, keys), the head count
    # nowhere else, or (batch * heads, queries, keys) for bmm
    for n in (n for n in attention.nodes if is_op(n, RESHAPES)):
        entries = shape_entries(n)
        merged_batch = _batch_times_heads(n, 0, heads) if len(entries) == 3 else None
        if merged_batch is not None:
            resized |= merged_batch[0]
            products += merged_batch[1]
        elif len(entries) >= 3 and entries[-3] in (heads, -1) and heads not in entries[:-3]:
            resized |= {n.name: len(entries) - 3} if entries[-3] == heads else {}
        else:
            return None
    mask = mask_argument(end) if is_op(end, ATTENTION) else None
    expansion = _mask_expanded_over_heads(mask, heads) if mask is not None else None
    if expansion is not None:  # the student path expands the mask over its kept heads
        mask_nodes, mask_sizes = expansion
        resized |= mask_sizes
    names = {node.name for node in (*attention.nodes, *after, *projections.between, *mask_nodes, *products)}
    ordered = tuple(name for name in nodes if name in names)
    # grouped-query attention: a key/value head and the query heads sharing it are pruned together; so are a model-parallel group's heads
    group = head_dim * max((repeats for parts in projections.repeats for repeats in parts), default=1) * projections.heads_per_group
    return HiddenWidth(
        "heads", projections.ups, down.name, ordered, width, group, tuple(dict.fromkeys((*projections.resized, *resized.items()))),
        parts=projections.parts, repeats=projections.repeats, per_head_parts=projections.per_head_parts, heads_per_group=projections.heads_per_group,
    )


def mask_argument(attention: fx.Node) -> fx.Node | None:
    """The attn_mask tensor a scaled_dot_product_attention reads, if any."""
    mask = attention.kwargs.get("attn_mask", attention.args[3] if len(attention.args) > 3 else None)
    return mask if isinstance(mask, fx.Node) else None


def attention_reads(gm: fx.GraphModule, between: tuple[str, ...], nodes: dict[str, fx.Node]) -> list[tuple[fx.Node, fx.Node]]:
    """(the node of a heads width that reads it, the tensor) for each tensor from outside the width its
    attention reads beside the heads, `between` one call's nodes of the width: an attn_mask (the mask an
    expansion over the heads reads), a mask or scale applied to written-out scores. The student path
    shares them, sliced to its heads where they hold one entry per head (find_hidden_widths)."""
    [attention] = filter(None, (attention_at(gm, nodes[name]) for name in between))
    reads = []
    for reader, tensor in attention.reads:
        while tensor.name in between:
            reader, tensor = tensor, data_input(tensor)
        reads.append((reader, tensor))
    return reads

