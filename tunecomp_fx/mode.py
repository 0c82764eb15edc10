"""Train/eval mode of a captured model.

Submodules follow `.train()`/`.eval()`, but a captured graph can hold the mode as a constant: a
torch.export graph's dropout ops carry a `train` argument fixed at capture (DESIGN.md section 5),
and symbolic tracing records `F.dropout(x, training=self.training)` with the flag it saw. So the
mode is owned here: module flags are set, and the training argument of every dropout node is
rewritten. Batch norm in a torch.export graph keeps its running statistics frozen (the eval-mode
capture), the usual choice when fine-tuning; dropout baked into fused ops at p = 0 (e.g. attention
in eval mode) cannot be turned back on.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import fx, nn

aten = torch.ops.aten
# Dropout ops, with the position and keyword of their training flag.
_DROPOUT_OPS = {
    aten.dropout.default: (2, "train"),
    aten.feature_dropout.default: (2, "train"),
    aten.alpha_dropout.default: (2, "train"),
    aten.feature_alpha_dropout.default: (2, "train"),
    aten.native_dropout.default: (2, "train"),
    F.dropout: (2, "training"),
}


def set_training_mode(model: nn.Module, training: bool) -> None:
    for module in model.modules():
        module.training = training
    if isinstance(model, fx.GraphModule) and _set_dropout_nodes(model.graph, training):
        model.recompile()


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode (module flags and dropout nodes) inside the block; afterwards exactly the modes of
    before, even where module flags and dropout nodes disagreed (a fresh torch.export capture)."""
    flags = {module: module.training for module in model.modules()}
    graph = model.graph if isinstance(model, fx.GraphModule) else None
    dropouts = {n: (n.args, n.kwargs) for n in graph.nodes if n.op == "call_function" and n.target in _DROPOUT_OPS} if graph else {}
    set_training_mode(model, False)
    try:
        yield
    finally:
        for module, training in flags.items():
            module.training = training
        changed = [n for n, (args, kwargs) in dropouts.items() if (n.args, n.kwargs) != (args, kwargs)]
        for node in changed:
            node.args, node.kwargs = dropouts[node]
        if changed:
            model.recompile()


def _set_dropout_nodes(graph: fx.Graph, training: bool) -> bool:
    changed = False
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in _DROPOUT_OPS:
            continue
        index, keyword = _DROPOUT_OPS[node.target]
        if len(node.args) > index:
            if node.args[index] != training:
                node.update_arg(index, training)
                changed = True
        elif node.kwargs.get(keyword, None) != training:
            node.update_kwarg(keyword, training)
            changed = True
    return changed
