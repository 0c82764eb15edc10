"""Transform: remove dead nodes, then every submodule, parameter and buffer nothing reads any more
(the teachers' weights once their branches are gone)."""

from __future__ import annotations

import torch
from torch import fx, nn

from tunecomp_fx.pipeline import GraphPass, PassContext


def _used_attributes(gm: fx.GraphModule) -> set[str]:
    used = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            used.add(node.target)
        elif node.op == "call_module":
            module = gm.get_submodule(node.target)
            used.update(f"{node.target}.{name}" for name, _ in module.named_parameters(remove_duplicate=False))
            used.update(f"{node.target}.{name}" for name, _ in module.named_buffers(remove_duplicate=False))
    return used


def _kept_unread(node: fx.Node) -> bool:
    """Whether `node` stays though nothing reads it. Random ops count as impure by default (they advance
    the RNG), but a teacher's attention (its dropout_p makes it random) must still go once nothing
    reads it; so must torch.export's check of a dtype (an impure op) on a tensor nothing else reads."""
    if node.target is torch.ops.aten._assert_tensor_metadata.default:
        return set(node.args[0].users) != {node}
    return node.is_impure(impure_random=False)


class EliminateDeadCode(GraphPass):
    name = "eliminate_dead_code"
    preserves_outputs = True

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        gm.graph.eliminate_dead_code(is_impure_node=_kept_unread)
        gm.recompile()
        gm.delete_all_unused_submodules()
        used = _used_attributes(gm)
        for name, _ in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
            if name not in used:
                owner_name, _, attribute = name.rpartition(".")
                owner: nn.Module = gm.get_submodule(owner_name) if owner_name else gm
                owner._parameters.pop(attribute, None)
                owner._buffers.pop(attribute, None)
        return gm

    def ensures(self, gm: fx.GraphModule, ctx: PassContext) -> str | None:
        used = _used_attributes(gm)
        held = [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]
        unused = [name for name, _ in held if name not in used]
        return f"unused parameters or buffers left: {unused[:3]}" if unused else None
