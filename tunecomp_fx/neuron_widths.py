"""Neuron widths (prune_neurons): an up-projection's output passes only through elementwise nodes (an
activation, perhaps a dropout or an identity, or an activation written out in arithmetic on the
width and numbers; reshapes of the tokens) into a down-projection, as in a transformer's FFN; a
gated activation reads a second up-projection too (LLaMA's SwiGLU); between pointwise convolutions
also per-channel modules (`tunecomp_fx.per_channel`: batch norms, depthwise convolutions, as in
MobileNets; grouped convolutions, as in RegNet and ResNeXt, whose groups are then pruned whole)
and a squeeze-excitation (`_squeeze_excitation`: its gates, computed from the width's mean over the
image by two pointwise convolutions or linear layers, multiply the width, as in EfficientNet,
MobileNetV3 and SENet; the two layers stay dense, copied into the student path with the kept
channels' inputs and outputs alone), and between linear layers tokens swapped to channels and
viewed as an image for a depthwise convolution, then flattened and swapped back (PVT v2's and
SegFormer's FFN; sizes the region reads from its own shapes are read in the student path from the
students'), or flattened to rows for a BatchNorm1d and reshaped back (LeViT's
`bn(x.flatten(0, 1)).reshape_as(x)`). Dropping a neuron removes a row of each up, the activation's
element (the per-channel modules' channel; the squeeze-excitation's input and gate) and a column of down."""

from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from tunecomp_fx.forms import LAYOUTS, match_site, site_input
from tunecomp_fx.graph_nodes import RESHAPES, TRANSPOSES, chunk_parts, data_input, is_dropout, is_identity, is_last_dim, is_op, keeps_width_last, shape_entries, width_sizes
from tunecomp_fx.per_channel import channel_group, is_per_channel
from tunecomp_fx.sites import HiddenWidth, Site

aten = torch.ops.aten

# Elementwise functions of one tensor: a neuron's output depends on that neuron's input alone.
_ACTIVATION_FUNCTIONS = {
    aten.gelu.default, aten.relu.default, aten.silu.default, aten.tanh.default, aten.sigmoid.default,
    aten.hardtanh.default, aten.hardswish.default, aten.hardsigmoid.default, aten.leaky_relu.default,
    aten.elu.default, aten.selu.default, aten.mish.default, aten.softplus.default,
    aten.erf.default, aten.square.default,  # ESM's GELU written out with erf; Nemotron's and Persimmon's squared ReLU
    aten.relu6.default, aten.relu_.default, aten.silu_.default, aten.hardtanh_.default, aten.hardswish_.default,  # in place: inplace=True
    aten.hardsigmoid_.default, aten.leaky_relu_.default, aten.elu_.default, aten.mish_.default,
    F.gelu, F.relu, F.silu, F.relu6, F.hardtanh, F.hardswish, F.hardsigmoid, F.leaky_relu, F.elu, F.selu,
    F.mish, F.softplus, torch.relu, torch.tanh, torch.sigmoid, torch.erf, torch.square,
}
_ACTIVATION_METHODS = {"relu", "tanh", "sigmoid", "erf", "square"}
_ACTIVATION_MODULES = (
    nn.GELU, nn.ReLU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.ReLU6, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid,
    nn.LeakyReLU, nn.ELU, nn.SELU, nn.Mish, nn.Softplus,
)


# Arithmetic of tensors and numbers: a neuron's output depends on that neuron alone when every tensor
# it reads is of the same width (an activation written out, as GPT-2's tanh GELU under torch.export).
_ARITHMETIC = {
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.pow.Tensor_Scalar,
    operator.add, operator.sub, operator.mul, operator.truediv, operator.pow,
    torch.add, torch.sub, torch.mul, torch.div, torch.pow, "add", "sub", "mul", "div", "pow",
}


# Paddings of the image dims, each channel by itself (before a strided depthwise convolution); one
# that padded the channels too would leave the down site reading more than the width
_PADDINGS = (nn.ZeroPad1d, nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReplicationPad1d, nn.ReplicationPad2d)
_PADDING_FUNCTIONS = {F.pad, aten.constant_pad_nd.default, aten.pad.default}


def _elementwise(gm: fx.GraphModule, node: fx.Node, width: int, channel_first: bool) -> str | None:
    """"activation", "dropout", "identity" (timm's Mlp has an nn.Identity norm when the norm is off),
    "arithmetic" (`_ARITHMETIC`, of tensors and numbers), "reshape" (of the tokens: the width stays
    last), "channelwise" (`channel_group`, for widths in dim 1: pointwise convolutions' channels),
    "padding" (`_PADDINGS`, widths in dim 1), or None when `node` is none of them. Which tensors it
    reads is the caller's to check."""
    if channel_first and channel_group(gm, node, width) is not None:
        return "channelwise"
    if channel_first and (is_op(node, _PADDING_FUNCTIONS) or (node.op == "call_module" and isinstance(gm.get_submodule(node.target), _PADDINGS))):
        return "padding"
    if is_op(node, _ARITHMETIC):
        return "arithmetic" if not node.kwargs and all(isinstance(a, (fx.Node, int, float)) for a in node.args) else None
    if is_op(node, RESHAPES):  # with the width in dim 1, `_step` knows the reshapes
        return "reshape" if not channel_first and keeps_width_last(node, width) else None
    tensors = node.all_input_nodes
    if len(tensors) != 1 or node.args[:1] != (tensors[0],):
        return None
    if is_dropout(gm, node):
        return "dropout"
    if node.op == "call_function":
        return "activation" if node.target in _ACTIVATION_FUNCTIONS else None
    if node.op == "call_method":
        return "activation" if node.target in _ACTIVATION_METHODS else None
    if node.op == "call_module":
        if is_identity(gm, node):
            return "identity"
        return "activation" if isinstance(gm.get_submodule(node.target), _ACTIVATION_MODULES) else None
    return None


_SHAPE_METHODS = {"size"}
_FLATTENS = {aten.flatten.using_ints, torch.flatten, "flatten"}


def _is_shape_read(node: fx.Node) -> bool:
    """x.shape, x.size(...), aten.sym_size or an item of one: sizes, not values, of what it reads."""
    if node.op == "call_function" and node.target is getattr:
        return node.args[1:] == ("shape",)
    if node.target is operator.getitem and isinstance(node.args[0], fx.Node):
        return _is_shape_read(node.args[0])
    return is_op(node, _SHAPE_METHODS | {aten.sym_size.int})


def _swaps_tokens(node: fx.Node | None) -> bool:
    return node is not None and is_op(node, TRANSPOSES) and tuple(node.args[1:]) in ((1, 2), (2, 1)) and not node.kwargs


def _to_image(node: fx.Node, width: int, sizes: set[fx.Node]) -> bool:
    """view(batch, width, height, width_of_image) of tokens swapped to (batch, width, seq): the width
    named there, or read from a shape the region reads (PVT v2's and SegFormer's depthwise
    convolution over the tokens: x.transpose(1, 2).view(B, C, H, W))."""
    entries = shape_entries(node) if is_op(node, RESHAPES) else []
    return len(entries) == 4 and (entries[1] == width or entries[1] in sizes)


_RESHAPE_AS = {"reshape_as", aten.reshape_as.default}
_EXPAND_AS = {"expand_as", aten.expand_as.default}
_LIKE = _RESHAPE_AS | _EXPAND_AS  # read their second tensor for its shape alone (methods traced, aten ops exported)


def flattens_tokens(node: fx.Node) -> bool:
    """x.flatten(0, 1): (batch, tokens, width) to (batch * tokens, width), for a BatchNorm1d of each
    neuron over all tokens (LeViT's); find_hidden_widths checks on the example inputs that x has three dims."""
    return is_op(node, _FLATTENS) and tuple(node.args[1:]) == (0, 1) and not node.kwargs


def _step(
    gm: fx.GraphModule, node: fx.Node, width: int, channels: bool, sizes: set[fx.Node], placed: dict[fx.Node, bool]
) -> tuple[str, bool] | None:
    """The kind of `node`, read by the region with the width last (or in dim 1, `channels`), and where
    the width is in its output: `_elementwise`'s kinds, "swap" into dim 1 (tokens to an image, then
    `_to_image`) and back (after a flatten(2) of the image), or "flatten_tokens" into dim 1 of
    (batch * tokens, width) and back by reshape_as of a tensor of the region with the width last; a
    squeeze-excitation's gates from linear layers viewed as (batch, width, 1, 1) and expand_as the image."""
    if not channels and flattens_tokens(node):
        return "flatten_tokens", True
    if is_op(node, _LIKE) and len(node.args) == 2 and node.args[1] in placed:
        if node.target in _RESHAPE_AS and channels and placed[node.args[1]] is False:
            return "reshape", False
        if node.target in _EXPAND_AS and placed[node.args[1]] == channels:
            return "broadcast", channels  # gates (batch, width, 1, 1) over the image
        return None
    if channels and _to_image(node, width, sizes) and shape_entries(node)[2:] == [1, 1]:
        return "reshape", True
    if _swaps_tokens(node):
        into_image = not channels and len(node.users) == 1 and _to_image(next(iter(node.users)), width, sizes)
        out_of_image = channels and data_input(node) is not None and is_op(data_input(node), _FLATTENS)
        return ("swap", not channels) if into_image or out_of_image else None
    if channels and _to_image(node, width, sizes) and _swaps_tokens(data_input(node)):
        return "reshape", True
    if channels and is_op(node, _FLATTENS) and node.args[1:] in ((2,), (2, -1)) and not node.kwargs:
        return "reshape", True  # (batch, width, height, width of image) to (batch, width, seq)
    kind = _elementwise(gm, node, width, channels)
    return (kind, channels) if kind is not None else None


_MEANS = {aten.mean.dim, torch.mean, "mean"}


def _squeezes_image(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether `node` averages each channel over the image: x.mean((2, 3)) (keeping the dims or not) or
    an adaptive average pooling to 1 (a squeeze-excitation's squeeze)."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return isinstance(module, nn.AdaptiveAvgPool2d) and module.output_size in (1, (1, 1))
    if is_op(node, {aten.adaptive_avg_pool2d.default, F.adaptive_avg_pool2d}):
        return node.args[1:] in ((1,), ((1, 1),), ([1, 1],)) and not node.kwargs
    if not is_op(node, _MEANS) or len(node.args) < 2 or not isinstance(node.args[1], (list, tuple)):
        return False
    return sorted(d % 4 for d in node.args[1]) == [2, 3] and set(node.kwargs) <= {"keepdim"}


def _mixes_channels(gm: fx.GraphModule, node: fx.Node) -> tuple[int, int] | None:
    """(out, in) channels of a 1 x 1 convolution of stride 1 or a linear layer (`match_site`: a module
    call, or a function on the graph's tensors), else None."""
    match = match_site(gm, node)
    if match is None or match.layout not in ("conv1x1", "linear") or match.stride != 1 or match.output is not node:
        return None
    out_channels, in_channels = gm.get_parameter(match.weight).shape[:2]
    return out_channels, in_channels


def _squeeze_excitation(gm: fx.GraphModule, squeeze: fx.Node, width: int) -> dict[fx.Node, str] | None:
    """A squeeze-excitation's gates for the `width` channels `squeeze` reads, each node the one reader of
    the one before, by kind: the "squeeze" (`_squeezes_image`), a "reshape" to (batch, width) for a
    linear layer (sizes read from shapes), a pointwise convolution or linear layer from the width
    ("reduce"), steps without parameters ("excite": an activation) or a batch norm of the bottleneck
    ("bottleneck_norm", ReXNet's; the student path gets a copy of its own), one back to the width
    ("expand"); None when `squeeze` starts no such chain. Pruning a channel drops an input of the
    first layer and an output of the last."""
    if not _squeezes_image(gm, squeeze):
        return None
    chain, last, reduced = {squeeze: "squeeze"}, squeeze, 0
    while len(last.users) == 1:
        [node] = last.users
        mixes = _mixes_channels(gm, node)
        normed = bool(reduced) and is_per_channel(gm, node, reduced)
        reads = node.all_input_nodes  # a layer's or norm's tensors, a reshape's sizes besides
        if reads[:1] != [last]:
            return None
        if not reduced and is_op(node, RESHAPES | _FLATTENS) and all(_is_shape_read(read) for read in reads[1:]):
            chain[node] = "reshape"
        elif any(read.op != "get_attr" or (mixes is None and not normed) for read in reads[1:]):
            return None
        elif not reduced:
            if mixes is None or mixes[1] != width:
                return None
            chain[node], reduced = "reduce", mixes[0]
        elif mixes is not None:
            chain[node] = "expand"
            return chain if mixes == (width, reduced) else None
        elif normed:
            chain[node] = "bottleneck_norm"
        elif node.op == "call_module" and next(gm.get_submodule(node.target).parameters(), None) is not None:
            return None  # a module with parameters of its own would be shared by the teacher's and the student's paths
        else:
            chain[node] = "excite"
        last = node
    return None


def _elementwise_region(
    gm: fx.GraphModule, starts: list[fx.Node], width: int, channels: bool
) -> tuple[dict[fx.Node, str], dict[fx.Node, bool], fx.Node | None] | None:
    """The nodes `_step` reaches from `starts` (the width last, or in dim 1 with `channels`), with their
    kinds (the starts' is "up", shape reads "shape") and where each holds the width, and the one other
    node that reads them; None as soon as a second one does (a residual stream would otherwise take
    the walk through the rest of the model), or when sizes read are used outside the region."""
    kinds, placed = dict.fromkeys(starts, "up"), dict.fromkeys(starts, channels)
    queue, readers, sizes, size_readers = list(starts), set(), set(), set()
    while queue:
        node = queue.pop()
        shape_reads = [user for user in node.users if user not in kinds and _is_shape_read(user)]
        while shape_reads:  # first, so that the sizes are known when a reshape reads them
            read = shape_reads.pop()
            kinds[read] = "shape"
            sizes.add(read)
            shape_reads += [user for user in read.users if _is_shape_read(user)]
            size_readers |= {user for user in read.users if not _is_shape_read(user)}
        for user in node.users:
            if user in kinds:
                continue
            if is_op(user, _LIKE) and user.args[1:] == (node,) and user.args[0] is not node:
                size_readers.add(user)  # reads the shape alone: the region must reach it by its data
                continue
            gates = _squeeze_excitation(gm, user, width) if placed[node] else None
            if gates is not None:  # the walk goes on from the gates, one per channel in dim 1
                kinds |= gates
                placed |= dict.fromkeys(gates, True)
                queue.append(list(gates)[-1])
                continue
            step = _step(gm, user, width, placed[node], sizes, placed)
            if step is None:
                readers.add(user)
                if len(readers) > 1:
                    return None
                continue
            kinds[user], placed[user] = step
            queue.append(user)
    if not size_readers <= kinds.keys():
        return None
    return kinds, placed, next(iter(readers), None)


def _activates(gm: fx.GraphModule, kinds: dict[fx.Node, str]) -> bool:
    """Whether an activation is among the nodes, or inside a per-channel module (timm's BatchNormAct2d)."""
    return any(
        kind == "activation"
        or (kind == "channelwise" and node.op == "call_module" and any(isinstance(m, _ACTIVATION_MODULES) for m in gm.get_submodule(node.target).modules()))
        for node, kind in kinds.items()
    )


def _chunked_parts(output: fx.Node, up: Site) -> list[fx.Node] | None:
    """The parts of a linear site's output chunked along its last dim, `up(x).chunk(k, dim=-1)` read by
    one getitem each (a gated activation packed in one site: Phi-3's gate_up_proj, timm's GluMlp), in
    order; None for an output read otherwise."""
    chunk = next(iter(output.users)) if len(output.users) == 1 else None
    parts, dim = (chunk_parts(chunk) if chunk is not None else None) or (0, 0)
    if parts < 2 or not is_last_dim(output, dim) or up.layout != "linear" or up.out_features % parts:
        return None
    items = {item.args[1]: item for item in chunk.users if item.target is operator.getitem}
    if len(chunk.users) != parts or sorted(items) != list(range(parts)):
        return None
    return [items[part] for part in range(parts)]


def neuron_width(
    gm: fx.GraphModule, up: Site, sites_by_node: dict[str, Site], sites_by_entry: dict[str, Site], nodes: dict[str, fx.Node]
) -> HiddenWidth | None:
    """The width `up` computes, if elementwise nodes alone (`_elementwise`, one an activation) lead from
    it to one compressed site's input, reading nothing but it, each other and other compressed sites
    of the same width and layout (a gated activation, act(gate(x)) * up(x), as in LLaMA's SwiGLU), or
    from the parts of its output chunked along the last dim (the gated activation's two sites packed
    in one, `_chunked_parts`). The sites share the width's neurons; it is found from the first of them
    in the graph."""
    chunked = _chunked_parts(nodes[up.node], up)
    width, starts = (up.out_features // len(chunked), list(chunked)) if chunked else (up.out_features, [nodes[up.node]])
    while True:
        channels = LAYOUTS[up.layout].feature_dim != -1
        region = _elementwise_region(gm, starts, width, channels)
        if region is None:
            return None
        kinds, placed, reader = region
        # tensors read from outside the region (a reshape's sizes may come from anywhere): other ups, or none
        reads = (
            [data_input(n)] if kind in ("reshape", "channelwise", "shape", "reduce", "expand", "bottleneck_norm") else n.all_input_nodes
            for n, kind in kinds.items() if kind != "up"
        )
        outside = {tensor for tensors in reads for tensor in tensors} - kinds.keys()
        gates = [t for t in outside if (site := sites_by_node.get(t.name)) and (site.layout, site.out_features) == (up.layout, width)]
        if len(gates) < len(outside):
            return None
        if not gates:
            break
        if chunked:
            return None  # a chunked site gated by another site besides
        starts += gates
    if chunked:  # the site's output, then the chunk and its parts, are the width's up and its first steps
        kinds |= {nodes[up.node]: "up", chunked[0].args[0]: "chunk"} | dict.fromkeys(chunked, "part")
    leaving = [n for n in kinds if reader in n.users]
    down = sites_by_entry.get(reader.name) if reader is not None else None
    if down is None or len(leaving) != 1 or not _activates(gm, kinds):
        return None
    [output] = leaving
    if site_input(reader) is not output or len(output.users) != 1 or down.in_features != width:
        return None
    if placed[output] != (LAYOUTS[down.layout].feature_dim != -1):  # the down site reads the width where it is
        return None
    ups = tuple(sites_by_node[name].name for name in nodes if kinds.get(nodes[name]) == "up")
    if ups[0] != up.name:
        return None
    between = tuple(name for name in nodes if kinds.get(nodes[name], "up") != "up")
    reshapes = [n for n, kind in kinds.items() if kind == "reshape"]
    resized = width_sizes([n for n in reshapes if not placed[n]], width)
    resized |= {n.name: 1 for n in reshapes if placed[n] and is_op(n, RESHAPES) and shape_entries(n)[1] == width}
    channelwise = tuple(name for name in between if kinds[nodes[name]] == "channelwise")
    group = math.lcm(1, *(channel_group(gm, nodes[name], width) for name in channelwise))  # a grouped convolution's groups go whole
    squeezes = tuple(zip(*(tuple(name for name in between if kinds[nodes[name]] == kind) for kind in ("squeeze", "reduce", "expand"))))
    norms = tuple(name for name in between if kinds[nodes[name]] == "bottleneck_norm")
    return HiddenWidth(
        "neurons", ups, down.name, between, width, group, tuple(resized.items()), parts=(len(chunked),) if chunked else (),
        channelwise=channelwise, squeezes=squeezes, bottleneck_norms=norms,
    )

