"""Transform: a student whose kept rank r has r * (m + n) >= m * n is no smaller than a dense
matrix and runs slower; replace its down/up pair by one module of its layout with W = up @ down."""

from __future__ import annotations

import torch
from torch import fx, nn

from tunecomp_fx.forms import rebuilt
from tunecomp_fx.pipeline import GraphPass, PassContext
from tunecomp_fx.sites import LOWRANK_ROOT, student_calls, student_nodes


def past_break_even(down: nn.Module, up: nn.Module) -> bool:
    rank, n = down.weight.shape[:2]
    m = up.weight.shape[0]
    return rank * (m + n) >= m * n


class DensifyPastBreakEven(GraphPass):
    name = "densify_past_break_even"
    preserves_outputs = True

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> str | None:
        masked = [key for key, roles in student_nodes(gm).items() if "rank_mask" in roles]
        return f"sites {masked[:3]} still hold rank masks (run eliminate_pruned_ranks first)" if masked else None

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        for key, calls in student_calls(gm).items():
            if "down" not in calls[0] or "up" not in calls[0]:
                continue
            container = gm.get_submodule(f"{LOWRANK_ROOT}.{key}")
            if not past_break_even(container.down, container.up):
                continue
            down, up = container.down, container.up
            with torch.no_grad():
                product = up.weight.flatten(1).double() @ down.weight.flatten(1).double()
                weight = product.reshape(up.weight.shape[:1] + down.weight.shape[1:]).to(up.weight.dtype)
                container.dense = rebuilt(down, weight, up.bias)  # down's layout and stride, up's bias
            for roles in calls:  # each call of the site's weight
                with gm.graph.inserting_before(roles["up"]):
                    node = gm.graph.call_module(f"{LOWRANK_ROOT}.{key}.dense", roles["down"].args)
                roles["up"].replace_all_uses_with(node)
                gm.graph.erase_node(roles["up"])
                gm.graph.erase_node(roles["down"])
            del container.down, container.up
        return gm

    def ensures(self, gm: fx.GraphModule, ctx: PassContext) -> str | None:
        for key, roles in student_nodes(gm).items():
            if "down" in roles and past_break_even(gm.get_submodule(roles["down"].target), gm.get_submodule(roles["up"].target)):
                return f"site '{key}' is factorized past break-even"
        return None
