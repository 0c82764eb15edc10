"""Transform: slice away the ranks the mask switched off, and drop the mask: each student becomes
two plain modules of its layout, down (in -> kept rank) and up (kept rank -> out), which the
student lookups of a tied embedding read as they are."""

from __future__ import annotations

import torch
from torch import fx

from tunecomp_fx.forms import rebuilt
from tunecomp_fx.pipeline import GraphPass, PassContext
from tunecomp_fx.pruning import RankPruner
from tunecomp_fx.sites import LOWRANK_ROOT, student_roles


class EliminatePrunedRanks(GraphPass):
    name = "eliminate_pruned_ranks"
    preserves_outputs = True

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> str | None:
        # Slicing only what the masks switched off would emit a model larger than the ratio asks for.
        slack = RankPruner(gm, ctx).slack_left()
        if slack:
            return (
                f"{slack}: the slack (rank_slack, width_slack) is pruned as the blend progresses and this blend "
                "stopped early; train to the end of the blend, or call tunecomp_fx.prune_slack(model) to prune it at once"
            )
        return None

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        for key, reads in student_roles(gm).items():
            if "rank_mask" not in reads[0]:
                continue
            container = gm.get_submodule(f"{LOWRANK_ROOT}.{key}")
            mask = container.rank_mask.flatten()
            kept = mask.nonzero().flatten()
            if kept.numel() == 0:  # every rank pruned: keep one zero rank so the shapes stay valid
                kept = torch.zeros(1, dtype=torch.long, device=mask.device)
            with torch.no_grad():
                down, up = container.down, container.up
                scale = mask[kept].to(down.weight.dtype).reshape((-1,) + (1,) * (down.weight.dim() - 1))
                container.down = rebuilt(down, down.weight[kept] * scale, down.bias)
                container.up = rebuilt(up, up.weight[:, kept], up.bias)
            for roles in reads:  # each call of the site's weight (its down), each lookup of it (its rows)
                roles["masked"].replace_all_uses_with(roles["rows"] if "rows" in roles else roles["down"])
                gm.graph.erase_node(roles["masked"])
                gm.graph.erase_node(roles["rank_mask"])
            del container._buffers["rank_mask"]
        return gm

    def ensures(self, gm: fx.GraphModule, ctx: PassContext) -> str | None:
        left = [key for key, reads in student_roles(gm).items() if any("rank_mask" in roles for roles in reads)]
        return f"rank masks left at {left[:3]}" if left else None
