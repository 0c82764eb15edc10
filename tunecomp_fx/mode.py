"""Train/eval mode of a captured model.

A symbolic-traced GraphModule calls its submodules, which follow `.train()`/`.eval()`. A graph
captured with torch.export has the mode baked in: its dropout ops carry a constant `train`
argument, and calling `.train()` on it raises NotImplementedError (DESIGN.md section 5). For
those graphs the mode is owned here: the `train` argument of every dropout node is rewritten.
Batch norm in such a graph keeps its running statistics frozen (the eval-mode capture), the
usual choice when fine-tuning; dropout baked into fused ops at p = 0 (e.g. attention in eval
mode) cannot be turned back on.
"""

from __future__ import annotations

import torch
from torch import fx, nn

aten = torch.ops.aten
# Every dropout op has the signature (input, p, train).
_DROPOUT_OPS = {
    aten.dropout.default,
    aten.feature_dropout.default,
    aten.alpha_dropout.default,
    aten.feature_alpha_dropout.default,
    aten.native_dropout.default,
}


def set_training_mode(model: nn.Module, training: bool) -> None:
    try:
        model.train(training)
        return
    except NotImplementedError:
        pass  # a torch.export graph module: its dropout nodes hold the mode
    for module in model.modules():
        module.training = training
    if isinstance(model, fx.GraphModule) and _set_dropout_nodes(model.graph, training):
        model.recompile()


def _set_dropout_nodes(graph: fx.Graph, training: bool) -> bool:
    changed = False
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in _DROPOUT_OPS:
            continue
        if "train" in node.kwargs:
            if node.kwargs["train"] != training:
                node.update_kwarg("train", training)
                changed = True
        elif len(node.args) > 2 and node.args[2] != training:
            node.update_arg(2, training)
            changed = True
    return changed
