"""Transform: at alpha = 0 the blend is beta * student; fold beta into the student's up-projection,
route the blend's users to the student and drop the blend and the teacher branch (at each call of
the site's weight, and at each embedding lookup of it, whose student reads the scaled up-projection).

Used by finalize, and by the joint trainer to take the teacher out of the compute once its
weight reaches zero."""

from __future__ import annotations

import torch
from torch import fx

from tunecomp_fx.pipeline import GraphPass, PassContext
from tunecomp_fx.sites import LOWRANK_ROOT, lookup_calls, student_calls, student_nodes


class FoldBlends(GraphPass):
    name = "fold_blends"
    preserves_outputs = True

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> str | None:
        for key, roles in student_nodes(gm).items():
            if "blend" in roles and gm.get_submodule(roles["blend"].target).alpha.item() != 0.0:
                return (
                    f"site '{key}' still blends in its teacher (alpha = "
                    f"{gm.get_submodule(roles['blend'].target).alpha.item():.3g}); train to the end of the blend "
                    "or call tunecomp_fx.set_blend(model, 0.0) before folding"
                )
        return None

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        lookups = lookup_calls(gm)
        for key, calls in student_calls(gm).items():
            if "blend" not in calls[0]:
                continue
            blend = calls[0]["blend"]
            beta = gm.get_submodule(blend.target).beta
            up = gm.get_submodule(blend.args[1].target)
            with torch.no_grad():
                up.weight.mul_(beta.to(up.weight.dtype))
                up.bias.mul_(beta.to(up.bias.dtype))
            for roles in calls + lookups.get(key, []):  # each call of the site's weight, each lookup of it
                blend_node, teacher = roles["blend"], roles["teacher"]
                blend_node.replace_all_uses_with(blend_node.args[1])
                gm.graph.erase_node(blend_node)
                if not teacher.users:
                    gm.graph.erase_node(teacher)
            container = gm.get_submodule(f"{LOWRANK_ROOT}.{key}")
            delattr(container, "blend")
            if hasattr(container, "lookup_blend"):
                delattr(container, "lookup_blend")
        return gm

    def ensures(self, gm: fx.GraphModule, ctx: PassContext) -> str | None:
        left = [key for key, roles in student_nodes(gm).items() if "blend" in roles]
        return f"blends left at {left[:3]}" if left else None
