"""Transform: slice away the ranks the mask switched off, and drop the mask: each student becomes
two plain linears, down (in -> kept rank) and up (kept rank -> out)."""

from __future__ import annotations

import torch
from torch import fx, nn

from tunecomp_fx.pipeline import GraphPass, PassContext
from tunecomp_fx.sites import LOWRANK_ROOT, student_nodes


def _sliced(linear: nn.Linear, weight: torch.Tensor) -> nn.Linear:
    out_features, in_features = weight.shape
    result = nn.Linear(in_features, out_features, bias=linear.bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        result.weight.copy_(weight)
        if linear.bias is not None:
            result.bias.copy_(linear.bias)
    return result


class EliminatePrunedRanks(GraphPass):
    name = "eliminate_pruned_ranks"
    preserves_outputs = True

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        for key, roles in student_nodes(gm).items():
            if "rank_mask" not in roles:
                continue
            container = gm.get_submodule(f"{LOWRANK_ROOT}.{key}")
            mask = container.rank_mask
            kept = mask.nonzero().flatten()
            if kept.numel() == 0:  # every rank pruned: keep one zero rank so the shapes stay valid
                kept = torch.zeros(1, dtype=torch.long, device=mask.device)
            with torch.no_grad():
                down_weight = container.down.weight[kept] * mask[kept, None].to(container.down.weight.dtype)
                container.down = _sliced(container.down, down_weight)
                container.up = _sliced(container.up, container.up.weight[:, kept])
            roles["masked"].replace_all_uses_with(roles["down"])
            gm.graph.erase_node(roles["masked"])
            gm.graph.erase_node(roles["rank_mask"])
            del container._buffers["rank_mask"]
        return gm

    def ensures(self, gm: fx.GraphModule, ctx: PassContext) -> str | None:
        left = [key for key, roles in student_nodes(gm).items() if "rank_mask" in roles]
        return f"rank masks left at {left[:3]}" if left else None
