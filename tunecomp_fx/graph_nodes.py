"""Node predicates and shape arguments shared by the hidden-width matchers (`neuron_widths`,
`head_widths`) and by the passes that scale a student copy's sizes to the kept neurons or heads."""

from __future__ import annotations

import operator
import sys
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

aten = torch.ops.aten

RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, torch.reshape, "view", "reshape"}
PERMUTES = {aten.permute.default, torch.permute, "permute"}
TRANSPOSES = {aten.transpose.int, torch.transpose, "transpose"}


def shape_entries(node: fx.Node) -> list:
    """The sizes a node sets: the shape a view/reshape asks for (one list or separate arguments), the
    sizes of an unflatten or of a split into parts of given sizes, or the factors of a product that
    computes a size (batch * heads under torch.export)."""
    if node.target is aten.unflatten.int:
        return list(node.args[2])
    if node.target is aten.split_with_sizes.default:
        return list(node.args[1])
    if node.target is operator.mul:
        return list(node.args)
    rest = node.args[1:]
    if len(rest) == 1 and _is_shape_sum(rest[0]):
        return [rest[0].args[0], *rest[0].args[1]]
    return list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else list(rest)


def _is_shape_sum(shape: object) -> bool:
    """A shape built as sizes read at run time plus literal sizes, x.shape[:-1] + (-1,) (timm's MaxViT):
    its entries are the prefix (one node for several sizes) then the literals."""
    return isinstance(shape, fx.Node) and shape.target is operator.add and isinstance(shape.args[1], (list, tuple))


def splits_the_last_dim(node: fx.Node) -> bool:
    """Whether a reshape's shape is its input's sizes but the last, read at run time, plus literal
    sizes: x.view(x.size()[:-1] + (heads, head_dim)) (Hugging Face's PVT v2 under symbolic tracing),
    or with x.shape[:-1]; `shape_entries` then gives that prefix first."""
    rest = node.args[1:]
    if len(rest) != 1 or not _is_shape_sum(rest[0]):
        return False
    prefix = rest[0].args[0]
    if not isinstance(prefix, fx.Node) or prefix.target is not operator.getitem or prefix.args[1] != slice(None, -1, None):
        return False
    read = prefix.args[0]
    reads_size = read.op == "call_method" and read.target == "size" and len(read.args) == 1
    reads_shape = read.target is getattr and read.args[1] == "shape"
    return (reads_size or reads_shape) and read.args[0] is node.args[0]


def with_shape(node: fx.Node, entries: Sequence) -> tuple:
    """`node`'s arguments with its sizes (`shape_entries`) replaced, in the form the node gave them."""
    if node.target is aten.unflatten.int:
        return (*node.args[:2], list(entries))
    if node.target is aten.split_with_sizes.default:
        return (node.args[0], list(entries), *node.args[2:])
    if node.target is operator.mul:
        return tuple(entries)
    rest = node.args[1:]
    if len(rest) == 1 and _is_shape_sum(rest[0]):
        if list(entries) == shape_entries(node):
            return node.args
        with node.graph.inserting_before(node):  # a sum of its own: the original may have other readers
            return (node.args[0], node.graph.call_function(operator.add, (entries[0], tuple(entries[1:]))))
    packed = len(rest) == 1 and isinstance(rest[0], (list, tuple))
    return (node.args[0], list(entries)) if packed else (node.args[0], *entries)


MAX_END = sys.maxsize  # a slice's end when it runs to the end of the dim (x[..., start:] under torch.export)


def rescale_shape_entry(node: fx.Node, index: int, kept: int, width: int) -> None:
    """Scale the size `index` of a node (`shape_entries`), which counts `width` neurons (or their
    heads), to `kept` of them; a size read at run time (a node) is inferred instead (-1: the node's
    other sizes are fixed), and stays inferred. A slice's bounds (dim, start, end) scale together,
    an end that runs to the end of the dim staying so."""
    if node.target is aten.slice.Tensor:
        _, dim, start, end = node.args
        node.args = (node.args[0], dim, start * kept // width, end if end == MAX_END else end * kept // width)
        return
    entries = shape_entries(node)
    entry = entries[index]
    entries[index] = -1 if isinstance(entry, fx.Node) or entry == -1 else entry * kept // width
    node.args = with_shape(node, entries)


def keeps_width_last(node: fx.Node, width: int) -> bool:
    """Whether a reshape leaves `width` as the last dim, by name or inferred (a reshape of the tokens)."""
    return is_op(node, RESHAPES) and shape_entries(node)[-1:] in ([-1], [width])


def width_sizes(reshapes: Sequence[fx.Node], width: int) -> dict[str, int]:
    """Reshape name -> index of its last size, for the reshapes that name `width` there (the student
    copy scales them to what is kept)."""
    return {n.name: len(shape_entries(n)) - 1 for n in reshapes if shape_entries(n)[-1] == width}


def is_op(node: fx.Node, targets: set) -> bool:
    """Whether `node` calls one of `targets` (functions, aten ops or method names)."""
    return node.op in ("call_function", "call_method") and node.target in targets


def is_last_dim(tensor: fx.Node, dim: object) -> bool:
    """Whether `dim` is the last dim of `tensor`: -1, or its rank less one where torch.export recorded
    the shape (it writes x.split(w, dim=-1) of a 3-d x with dim=2)."""
    rank = tensor_rank(tensor)
    return dim == -1 or (rank is not None and dim == rank - 1)


CHUNKS = {aten.chunk.default, torch.chunk, "chunk"}


def chunk_parts(node: fx.Node) -> tuple[int, int] | None:
    """(chunks, dim) of a chunk of one tensor, x.chunk(chunks, dim) as a method, function or aten call;
    None for any other node."""
    if not is_op(node, CHUNKS) or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    parts = node.args[1] if len(node.args) > 1 else node.kwargs.get("chunks")
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    return (parts, dim) if isinstance(parts, int) and parts > 0 and isinstance(dim, int) else None


def is_identity(gm: fx.GraphModule, node: fx.Node) -> bool:
    """An nn.Identity call (timm's q_norm, k_norm and norm when those norms are off)."""
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Identity)


DROPOUTS = {aten.dropout.default, F.dropout}


def is_dropout(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A dropout of one tensor: F.dropout, its aten op or an nn.Dropout call."""
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), nn.Dropout)
    return node.op == "call_function" and node.target in DROPOUTS and node.args[:1] == tuple(node.all_input_nodes)


def tensor_rank(node: fx.Node | None) -> int | None:
    """How many dims the tensor `node` computes has, where torch.export recorded it."""
    value = node.meta.get("val") if node is not None else None
    return value.dim() if isinstance(value, torch.Tensor) else None


def data_input(node: fx.Node) -> fx.Node | None:
    """The tensor a reshape, swap, contiguous or identity reads (its other inputs are sizes)."""
    return node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
