"""Transform: a student whose kept rank r has r * (m + n) >= m * n is no smaller than a dense
matrix and runs slower; replace its down/up pair by one module of its layout with W = up @ down,
whose weight the embedding lookups of the site (a tied head's, a table's) then read as it is."""

from __future__ import annotations

import torch
from torch import fx, nn

from tunecomp_fx.forms import rebuilt
from tunecomp_fx.pipeline import GraphPass, PassContext
from tunecomp_fx.sites import LOWRANK_ROOT, student_roles


def past_break_even(down: nn.Module, up: nn.Module) -> bool:
    rank, n = down.weight.shape[:2]
    m = up.weight.shape[0]
    return rank * (m + n) >= m * n


class DensifyPastBreakEven(GraphPass):
    name = "densify_past_break_even"
    preserves_outputs = True

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> str | None:
        masked = [key for key, reads in student_roles(gm).items() if any("rank_mask" in roles for roles in reads)]
        return f"sites {masked[:3]} still hold rank masks (run eliminate_pruned_ranks first)" if masked else None

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        for key, reads in student_roles(gm).items():
            prefix = f"{LOWRANK_ROOT}.{key}"
            container = gm.get_submodule(prefix)
            if not _factorized(container) or not past_break_even(container.down, container.up):
                continue
            down, up = container.down, container.up
            with torch.no_grad():
                product = up.weight.flatten(1).double() @ down.weight.flatten(1).double()
                weight = product.reshape(up.weight.shape[:1] + down.weight.shape[1:]).to(up.weight.dtype)
                container.dense = rebuilt(down, weight, up.bias)  # down's layout and stride, up's bias
            for roles in reads:
                if "factor" in roles:  # a lookup of the weight reads the dense rows
                    with gm.graph.inserting_before(roles["rows"]):
                        table = gm.graph.get_attr(f"{prefix}.dense.weight")
                    table.meta["tunecomp"] = roles["table"].meta["tunecomp"]
                    roles["rows"].replace_input_with(roles["table"], table)
                    roles["student"].replace_all_uses_with(roles["rows"])
                    for node in (roles["student"], roles["factor"], roles["table"]):
                        gm.graph.erase_node(node)
                    continue
                with gm.graph.inserting_before(roles["up"]):  # a call of the weight
                    node = gm.graph.call_module(f"{prefix}.dense", roles["down"].args)
                roles["up"].replace_all_uses_with(node)
                gm.graph.erase_node(roles["up"])
                gm.graph.erase_node(roles["down"])
            del container.down, container.up
        return gm

    def ensures(self, gm: fx.GraphModule, ctx: PassContext) -> str | None:
        for key in student_roles(gm):
            container = gm.get_submodule(f"{LOWRANK_ROOT}.{key}")
            if _factorized(container) and past_break_even(container.down, container.up):
                return f"site '{key}' is factorized past break-even"
        return None


def _factorized(container: nn.Module) -> bool:
    return hasattr(container, "down") and hasattr(container, "up")
