"""Analysis (when prune_neurons > 0): in every hidden width keep the neurons that carry the most of
the down-projection's output, ranked by sqrt(E[h_j^2]) * ||W_down[:, j]|| on the calibration data
(h_j: neuron j after the activation), and restrict the pair's sites to them: the up site to the kept
rows, the down site to the kept columns and their input covariance to the kept neurons. Everything
after this pass (decomposition, allocation, the students) sees the sliced sites."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import fx

from tunecomp_fx.errors import BudgetError
from tunecomp_fx.passes.calibrate_input_covariance import InputCovariance
from tunecomp_fx.pipeline import GraphPass, PassContext


def kept_neuron_count(width: int, prune: float, multiple: int) -> int:
    """Neurons left of `width` after removing the fraction `prune`, a multiple of `multiple` (fast
    kernels) where the width allows, at least one."""
    kept = width * (1.0 - prune)
    if width >= 2 * multiple:
        return min(width, max(multiple, round(kept / multiple) * multiple))
    return min(width, max(1, round(kept)))


def _check_ratio_reachable(ctx: PassContext) -> None:
    """Pruning alone must not remove more than the ratio asks: the ranks can only remove more."""
    compressed = ctx.compressed_sites
    total = sum(site.unpruned_params for site in compressed)
    left = sum(site.dense_params for site in compressed)
    if left < ctx.config.kept_fraction * total:
        raise BudgetError(
            f"prune_neurons={ctx.config.prune_neurons} alone removes {1 - left / total:.3g} of the compressed sites' "
            f"parameters, more than ratio={ctx.config.ratio} asks for; use a smaller prune_neurons or a larger ratio"
        )


class SelectHiddenNeurons(GraphPass):
    name = "select_hidden_neurons"
    preserves_outputs = True

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> str | None:
        missing = [w.down for w in ctx.hidden_widths if w.down not in ctx.covariances]
        return f"no input covariance for {missing[:3]} (run calibrate_input_covariance first)" if missing else None

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        sites = {site.name: site for site in ctx.sites}
        selected = []
        for width in ctx.hidden_widths:
            up, down = sites[width.up], sites[width.down]
            covariance = ctx.covariances[down.name]
            weight = down.weight(gm).detach().double()
            importance = covariance.covariance.diagonal().clamp_min(0).sqrt().to(weight.device) * weight.norm(dim=0)
            count = kept_neuron_count(width.width, ctx.config.prune_neurons, ctx.config.rank_multiple)
            kept = tuple(sorted(importance.topk(count).indices.tolist()))
            sites[up.name] = up.sliced(rows=kept)
            sites[down.name] = down.sliced(columns=kept)
            index = torch.tensor(kept)
            ctx.covariances[down.name] = InputCovariance(covariance.gram[index][:, index], covariance.rows)
            selected.append(replace(width, kept=kept))
        ctx.hidden_widths = selected
        ctx.sites = [sites[site.name] for site in ctx.sites]
        _check_ratio_reachable(ctx)
        return gm

    def ensures(self, gm: fx.GraphModule, ctx: PassContext) -> str | None:
        sites = {site.name: site for site in ctx.sites}
        for width in ctx.hidden_widths:
            up, down = sites[width.up], sites[width.down]
            if not width.kept or up.kept_rows != width.kept or down.kept_columns != width.kept:
                return f"the sites of hidden width {width.up} -> {width.down} do not keep the same neurons"
            if ctx.covariances[down.name].gram.shape != (len(width.kept),) * 2:
                return f"the input covariance of site '{down.name}' is not restricted to its kept neurons"
        return None
