"""Transform (method="union"): fold each student's trained core into its down-projection,
down <- core @ V^T, and drop the core node, so the student is down -> mul(rank_mask) -> up again and
the compact model holds two plain linears per site. Exact: (x V) M^T = x (M V^T)^T."""

from __future__ import annotations

import torch
from torch import fx

from tunecomp_fx.pipeline import GraphPass, PassContext
from tunecomp_fx.sites import LOWRANK_ROOT, student_calls, student_nodes


class FoldCores(GraphPass):
    name = "fold_cores"
    preserves_outputs = True

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        for key, calls in student_calls(gm).items():
            if "core" not in calls[0]:
                continue
            container = gm.get_submodule(f"{LOWRANK_ROOT}.{key}")
            down = container.down.weight
            with torch.no_grad():
                folded = (container.core.weight.flatten(1) @ down.flatten(1)).reshape(down.shape[:1] + down.shape[1:])
            container.down.weight = torch.nn.Parameter(folded)
            for roles in calls:  # each call of the site's weight
                roles["core"].replace_all_uses_with(roles["down"])
                gm.graph.erase_node(roles["core"])
            del container.core
        return gm

    def ensures(self, gm: fx.GraphModule, ctx: PassContext) -> str | None:
        left = [key for key, roles in student_nodes(gm).items() if "core" in roles]
        return f"cores left at {left[:3]}" if left else None
