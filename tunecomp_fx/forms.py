"""The forms a compressible site takes in a captured graph, as a rule table (pattern, then callback),
and the two feature layouts a site's student is built in.

A site is a linear map over the features of its input x, with its weight held as a parameter:
- layout "linear": features on the last dim, W is (out, in): `nn.Linear`, `F.linear`, `aten.linear`,
  and `x @ W.T (+ b)`;
- layout "conv1x1": channels of (N, C, H, W), W is (out, in, 1, 1): a pointwise `nn.Conv2d`, `F.conv2d`
  or `aten.conv2d` (kernel 1, no padding or padding "same", one group; the overload taking padding as a
  string too, as torch.export records `padding="same"`). A stride s (ResNet's downsampling shortcut) is
  the map of x[..., ::s, ::s]: the student's down convolution takes the stride;
- layout "pointwise_conv1d": channels of (N, C, L), W is (out, in, 1): a pointwise `nn.Conv1d`,
  `F.conv1d` or `aten.conv1d` (speech and point-cloud models), a stride as above along L.
A linear site's weight may also be read by embedding lookups (`match_lookup`), W[ids], when an output
head is tied to its embedding; with compress_embeddings a table that lookups alone read is a site of
its own, its lookups plain or bags of rows summed or averaged (nn.EmbeddingBag).
Every pass that builds, slices or densifies a student goes through `Layout`, so the layouts share
one mechanism: a student is down (in -> r) then up (r -> out), two modules of the site's layout.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

aten = torch.ops.aten


@dataclass(frozen=True)
class Layout:
    name: str
    feature_dim: int  # counted from the end: -1 for (..., features), -3 for (N, C, H, W)
    module_type: type[nn.Module]

    def rows(self, x: torch.Tensor, stride: int = 1) -> torch.Tensor:
        """The input as (positions, features): one row per token, or per pixel the site reads."""
        if stride > 1:
            x = x[(..., *[slice(None, None, stride)] * (-1 - self.feature_dim))]
        return x.movedim(self.feature_dim, -1).reshape(-1, x.shape[self.feature_dim])

    def mask_shape(self, rank: int) -> tuple[int, ...]:
        """A per-rank mask that broadcasts over the student's hidden activation."""
        return (rank,) + (1,) * (-1 - self.feature_dim)

    def make(self, in_features: int, out_features: int, bias: bool, like: torch.Tensor, stride: int = 1) -> nn.Module:
        factory = {"device": like.device, "dtype": like.dtype}
        if self.module_type is nn.Linear:
            return nn.Linear(in_features, out_features, bias=bias, **factory)
        return self.module_type(in_features, out_features, 1, stride=stride, bias=bias, **factory)


LAYOUTS = {
    layout.name: layout
    for layout in (Layout("linear", -1, nn.Linear), Layout("conv1x1", -3, nn.Conv2d), Layout("pointwise_conv1d", -2, nn.Conv1d))
}
_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d)


def layout_of(module: nn.Module) -> Layout:
    """The layout of a student module (nn.Linear, or a pointwise nn.Conv2d or nn.Conv1d)."""
    for layout in LAYOUTS.values():
        if type(module) is layout.module_type:
            return layout
    raise TypeError(f"{type(module).__name__} is not a student module (nn.Linear, or a pointwise nn.Conv2d or nn.Conv1d)")


def rebuilt(like: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A new module of `like`'s layout (and stride) holding `weight` (out, in[, 1[, 1]]) and `bias`."""
    stride = like.stride[0] if isinstance(like, _CONVOLUTIONS) else 1
    module = layout_of(like).make(weight.shape[1], weight.shape[0], bias is not None, weight, stride)
    with torch.no_grad():
        module.weight.copy_(weight.reshape(module.weight.shape))
        if bias is not None:
            module.bias.copy_(bias)
    return module


@dataclass(frozen=True)
class SiteMatch:
    """A linear map found at a node: y = W x (+ b)."""

    form: str
    layout: str
    entry: fx.Node  # the node that reads x (`site_input`)
    output: fx.Node  # the node whose value is y
    weight: str  # target of the weight parameter
    bias: str | fx.Node | None  # target of the bias parameter, or the node computing it
    nodes: tuple[fx.Node, ...]  # every node of the site, the weight's get_attr included
    stride: int = 1  # of a pointwise convolution


def _argument(node: fx.Node, index: int, name: str, default: object = None) -> object:
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def site_input(entry: fx.Node) -> fx.Node:
    """x, as the entry node of a site reads it now (a rewrite of an earlier site may have changed it)."""
    return _argument(entry, 0, "input")


def _bias(node: object) -> str | fx.Node | None:
    if isinstance(node, fx.Node) and node.op == "get_attr":
        return node.target
    return node if isinstance(node, fx.Node) else None


def is_parameter(gm: fx.GraphModule, node: object) -> bool:
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        return False
    try:
        gm.get_parameter(node.target)
    except AttributeError:
        return False
    return True


def pointwise_stride(weight: torch.Tensor, stride: object, padding: object, groups: object) -> int | None:
    """The stride of a convolution that is a linear map over channels (a kernel of 1 or 1x1, no
    padding, one group, the same stride every way), else None."""
    strides = set(stride) if isinstance(stride, (list, tuple)) else {stride}
    paddings = set(padding) if isinstance(padding, (list, tuple)) else {padding}
    no_padding = paddings <= {0, "valid"} or (paddings == {"same"} and strides == {1})
    pointwise = weight.dim() in (3, 4) and all(size == 1 for size in weight.shape[2:])
    if pointwise and len(strides) == 1 and no_padding and groups == 1:
        return int(next(iter(strides)))
    return None


def _convolution_layout(weight: torch.Tensor) -> str:
    return "conv1x1" if weight.dim() == 4 else "pointwise_conv1d"


def compressible_module(module: nn.Module) -> str | None:
    """The layout of a module whose forward is a plain linear map over features, else None."""
    if isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward:
        return "linear"
    convolution = next((kind for kind in _CONVOLUTIONS if isinstance(module, kind)), None)
    if (
        convolution is not None
        and type(module).forward is convolution.forward
        and type(module)._conv_forward is convolution._conv_forward
        and pointwise_stride(module.weight, module.stride, module.padding, module.groups) is not None
    ):
        return _convolution_layout(module.weight)
    return None


def _module_site(gm: fx.GraphModule, node: fx.Node) -> SiteMatch | None:
    if node.op != "call_module" or not node.args:
        return None
    module = gm.get_submodule(node.target)
    layout = compressible_module(module)
    if layout is None:
        return None
    bias = f"{node.target}.bias" if module.bias is not None else None
    stride = module.stride[0] if layout != "linear" else 1
    return SiteMatch("call_module", layout, node, node, f"{node.target}.weight", bias, (node,), stride)


LINEAR_FUNCTIONS = {F.linear: "F.linear", aten.linear.default: "aten.linear"}
_CONV_FUNCTIONS = {
    F.conv2d: "F.conv2d", torch.conv2d: "F.conv2d", aten.conv2d.default: "aten.conv2d", aten.conv2d.padding: "aten.conv2d",
    F.conv1d: "F.conv1d", torch.conv1d: "F.conv1d", aten.conv1d.default: "aten.conv1d", aten.conv1d.padding: "aten.conv1d",
}  # fmt: skip


def _function_site(gm: fx.GraphModule, node: fx.Node) -> SiteMatch | None:
    if node.op != "call_function" or not (node.target in LINEAR_FUNCTIONS or node.target in _CONV_FUNCTIONS):
        return None
    x, weight = _argument(node, 0, "input"), _argument(node, 1, "weight")
    if not isinstance(x, fx.Node) or not is_parameter(gm, weight):
        return None
    bias = _argument(node, 2, "bias")
    if node.target in LINEAR_FUNCTIONS:
        return SiteMatch(LINEAR_FUNCTIONS[node.target], "linear", node, node, weight.target, _bias(bias), (node, weight))
    stride, padding = _argument(node, 3, "stride", 1), _argument(node, 4, "padding", 0)
    weight_value = gm.get_parameter(weight.target)
    stride = pointwise_stride(weight_value, stride, padding, _argument(node, 6, "groups", 1))
    if stride is None:
        return None
    layout = _convolution_layout(weight_value)
    return SiteMatch(_CONV_FUNCTIONS[node.target], layout, node, node, weight.target, _bias(bias), (node, weight), stride)


_MATMULS = {operator.matmul, torch.matmul, aten.matmul.default}
_ADDS = {operator.add, torch.add, aten.add.Tensor}


def _is_call(node: fx.Node, functions: set[Callable], method: str) -> bool:
    return (node.op == "call_function" and node.target in functions) or (node.op == "call_method" and node.target == method)


def _transposed_parameter(gm: fx.GraphModule, node: object) -> fx.Node | None:
    """W's get_attr when `node` is W.T / W.t() / W.transpose(0, 1) / W.permute(1, 0) of a 2-D parameter."""
    if not isinstance(node, fx.Node) or not node.args or not is_parameter(gm, node.args[0]):
        return None
    weight = node.args[0]
    if gm.get_parameter(weight.target).dim() != 2:
        return None
    rest = tuple(node.args[1:])
    transposes = (
        (node.op == "call_function" and node.target is getattr and rest in (("T",), ("mT",)))
        or _is_call(node, {torch.t, aten.t.default, aten.numpy_T.default}, "t")
        or (_is_call(node, {torch.transpose, aten.transpose.int}, "transpose") and {d % 2 for d in rest} == {0, 1})
        or (_is_call(node, {torch.permute, aten.permute.default}, "permute") and tuple(rest[0] if len(rest) == 1 else rest) == (1, 0))
    )
    return weight if transposes else None


def _matmul_site(gm: fx.GraphModule, node: fx.Node) -> SiteMatch | None:
    """x @ W.T, and x @ W.T + b with b a 1-D parameter: a linear map of x written out by hand."""
    if not _is_call(node, _MATMULS, "matmul") or len(node.args) != 2 or node.kwargs:
        return None
    x, transposed = node.args
    weight = _transposed_parameter(gm, transposed)
    if weight is None or not isinstance(x, fx.Node) or x.op == "get_attr":
        return None
    out_features = gm.get_parameter(weight.target).shape[0]
    nodes = (node, transposed, weight)
    add = next(iter(node.users)) if len(node.users) == 1 else None
    if add is not None and _is_call(add, _ADDS, "add") and len(add.args) == 2 and not add.kwargs:
        bias = add.args[1] if add.args[0] is node else add.args[0]
        if is_parameter(gm, bias) and tuple(gm.get_parameter(bias.target).shape) == (out_features,):
            return SiteMatch("matmul", "linear", node, add, weight.target, bias.target, nodes + (add, bias))
    return SiteMatch("matmul", "linear", node, node, weight.target, None, nodes)


SITE_RULES: tuple[Callable[[fx.GraphModule, fx.Node], SiteMatch | None], ...] = (_module_site, _function_site, _matmul_site)


def match_site(gm: fx.GraphModule, node: fx.Node) -> SiteMatch | None:
    """The site whose output is computed at `node`'s rule, if any rule matches it."""
    for rule in SITE_RULES:
        match = rule(gm, node)
        if match is not None:
            return match
    return None


@dataclass(frozen=True)
class Bag:
    """How a bag read combines its rows: summed or averaged per bag, both linear in the table, so that
    the bag of the student's up.weight rows times down.weight is the bag of W's rows (a "max" bag is not)."""

    mode: str  # "sum" or "mean"
    offsets: fx.Node | None  # where each bag starts in 1-D ids; None: each row of 2-D ids is a bag
    per_sample_weights: fx.Node | None = None  # "sum" alone: each id's row scaled
    include_last_offset: bool = False


@dataclass(frozen=True)
class LookupMatch:
    """An embedding lookup, y = W[ids], or a bag of such rows summed or averaged (`bag`): a read of a
    table or of a linear site's weight (an output head tied to its embedding, as GPT-2's); its student
    reads up.weight the same way, then multiplies by down.weight."""

    node: fx.Node  # the lookup, whose value is y
    ids: fx.Node
    weight: str  # target of the table parameter
    padding_idx: int | None = None  # the row the lookup leaves out of the gradient (and of a bag)
    bag: Bag | None = None
    reader: fx.Node | None = None  # the node that reads the table, where it is not `node` (aten's bag, y its first output)

    @property
    def table_reader(self) -> fx.Node:
        return self.reader or self.node

    def read(self, graph: fx.Graph, table: fx.Node) -> fx.Node:
        """The same read of another table of the same rows (a student's up.weight), at the graph's insert point."""
        padding = {"padding_idx": self.padding_idx} if self.padding_idx is not None else {}
        if self.bag is None:
            return graph.call_function(F.embedding, (self.ids, table), padding)
        bag = self.bag
        options = {"mode": bag.mode, "per_sample_weights": bag.per_sample_weights, "include_last_offset": bag.include_last_offset}
        return graph.call_function(F.embedding_bag, (self.ids, table, bag.offsets), options | padding)


_EMBEDDINGS = {F.embedding, aten.embedding.default}
# aten's bag ops share their leading arguments: (weight, indices, offsets, scale_grad_by_freq, mode, sparse,
# per_sample_weights, include_last_offset, padding_idx), mode 0 sum, 1 mean, 2 max; y is their first output.
_ATEN_BAGS = {aten.embedding_bag.default, aten.embedding_bag.padding_idx, aten._embedding_bag.default, aten._embedding_bag_forward_only.default}
_LINEAR_BAG_MODES = ("sum", "mean")


def _aten_bag(gm: fx.GraphModule, node: fx.Node) -> LookupMatch | None:
    """`getitem(aten bag op, 0)` at `node`, the bag's other outputs unread (bag sizes and row indices
    that a student's bag would not give)."""
    if not (node.op == "call_function" and node.target is operator.getitem and node.args[1] == 0):
        return None
    read = node.args[0]
    if not (isinstance(read, fx.Node) and read.op == "call_function" and read.target in _ATEN_BAGS):
        return None
    if any(user is not node and user.users for user in read.users):
        return None
    mode = ("sum", "mean", "max")[_argument(read, 4, "mode", 0)]
    table, ids, offsets = read.args[:3]
    padding_idx = _argument(read, 8, "padding_idx", -1)
    bag = Bag(mode, offsets, _argument(read, 6, "per_sample_weights"), _argument(read, 7, "include_last_offset", False))
    if mode not in _LINEAR_BAG_MODES or not (isinstance(ids, fx.Node) and is_parameter(gm, table)):
        return None
    return LookupMatch(node, ids, table.target, None if padding_idx in (None, -1) else padding_idx, bag, read)


def match_lookup(gm: fx.GraphModule, node: fx.Node) -> LookupMatch | None:
    """A read of rows of a parameter, as is (no max_norm, which renormalizes the table in place): an
    nn.Embedding module, `F.embedding(ids, W)` or `aten.embedding(W, ids)`; or a bag of rows summed or
    averaged: an nn.EmbeddingBag module, `F.embedding_bag` or aten's bag ops."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        ids = _argument(node, 0, "input")
        if not isinstance(ids, fx.Node) or getattr(module, "max_norm", None) is not None:
            return None
        weight = f"{node.target}.weight"
        if isinstance(module, nn.Embedding) and type(module).forward is nn.Embedding.forward:
            return LookupMatch(node, ids, weight, module.padding_idx)
        if isinstance(module, nn.EmbeddingBag) and type(module).forward is nn.EmbeddingBag.forward and module.mode in _LINEAR_BAG_MODES:
            bag = Bag(module.mode, _argument(node, 1, "offsets"), _argument(node, 2, "per_sample_weights"), module.include_last_offset)
            return LookupMatch(node, ids, weight, module.padding_idx, bag)
        return None
    if node.op != "call_function":
        return None
    if node.target is F.embedding_bag:
        ids, table, offsets = _argument(node, 0, "input"), _argument(node, 1, "weight"), _argument(node, 2, "offsets")
        bag = Bag(_argument(node, 6, "mode", "mean"), offsets, _argument(node, 8, "per_sample_weights"), _argument(node, 9, "include_last_offset", False))
        plain = _argument(node, 3, "max_norm") is None and bag.mode in _LINEAR_BAG_MODES
        if not (plain and isinstance(ids, fx.Node) and is_parameter(gm, table)):
            return None
        return LookupMatch(node, ids, table.target, _argument(node, 10, "padding_idx"), bag)
    if node.target not in _EMBEDDINGS:
        return _aten_bag(gm, node)
    if node.target is F.embedding:
        ids, table, padding_idx = _argument(node, 0, "input"), _argument(node, 1, "weight"), _argument(node, 2, "padding_idx")
        if _argument(node, 3, "max_norm") is not None:
            return None
    else:
        table, ids, padding_idx = _argument(node, 0, "weight"), _argument(node, 1, "indices"), _argument(node, 2, "padding_idx", -1)
        padding_idx = None if padding_idx == -1 else padding_idx  # aten's -1: no padding row
    if not (isinstance(ids, fx.Node) and is_parameter(gm, table)):
        return None
    return LookupMatch(node, ids, table.target, padding_idx)


# Every op that reads rows of a table, plain lookups or not (max_norm renormalizes the table; a "max" bag is not linear).
_TABLE_READS = _EMBEDDINGS | _ATEN_BAGS | {F.embedding_bag}


def read_table(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """The parameter an embedding read of any kind at `node` takes rows of (an nn.Embedding or
    nn.EmbeddingBag module, F.embedding(_bag), aten's embedding ops), plain lookup or not."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return f"{node.target}.weight" if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) else None
    if node.op != "call_function" or node.target not in _TABLE_READS:
        return None
    table = _argument(node, 1, "weight") if node.target in (F.embedding, F.embedding_bag) else node.args[0]
    return table.target if is_parameter(gm, table) else None


def match_sites(gm: fx.GraphModule) -> list[SiteMatch]:
    """Every site of the graph, in graph order; a node belongs to at most one site."""
    matches, taken = [], set()
    for node in gm.graph.nodes:
        match = match_site(gm, node) if node not in taken else None
        if match is not None:
            matches.append(match)
            taken.update(match.nodes)
    return matches
