"""Transform: write each student's factors from its site's decomposition (the leading ranks) and
copy the teacher's bias into the student's bias; a student with a core (method="union") gets the
fixed bases as factors and the diagonal of the projected W0 as its core."""

from __future__ import annotations

import torch
from torch import fx

from tunecomp_fx.pipeline import GraphPass, PassContext
from tunecomp_fx.sites import site_container


class InitializeStudents(GraphPass):
    name = "initialize_students"
    preserves_outputs = True  # blends still read only the teacher

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> str | None:
        missing = [s.name for s in ctx.factorized_sites() if s.name not in ctx.decompositions]
        return f"no decomposition for {missing[:3]} (run decompose_weights first)" if missing else None

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        with torch.no_grad():
            for site in ctx.factorized_sites():
                student = site_container(gm, site)
                decomposition = ctx.decompositions[site.name]
                rank = student.down.weight.shape[0]
                student.down.weight.copy_(decomposition.down[:rank].reshape(student.down.weight.shape))
                student.up.weight.copy_(decomposition.up[:, :rank].reshape(student.up.weight.shape))
                if hasattr(student, "core"):
                    student.core.weight.copy_(torch.diag(decomposition.core[:rank]).reshape(student.core.weight.shape))
                if site.bias_target is not None:
                    student.up.bias.copy_(gm.get_parameter(site.bias_target))
                else:
                    student.up.bias.zero_()
        return gm
