"""Rank pruning of the students during the blend (DESIGN.md section 2).

Every student starts with slack rank. The importance of rank i of a student is
||B[:, i]|| * ||A[i, :]|| (B = up.weight, A = down.weight; at initialization, the whitened singular
value of the rank). As the blend progresses (p from 0 to 1) a threshold on the importances
rises so that the surviving ranks shrink from the slack rank to the parameter budget, reached
exactly when p = 1. Pruned ranks are masked in `lowrank.<site>.rank_mask` (masks only ever shrink);
finalize's eliminate_pruned_ranks slices them away.

method="union" students start at their allocated rank (rank_slack must be 0 there): their
kept parameters never exceed the budget, so no rank of theirs is ever masked. (The importance
above would not suit them anyway: their factors are fixed orthonormal bases, the weight is in
the core.)

A hidden width pruned gradually (width_slack) starts with more groups (neurons, heads) than its
target; its groups follow their own schedule from the start to the target, the groups dropped being
those that carry the least of the down site's student output, tr(W_g C_gg W_g^T) (W the student's
current map, C_gg the covariance blocks of the width it reads: the calibration's, then, with
`track_widths` (StepHook), a running average over the training batches). They are masked in `lowrank.<down>.width_mask`;
finalize's eliminate_pruned_neurons slices them away. "global" places its threshold on the parameters
the sites hold at their target widths, so the ranks follow the same schedule to the budget whatever
the widths do meanwhile; `kept_params` counts every site at its current width.

This changes buffer values on the live model every step, not the graph, so it is not a GraphPass
(a pass would lint and recompile an unchanged graph each step).

Two ways to place the threshold:
- "site": each student follows its own kept-rank schedule from its slack rank to the rank
  allocation chose for it (the threshold is the importance of its k_t-th rank);
- "global": one threshold over importances normalized per site (the fraction of the site's
  squared importance a rank carries, per parameter it costs), chosen so the total kept
  parameters follow the schedule to the budget; ranks may move between sites. Embedding tables
  (compress_embeddings) stay out of it and follow their own schedule as with "site".
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from tunecomp_fx.errors import ConfigError
from tunecomp_fx.forms import layout_of
from tunecomp_fx.passes.select_hidden_neurons import group_energies
from tunecomp_fx.pipeline import PassContext
from tunecomp_fx.sites import HiddenWidth, Site, final_sites, site_container

SELECTIONS = ("site", "global")
WIDTH_TRACKING_DECAY = 0.9  # the groups' covariance in training: a running average over about ten steps


def scheduled_count(start: int, target: int, progress: float) -> int:
    """What is kept of `start` (ranks, groups) at `progress`: from `start` at 0 to `target` at 1, rounded up."""
    return target + math.ceil((start - target) * (1.0 - progress) - 1e-9)


@dataclass
class _Student:
    site: Site
    module: nn.Module  # the site's container: down, rank_mask, up
    start_rank: int
    target_rank: int

    @property
    def mask(self) -> torch.Tensor:
        """The rank mask as a (rank,) view: conv students store it as (rank, 1, 1)."""
        return self.module.rank_mask.view(-1)

    @property
    def kept(self) -> int:
        return int(self.mask.count_nonzero())

    def importance(self) -> torch.Tensor:
        """||B[:, i]|| * ||A[i, :]|| per rank; 0 for masked ranks."""
        with torch.no_grad():
            up = self.module.up.weight.float().flatten(1).norm(dim=0)
            down = self.module.down.weight.float().flatten(1).norm(dim=1)
            return up * down * self.mask.float()


@dataclass
class _Width:
    width: HiddenWidth
    module: nn.Module  # the down site's container: down, rank_mask, up, width_mask
    covariance: torch.Tensor  # (groups, group, group) blocks C_gg: the calibration's, then what the student reads
    start: int  # groups the students start with
    target: int  # groups finalize keeps
    decay: float  # per call of the down student: the calls of a shared weight in a step decay the average as one call does elsewhere

    @property
    def mask(self) -> torch.Tensor:
        return self.module.width_mask.view(-1)

    @property
    def group_mask(self) -> torch.Tensor:
        return self.mask.view(self.start, -1)[:, 0]

    def importance(self) -> torch.Tensor:
        """tr(W_g C_gg W_g^T) per kept group, W the down site's student map; -inf for dropped groups."""
        with torch.no_grad():
            module = self.module
            down = module.rank_mask.view(-1, 1).float() * module.down.weight.float().flatten(1)
            energy = group_energies(module.up.weight.float().flatten(1) @ down, self.covariance)
            return torch.where(self.group_mask > 0, energy, -math.inf)

    def observe(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        """Forward pre-hook of the down student's first factor: in training, fold the covariance blocks of
        the width it reads into a running average."""
        if not torch.is_grad_enabled():
            return
        hidden = args[0].detach().float().movedim(layout_of(module).feature_dim, -1)
        groups = hidden.reshape(-1, self.start, hidden.shape[-1] // self.start)
        blocks = torch.einsum("ngi,ngj->gij", groups, groups) / max(groups.shape[0], 1)
        self.covariance.mul_(self.decay).add_(blocks, alpha=1.0 - self.decay)


class RankPruner:
    """Shrinks the rank masks of a prepared model's students on the blend's progress."""

    def __init__(self, prepared: nn.Module, context: PassContext, selection: str = "site") -> None:
        if selection not in SELECTIONS:
            raise ConfigError(f"rank_selection={selection!r} is not one of {', '.join(SELECTIONS)}")
        self.selection = selection
        factorized = context.factorized_sites()
        self.students = []
        for site in factorized:
            module = site_container(prepared, site)
            self.students.append(_Student(site, module, module.rank_mask.numel(), context.ranks[site.name].rank))
        containers = {student.site.name: student.module for student in self.students}
        self.widths = []
        for width in context.hidden_widths:
            if width.target < len(width.kept):
                module = containers[width.down]
                covariance = context.width_covariances[width.down].to(module.down.weight.device, copy=True)
                decay = WIDTH_TRACKING_DECAY ** (1.0 / len(width.betweens))
                self.widths.append(_Width(width, module, covariance, len(width.kept) // width.group, width.target // width.group, decay))
        dense_sites = [s for s in context.compressed_sites if s not in factorized]
        self.fixed_params = sum(site.dense_params for site in dense_sites)
        self.dense_total = sum(site.unpruned_params for site in context.compressed_sites)
        self.budget = context.config.kept_fraction * self.dense_total
        # Ranks are planned at the widths finalize keeps: a group dropped later must not make ranks go early.
        self.final_sites = final_sites([s.site for s in self.students], [w.width for w in self.widths])
        self.start_params = self.kept_params([s.start_rank for s in self.students], self.final_sites)

    def kept_counts(self) -> list[int]:
        """Kept ranks per student, read in one device transfer (a GPU sync per student per step
        cost more than the step's pruning arithmetic)."""
        if not self.students:
            return []
        return torch.stack([s.mask.count_nonzero() for s in self.students]).tolist()

    def current_sites(self) -> list[Site]:
        """The students' sites at the widths their masks keep now."""
        sites = [student.site for student in self.students]
        if not self.widths:
            return sites
        kept = torch.stack([w.mask.count_nonzero() for w in self.widths]).tolist()  # one transfer
        return final_sites(sites, [replace(w.width, target=n) for w, n in zip(self.widths, kept)])

    def kept_params(self, counts: list[int] | None = None, sites: list[Site] | None = None) -> int:
        """Parameters the compressed sites would hold if finalized now (or at kept `counts`)."""
        counts = self.kept_counts() if counts is None else counts
        sites = self.current_sites() if sites is None else sites
        return self.fixed_params + sum(site.kept_params(c) for site, c in zip(sites, counts))

    def slack_left(self) -> str | None:
        """What is left of the slack the students started with (None when it is pruned): a width above
        its target, or more parameters than both the budget and the allocation's target ranks hold
        ("global" selection may keep a site above its target rank, within the budget)."""
        wide = [w.width.down for w in self.widths if int(w.group_mask.count_nonzero()) > w.target]
        if wide:
            return f"the hidden widths read by sites {', '.join(wide[:3])} keep more neurons (heads) than their targets"
        allowed = max(self.budget, self.kept_params([s.target_rank for s in self.students], self.final_sites))
        kept = self.kept_params()
        if kept > allowed:
            return f"the compressed sites would keep {kept:,} parameters where the ratio allows {math.floor(allowed):,}"
        return None

    def kept_fraction(self) -> float:
        return self.kept_params() / max(self.dense_total, 1)

    def update(self, progress: float) -> None:
        """Mask ranks so that the kept parameters follow `progress` (0: slack rank, 1: budget)."""
        progress = min(max(progress, 0.0), 1.0)
        self._prune_widths(progress)
        counts = self.kept_counts()
        keep = self._site_counts(progress) if self.selection == "site" else self._global_counts(progress, counts)
        with torch.no_grad():
            for student, count, kept in zip(self.students, keep, counts):
                if count >= kept:
                    continue
                chosen = student.importance().topk(count).indices
                mask = torch.zeros_like(student.mask)
                mask[chosen] = 1
                student.mask.mul_(mask)

    def _prune_widths(self, progress: float) -> None:
        if not self.widths:
            return
        kept = torch.stack([w.group_mask.count_nonzero() for w in self.widths]).tolist()
        with torch.no_grad():
            for width, groups in zip(self.widths, kept):
                count = scheduled_count(width.start, width.target, progress)
                if count >= groups:
                    continue
                chosen = torch.zeros_like(width.group_mask)
                chosen[width.importance().topk(count).indices] = 1
                width.mask.mul_(chosen.repeat_interleave(width.width.group))

    def _site_counts(self, progress: float) -> list[int]:
        return [scheduled_count(s.start_rank, s.target_rank, progress) for s in self.students]

    def _global_counts(self, progress: float, counts: list[int]) -> list[int]:
        target = self.start_params - (self.start_params - self.budget) * progress
        counts, sites = list(counts), self.final_sites
        # Tables follow their own schedule: a table's rank costs rows + features parameters and saves
        # no MACs, so on a per-parameter score the threshold would cut the tables and spare the
        # layers that cost time (benchmarks/embedding_tables.py).
        scheduled = self._site_counts(progress)
        for index, student in enumerate(self.students):
            if student.site.is_table:
                counts[index] = min(counts[index], scheduled[index])
        used = self.kept_params(counts, sites)
        if used <= target:
            return counts
        # Kept ranks of the linear sites in ascending order of the share of their site's squared
        # importance they carry, per parameter they cost (masked ranks and tables score inf and are skipped).
        scores = []
        for student, site in zip(self.students, sites):
            if site.is_table:
                scores.append(torch.full(student.mask.shape, math.inf, dtype=torch.float64, device=student.mask.device))
                continue
            energy = student.importance().double().pow(2)
            share = energy / energy.sum().clamp_min(1e-300) / (site.in_features + site.out_features)
            scores.append(torch.where(student.mask > 0, share, math.inf))
        flat = torch.cat(scores).cpu()  # the one transfer
        owners = torch.cat([torch.full((s.mask.numel(),), i) for i, s in enumerate(self.students)])
        order = flat.argsort(stable=True)
        for index in owners[order[flat[order].isfinite()]].tolist():
            if used <= target:
                break
            if counts[index] <= 1:
                continue  # every student keeps a rank, so the graph keeps its shape
            site = sites[index]
            used -= site.kept_params(counts[index]) - site.kept_params(counts[index] - 1)
            counts[index] -= 1
        return counts

    def shrink_elements(self, level: float) -> None:
        """Element-wise hard-shrink of the factors: zero entries below `level` times the factor's
        RMS. Keeps the method's description; only rank pruning shrinks the deployed model."""
        if level <= 0:
            return
        with torch.no_grad():
            for student in self.students:
                for weight in (student.module.down.weight, student.module.up.weight):
                    threshold = level * weight.float().pow(2).mean().sqrt()
                    weight.mul_(weight.abs() >= threshold)

    def track_widths(self) -> list[RemovableHandle]:
        """Rank the groups of each width by what its down student reads in training (a running average
        that starts from the calibration covariance) rather than by the calibration alone."""
        return [width.module.down.register_forward_pre_hook(width.observe) for width in self.widths]

    def state_dict(self) -> dict[str, Any]:
        """What the masks (in the model's state dict) do not hold: the tracked covariances of the widths."""
        return {"width_covariances": [width.covariance.clone() for width in self.widths]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for width, covariance in zip(self.widths, state.get("width_covariances", []), strict=False):
            width.covariance.copy_(covariance)

    def masks(self) -> list[torch.Tensor]:
        return [s.mask for s in self.students] + [w.mask for w in self.widths]
