"""Transform: at alpha = 0 the blend is beta * student; fold beta into the student's up-projection,
route the blend's users to the student and drop the blend and the teacher branch (at each call of
the site's weight, and at each embedding lookup of it, whose student reads the scaled up-projection).

Used by finalize, and by the joint trainer to take the teacher out of the compute once its
weight reaches zero."""

from __future__ import annotations

import torch
from torch import fx

from tunecomp_fx.pipeline import GraphPass, PassContext
from tunecomp_fx.sites import LOWRANK_ROOT, student_roles


class FoldBlends(GraphPass):
    name = "fold_blends"
    preserves_outputs = True

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> str | None:
        for key, reads in student_roles(gm).items():
            if "blend" in reads[0] and (alpha := gm.get_submodule(reads[0]["blend"].target).alpha.item()) != 0.0:
                return (
                    f"site '{key}' still blends in its teacher (alpha = {alpha:.3g}); train to the end of the blend "
                    "or call tunecomp_fx.set_blend(model, 0.0) before folding"
                )
        return None

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        for key, reads in student_roles(gm).items():
            if "blend" not in reads[0]:  # an up site of a pruned width: blended at its down site
                continue
            beta = gm.get_submodule(reads[0]["blend"].target).beta  # every blend of the site holds the same
            container = gm.get_submodule(f"{LOWRANK_ROOT}.{key}")
            with torch.no_grad():
                container.up.weight.mul_(beta.to(container.up.weight.dtype))
                if container.up.bias is not None:
                    container.up.bias.mul_(beta.to(container.up.bias.dtype))
            for roles in reads:  # each call of the site's weight, each lookup of it
                blend_node, teacher = roles["blend"], roles["teacher"]
                blend_node.replace_all_uses_with(blend_node.args[1])
                gm.graph.erase_node(blend_node)
                if not teacher.users:
                    gm.graph.erase_node(teacher)
            for name in ("blend", "lookup_blend"):
                if hasattr(container, name):
                    delattr(container, name)
        return gm

    def ensures(self, gm: fx.GraphModule, ctx: PassContext) -> str | None:
        left = [key for key, reads in student_roles(gm).items() if any("blend" in roles for roles in reads)]
        return f"blends left at {left[:3]}" if left else None
