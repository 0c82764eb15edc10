"""Per-channel modules between pointwise convolutions (prune_neurons through MobileNet-style inverted
residuals): a batch norm or a depthwise convolution maps each channel by itself, a grouped
convolution (RegNet's, ResNeXt's) each group of channels, so a pruned width's student path can hold
a copy with the kept channels (whole groups) alone (`with_channels`).

A symbolically traced model calls the modules (nn.BatchNorm2d, nn.Conv2d with one group per channel),
or torch.conv2d on get_attr tensors where it traced through a subclass of nn.Conv2d (Hugging Face's
EfficientNet); a torch.export graph calls aten.batch_norm or aten.conv2d on get_attr tensors. A plain
module holds such tensors for the copy (`per_channel_module`, `arg<position>`), so that copying,
training and slicing are one mechanism for all, and the compact model needs no class of ours. The
same copies serve a squeeze-excitation's layers (convolutions or linear), sliced on their input or output side alone."""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn

aten = torch.ops.aten

# aten calls (or torch functions, as a traced subclass of nn.Conv2d calls them) whose tensors a width's
# student path holds copies of, by argument position: those mapping each channel (dim 1), or each
# group of channels, by itself (`channel_group`) and a squeeze-excitation's layers
_CHANNEL_TENSORS: dict[Callable[..., Any], tuple[int, ...]] = {
    aten.batch_norm.default: (1, 2, 3, 4),  # weight, bias, running mean and variance
    aten.conv2d.default: (1, 2),  # weight, bias; depthwise or grouped by its groups (position 6)
    aten.conv1d.default: (1, 2),
    aten.conv2d.padding: (1, 2),  # padding="same" or "valid"
    aten.linear.default: (1, 2),  # a squeeze-excitation's linear layers
    aten.conv1d.padding: (1, 2),
    torch.conv2d: (1, 2),
    torch.conv1d: (1, 2),
}
_GROUPS = 6


_CHANNELS = "channels_"


def channels_key(node_name: str) -> str:
    """Where, under the down site's students, the copy of a per-channel node a width passes through lives."""
    return f"{_CHANNELS}{node_name}"


def site_parameters(container: nn.Module) -> int:
    """The parameters of a site's students, without the per-channel copies a width put beside them
    (they are no part of the site: the ratio does not count them)."""
    return sum(p.numel() for name, p in container.named_parameters() if not name.startswith(_CHANNELS))


def _channel_tensors(gm: fx.GraphModule, node: fx.Node) -> dict[int, torch.Tensor] | None:
    """The per-channel tensors of an aten call of `_CHANNEL_TENSORS` reading get_attr nodes alone besides
    its input, by argument position; None for any other node."""
    positions = _CHANNEL_TENSORS.get(node.target) if node.op == "call_function" else None
    if positions is None or node.kwargs or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    reads = {p: node.args[p] for p in positions if p < len(node.args) and node.args[p] is not None}
    if any(not isinstance(read, fx.Node) or read.op != "get_attr" for read in reads.values()):
        return None
    if set(node.all_input_nodes) != {node.args[0], *reads.values()}:
        return None
    return {p: operator.attrgetter(read.target)(gm) for p, read in reads.items()}


def channel_group(gm: fx.GraphModule, node: fx.Node, channels: int) -> int | None:
    """How many consecutive channels of `channels` (dim 1) `node` maps together, each group by itself:
    1 for a batch norm or a depthwise convolution, the channels per group of a grouped convolution
    from and to `channels`; a module call or an aten call on the graph's tensors. None for any other node."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return 1 if module.num_features == channels else None
        grouped = isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.padding_mode == "zeros" and module.groups > 1
        return channels // module.groups if grouped and module.in_channels == module.out_channels == channels else None
    tensors = _channel_tensors(gm, node)
    if tensors is None or any(tensor.shape[0] != channels for tensor in tensors.values()):
        return None
    if node.target is aten.batch_norm.default:
        return 1 if all(tensor.dim() == 1 for tensor in tensors.values()) else None
    groups = node.args[_GROUPS] if len(node.args) > _GROUPS else 1
    per_group = tensors[1].shape[1]
    return per_group if isinstance(groups, int) and groups > 1 and groups * per_group == channels else None


def is_per_channel(gm: fx.GraphModule, node: fx.Node, channels: int) -> bool:
    """Whether `node` maps each of `channels` channels by itself (`channel_group` 1)."""
    return channel_group(gm, node, channels) == 1


def per_channel_module(gm: fx.GraphModule, node: fx.Node) -> nn.Module:
    """The module `node` calls (`is_per_channel`), or for an aten call a module holding its per-channel
    tensors as `arg<position>` (parameters stay parameters)."""
    if node.op == "call_module":
        return gm.get_submodule(node.target)
    holder = nn.Module()
    for position, tensor in _channel_tensors(gm, node).items():
        if isinstance(tensor, nn.Parameter):
            holder.register_parameter(f"arg{position}", nn.Parameter(tensor.detach().clone(), tensor.requires_grad))
        else:
            holder.register_buffer(f"arg{position}", tensor.detach().clone())
    return holder


def read_channels(gm: fx.GraphModule, call: fx.Node, target: str, side: str = "each") -> None:
    """Point a copy of a node at the module `target` holding its kept channels (`with_channels`): a
    module call calls it, a function call reads its tensors (get_attr) and, a depthwise or grouped
    convolution (side "each"), has the groups its kept channels make."""
    if call.op == "call_module":
        call.target = target
        return
    for position in _CHANNEL_TENSORS[call.target]:
        if position < len(call.args) and call.args[position] is not None:
            with gm.graph.inserting_before(call):
                call.update_arg(position, gm.graph.get_attr(f"{target}.arg{position}"))
    if side == "each":
        set_group_count(call, gm.get_submodule(target))


def set_group_count(call: fx.Node, holder: nn.Module) -> None:
    """The groups of an aten depthwise or grouped convolution's copy: as many as the channels its
    tensors in `holder` keep make (one per channel for a depthwise one)."""
    if call.op == "call_function" and call.target is not aten.batch_norm.default:
        weight = holder.arg1
        call.update_arg(_GROUPS, weight.shape[0] // weight.shape[1])


def with_channels(module: nn.Module, index: torch.Tensor, side: str = "each") -> nn.Module:
    """A copy of a module (`per_channel_module`) that keeps the channels `index`, its channel counts set
    to match: on every side of a per-channel module or a grouped convolution ("each": every parameter
    and statistic; `index` whole groups), or on
    the input ("in": the weight's columns) or output ("out": the weight's rows and the bias) of a
    convolution mixing the channels (a squeeze-excitation's); "none": a whole copy (a norm in a
    squeeze-excitation's bottleneck, which holds no channel of the width)."""
    kept = copy.deepcopy(module)
    if side == "none":
        return kept
    per_group = module.in_channels // module.groups if isinstance(module, nn.modules.conv._ConvNd) else 1
    dim = 1 if side == "in" else 0
    with torch.no_grad():
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if tensor is None or tensor.dim() == 0 or (side == "in" and tensor.dim() == 1):  # a 0-d batch count; a bias of the outputs
                continue
            sliced = tensor.index_select(dim, index.to(tensor.device)).clone()
            setattr(kept, name, nn.Parameter(sliced, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else sliced)
    if isinstance(kept, nn.modules.batchnorm._BatchNorm):
        kept.num_features = len(index)
    elif isinstance(kept, nn.Linear):  # a squeeze-excitation's, "in" or "out"
        kept.in_features, kept.out_features = kept.weight.shape[1], kept.weight.shape[0]
    elif isinstance(kept, nn.modules.conv._ConvNd):
        if side != "out":
            kept.in_channels = len(index)
        if side != "in":
            kept.out_channels = len(index)
        if side == "each":
            kept.groups = len(index) // per_group  # `index` holds whole groups
    return kept
