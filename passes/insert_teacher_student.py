"""Transform: rewrite every factorized site into an explicit teacher/student subgraph.

    x --> teacher (the original linear node, weights frozen) ------------------.
    x --> lowrank.<site>.down --> mul(lowrank.<site>.rank_mask) --> lowrank.<site>.up --> lowrank.<site>.blend
                                                                                          (alpha*teacher + beta*student)

The student starts with `rank * (1 + rank_slack)` ranks (the slack is pruned during training);
alpha starts at 1 and beta at 0, so the rewritten model computes exactly what the original did.

method="union" puts a trainable core between fixed orthonormal bases:
    down (V^T, frozen) --> lowrank.<site>.core (rank x rank, trained) --> mul(rank_mask) --> up (U, frozen; bias trained)
The mask sits on the core's output, where the default method's sits on down's, so finalize's
fold_cores (core into down) leaves the default method's student behind."""

from __future__ import annotations

import math
import operator

import torch
from torch import fx, nn

from tunecomp_fx.forms import LAYOUTS, site_input
from tunecomp_fx.pipeline import GraphPass, PassContext
from tunecomp_fx.sites import LOWRANK_ROOT, Blend, Site, student_nodes, teacher_parameters


def student_rank(site: Site, rank: int, slack: float) -> int:
    return min(math.ceil(rank * (1.0 + slack)), min(site.in_features, site.out_features))


def _new_student(site: Site, rank: int, weight: torch.Tensor, core: bool) -> nn.Module:
    """down and up in the site's layout (nn.Linear, or 1x1 nn.Conv2d, down taking the site's
    stride); the rank mask has shape (rank,) or (rank, 1, 1), so that it broadcasts over the hidden
    activation either way. With a core (method="union") only the core trains between fixed bases."""
    layout = LAYOUTS[site.layout]
    container = nn.Module()
    container.down = layout.make(site.in_features, rank, False, weight, site.stride)
    container.up = layout.make(rank, site.out_features, True, weight)
    if core:
        container.core = layout.make(rank, rank, False, weight)
        container.down.weight.requires_grad_(False)
        container.up.weight.requires_grad_(False)
    container.register_buffer("rank_mask", torch.ones(layout.mask_shape(rank), device=weight.device, dtype=weight.dtype))
    container.blend = Blend().to(weight.device)
    return container


class InsertTeacherStudent(GraphPass):
    name = "insert_teacher_student"
    preserves_outputs = True  # alpha = 1, beta = 0

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> str | None:
        if not ctx.ranks:
            return "no rank decisions (run allocate_ranks first)"
        if hasattr(gm, LOWRANK_ROOT):
            return f"the graph already has '{LOWRANK_ROOT}' students"
        return None

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        nodes = {node.name: node for node in gm.graph.nodes}
        root = nn.Module()
        gm.add_module(LOWRANK_ROOT, root)
        for site in ctx.factorized_sites():
            weight = gm.get_parameter(site.weight_target)
            rank = student_rank(site, ctx.ranks[site.name].rank, ctx.config.rank_slack)
            core = ctx.config.method == "union"
            root.add_module(site.key, _new_student(site, rank, weight, core))
            for parameter in teacher_parameters(gm, [site]):
                parameter.requires_grad_(False)
            teacher = nodes[site.node]
            prefix = f"{LOWRANK_ROOT}.{site.key}"
            graph = gm.graph
            with graph.inserting_after(teacher):
                down = graph.call_module(f"{prefix}.down", (site_input(nodes[site.entry_node]),))
            projected = down
            if core:
                with graph.inserting_after(down):
                    projected = graph.call_module(f"{prefix}.core", (down,))
                projected.meta["tunecomp"] = {"site": site.name, "role": "core"}
            with graph.inserting_after(projected):
                mask = graph.get_attr(f"{prefix}.rank_mask")
            with graph.inserting_after(mask):
                masked = graph.call_function(operator.mul, (projected, mask))
            with graph.inserting_after(masked):
                up = graph.call_module(f"{prefix}.up", (masked,))
            with graph.inserting_after(up):
                blend = graph.call_module(f"{prefix}.blend", (teacher, up))
            teacher.replace_all_uses_with(blend, delete_user_cb=lambda user: user is not blend)
            for node, role in ((down, "down"), (masked, "rank_mask"), (up, "up"), (blend, "blend")):
                node.meta["tunecomp"] = {"site": site.name, "role": role}
            teacher.meta["tunecomp"] = {"site": site.name, "role": "teacher"}
        return gm

    def ensures(self, gm: fx.GraphModule, ctx: PassContext) -> str | None:
        found = student_nodes(gm)
        nodes = {node.name: node for node in gm.graph.nodes}
        sites = ctx.factorized_sites()
        if len(found) != len(sites):
            return f"{len(found)} students for {len(sites)} factorized sites"
        for site in sites:
            roles = found.get(site.key, {})
            missing = sorted({"down", "rank_mask", "masked", "up", "blend"} - set(roles))
            if missing:
                return f"the student of site '{site.name}' lacks its {missing} nodes"
            teacher = roles["teacher"]
            if teacher.name != site.node or roles["down"].args[0] is not site_input(nodes[site.entry_node]):
                return f"the student of site '{site.name}' does not read the site's input"
            # method="union" puts its core between down and the mask
            masked_input = roles.get("core", roles["down"])
            if "core" in roles and roles["core"].args != (roles["down"],):
                return f"the core of site '{site.name}' does not read its down-projection"
            if roles["masked"].args != (masked_input, roles["rank_mask"]) or roles["up"].args != (roles["masked"],):
                return f"the student of site '{site.name}' is not down -> {'core -> ' * ('core' in roles)}mul(rank_mask) -> up"
            if list(teacher.users) != [roles["blend"]] or roles["blend"].args != (teacher, roles["up"]):
                return f"the teacher of site '{site.name}' is not read by its blend alone"
        return None
