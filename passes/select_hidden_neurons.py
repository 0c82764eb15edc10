"""Analysis (when prune_neurons or prune_heads > 0): in every hidden width keep the groups of neurons
(single neurons of an FFN, a grouped convolution's groups of channels, heads of an attention block)
that carry the most of the down-projection's output, E||W_g h_g||^2 = tr(W_g C_g W_g^T) on the
calibration data (h_g: the group's part of the down site's input, C_g its covariance; for single
neurons the ranking of sqrt(E[h_j^2]) * ||W[:, j]||), and restrict the sites to them: the up sites to
the kept rows, the down site to the kept columns and its input covariance to the kept neurons. Everything after this pass (decomposition, allocation, the
students) sees the sliced sites.

With width_slack the students start with more groups than the target, the next most important ones;
the rank pruner drops the extra groups during the blend. Allocation and the budget count the sites at
their target width (`final_sites`)."""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import fx

from tunecomp_fx.errors import BudgetError
from tunecomp_fx.passes.calibrate_input_covariance import InputCovariance
from tunecomp_fx.pipeline import GraphPass, PassContext
from tunecomp_fx.sites import final_sites


def group_blocks(covariance: torch.Tensor, group: int) -> torch.Tensor:
    """The (groups, group, group) diagonal blocks C_gg of a (width, width) covariance."""
    groups = covariance.shape[0] // group
    return covariance.reshape(groups, group, groups, group).diagonal(dim1=0, dim2=2).permute(2, 0, 1)


def group_energies(weight: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """tr(W_g C_gg W_g^T) for each group g of consecutive columns of `weight` (out, width), C_gg the
    blocks of `group_blocks`."""
    groups, group = blocks.shape[:2]
    columns = weight.reshape(weight.shape[0], groups, group)
    return torch.einsum("ogi,gij,ogj->g", columns, blocks, columns)


def kept_neuron_count(width: int, prune: float, multiple: int) -> int:
    """Neurons (or heads) left of `width` after removing the fraction `prune`, a multiple of
    `multiple` (fast kernels) where the width allows, at least one."""
    kept = width * (1.0 - prune)
    if width >= 2 * multiple:
        return min(width, max(multiple, round(kept / multiple) * multiple))
    return min(width, max(1, round(kept)))


def _check_ratio_reachable(ctx: PassContext) -> None:
    """Pruning alone must not remove more than the ratio asks: the ranks can only remove more."""
    compressed = final_sites(ctx.compressed_sites, ctx.hidden_widths)
    students = {name for width in ctx.hidden_widths for name in width.sites}
    total = sum(site.unpruned_params for site in compressed)
    left = sum(site.student_dense_params if site.name in students else site.dense_params for site in compressed)
    if left < ctx.config.kept_fraction * total:
        config = ctx.config
        raise BudgetError(
            f"pruning alone (prune_neurons={config.prune_neurons}, prune_heads={config.prune_heads}) removes "
            f"{1 - left / total:.3g} of the compressed sites' parameters, more than ratio={config.ratio} asks for; "
            "prune less or use a larger ratio"
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
            down = sites[width.down]
            covariance = ctx.covariances[down.name]
            weight = down.weight(gm).detach().double()
            energies = group_energies(weight, group_blocks(covariance.covariance.to(weight.device), width.group))
            if width.kind == "neurons":  # whole groups (of a grouped convolution) whose neurons make a rank multiple
                prune, multiple = ctx.config.prune_neurons, math.lcm(ctx.config.rank_multiple, width.group) // width.group
            else:  # heads are whole groups: no rank multiple
                prune, multiple = ctx.config.prune_heads, 1
            target = kept_neuron_count(len(energies), prune, multiple)
            start = min(len(energies), math.ceil(target * (1.0 + ctx.config.width_slack) - 1e-9))
            groups = energies.topk(start).indices.sort().values
            kept = tuple((groups[:, None] * width.group + torch.arange(width.group, device=groups.device)).flatten().tolist())
            for up in width.ups:
                sites[up] = sites[up].sliced(rows=width.up_rows(up, kept, width.width))
            sites[down.name] = down.sliced(columns=kept)
            index = torch.tensor(kept)
            ctx.covariances[down.name] = InputCovariance(covariance.gram[index][:, index], covariance.rows)
            if target < start:
                blocks = group_blocks(ctx.covariances[down.name].covariance, width.group)
                ctx.width_covariances[down.name] = blocks.to(weight.device, torch.float32).contiguous()
            selected.append(replace(width, kept=kept, target=target * width.group))
        ctx.hidden_widths = selected
        ctx.sites = [sites[site.name] for site in ctx.sites]
        _check_ratio_reachable(ctx)
        return gm

    def ensures(self, gm: fx.GraphModule, ctx: PassContext) -> str | None:
        sites = {site.name: site for site in ctx.sites}
        for width in ctx.hidden_widths:
            down = sites[width.down]
            if not width.kept or down.kept_columns != width.kept or any(sites[up].kept_rows != width.up_rows(up, width.kept, width.width) for up in width.ups):
                return f"the sites of hidden width {', '.join(width.ups)} -> {width.down} do not keep the same neurons"
            if ctx.covariances[down.name].gram.shape != (len(width.kept),) * 2:
                return f"the input covariance of site '{down.name}' is not restricted to its kept neurons"
            if not 0 < width.target <= len(width.kept) or width.target % width.group:
                return f"hidden width {', '.join(width.ups)} -> {width.down} targets {width.target} of {len(width.kept)} kept neurons"
        return None
