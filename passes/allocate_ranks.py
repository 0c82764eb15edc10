"""Analysis: choose each compressed site's rank so that the kept parameters of the compressed sites
meet (1 - ratio) of their dense size, never over it.

Both strategies share one greedy fill: start every site at rank 1, then repeatedly grant the best
next step (a block of `rank_multiple` ranks, or the switch to dense once a block would cross
break-even) that still fits the budget; a last pass in single ranks closes a leftover gap.
- uniform: the best step goes to the site furthest below its own share of the budget;
- global: the best step recovers the most whitened singular-value energy per added parameter;
  embedding tables (compress_embeddings) are filled uniformly to their own share of the budget,
  apart from the layers (a table's rank saves no MACs).
A site's rank never exceeds the number of components its decomposition has (method="union":
the size of its union of subspaces; the default method: min(in, out), never binding); past
that, as past break-even, the only step left is to keep the site dense.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import fx

from tunecomp_fx.errors import BudgetError
from tunecomp_fx.pipeline import GraphPass, PassContext, RankDecision
from tunecomp_fx.sites import Site, final_sites

# Ranks stay multiples of `rank_multiple` unless that leaves more than this fraction of the compressed
# sites' dense size unused; then a last fill in single ranks closes the gap (the target is within 1%).
_RESIDUAL_GAP = 0.005


@dataclass(frozen=True)
class _State:
    site: Site
    rank: int
    cap: int  # the largest rank the site's decomposition offers
    dense_params: int  # what the site holds dense: the layer, or a densified student (which has a bias)
    dense: bool = False

    @property
    def params(self) -> int:
        return self.dense_params if self.dense else self.site.factorized_params(self.rank)


def _next_step(state: _State, step: int) -> tuple[int, bool] | None:
    """(new rank, dense?) of the state's next step, or None when it is already dense."""
    if state.dense:
        return None
    rank = (state.rank // step + 1) * step
    if rank >= state.site.break_even_rank or state.rank >= state.cap:
        return state.rank, True
    return min(rank, state.cap), False


def allocate(
    sites: list[Site],
    kept_fraction: float,
    rank_multiple: int,
    priority: Callable[[_State, int, bool], float],
    caps: dict[str, int] | None = None,
    students: frozenset[str] = frozenset(),
) -> dict[str, RankDecision]:
    """`students`: sites that keep a student even when dense (a pruned width's), charged its bias."""
    total = sum(site.unpruned_params for site in sites)  # the ratio is of the layers before neuron pruning
    budget = kept_fraction * total
    states = {}
    for site in sites:
        cap = (caps or {}).get(site.name, min(site.in_features, site.out_features))
        dense_params = site.student_dense_params if site.name in students else site.dense_params
        if site.break_even_rank <= 1:
            states[site.name] = _State(site, 0, cap, dense_params, dense=True)
        else:
            states[site.name] = _State(site, 1, cap, dense_params)
    used = sum(state.params for state in states.values())
    if used > budget:
        raise BudgetError(_unreachable(states, kept_fraction, used, total, budget))
    for step in (rank_multiple, 1):
        if step == 1 and budget - used <= _RESIDUAL_GAP * total:
            break
        heap: list[tuple[float, str]] = []

        def push(state: _State) -> None:
            move = _next_step(state, step)
            if move is not None:
                heapq.heappush(heap, (-priority(state, *move), state.site.name))

        for state in states.values():
            push(state)
        while heap:
            _, name = heapq.heappop(heap)
            state = states[name]
            rank, dense = _next_step(state, step)
            grown = replace(state, rank=rank, dense=dense)
            if used - state.params + grown.params > budget:
                continue  # this site cannot take its next step; others still may
            used += grown.params - state.params
            states[name] = grown
            push(grown)
    return {
        name: RankDecision(None, "past break-even: dense is no larger") if state.dense else RankDecision(state.rank)
        for name, state in states.items()
    }


def _unreachable(states: dict[str, _State], kept_fraction: float, used: int, total: int, budget: float) -> str:
    past = [f"{s.site.name} ({s.site.out_features}x{s.site.in_features})" for s in states.values() if s.dense]
    ratio = f"ratio={1 - kept_fraction:.3g} cannot be met"
    if len(past) == len(states):
        return (
            f"{ratio}: every compressed site is past break-even (even rank 1 holds as many parameters as the "
            f"dense matrix): {', '.join(past[:5])}{' ...' if len(past) > 5 else ''}. Layers this narrow cannot "
            "be shrunk by factorization, so this model has nothing to compress at any ratio"
        )
    dense = f"; {len(past)} sites past break-even stay dense ({', '.join(past[:3])})" if past else ""
    return (
        f"{ratio}: rank 1 everywhere already keeps {used:,} of {total:,} parameters (budget {budget:,.0f}){dense}. "
        f"The largest reachable ratio is {1 - used / total:.3g}: use a smaller ratio, or exclude the sites "
        "too small to shrink"
    )


def uniform_priority(kept_fraction: float) -> Callable[[_State, int, bool], float]:
    def priority(state: _State, rank: int, dense: bool) -> float:
        share = kept_fraction * state.site.unpruned_params
        return (share - state.params) / state.site.unpruned_params

    return priority


def global_priority(energies: dict[str, torch.Tensor]) -> Callable[[_State, int, bool], float]:
    """Fraction of a site's whitened energy recovered per added parameter."""

    def priority(state: _State, rank: int, dense: bool) -> float:
        energy = energies[state.site.name]
        end = len(energy) if dense else rank
        cost = (state.dense_params if dense else state.site.factorized_params(rank)) - state.params
        return float(energy[state.rank : end].sum()) / max(cost, 1)

    return priority


def _hidden_width_sites(ctx: PassContext) -> list[Site]:
    names = {name for width in ctx.hidden_widths for name in width.sites}
    return [site for site in ctx.compressed_sites if site.name in names]


def _kept_params(site: Site, rank: int | None) -> int:
    """Parameters after finalize: the layer left dense, or its student's."""
    return site.dense_params if rank is None else site.kept_params(rank)


class AllocateRanks(GraphPass):
    name = "allocate_ranks"
    preserves_outputs = True

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> str | None:
        if ctx.config.allocation == "global" and not ctx.decompositions:
            return "global allocation needs the decompositions (run decompose_weights first)"
        return None

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        config = ctx.config
        if config.allocation == "global":
            energies = {}
            for name, decomposition in ctx.decompositions.items():
                squared = decomposition.singular_values.double() ** 2
                energies[name] = squared / squared.sum().clamp_min(1e-300)
            priority = global_priority(energies)
        else:
            priority = uniform_priority(config.kept_fraction)
        caps = {name: len(decomposition.singular_values) for name, decomposition in ctx.decompositions.items()}
        # Ranks are chosen for the shapes finalize leaves (a width pruned gradually starts wider).
        students = frozenset(site.name for site in _hidden_width_sites(ctx))
        sites = final_sites(ctx.compressed_sites, ctx.hidden_widths)
        # A table's rank costs rows + features parameters and saves no MACs: on the energy per parameter
        # the tables would take the cut (0.9 points lost on MiniLM). Under "global" they keep their own
        # share, as under RankPruner's global selection, and the layers share theirs by energy.
        tables = [site for site in sites if site.is_table] if config.allocation == "global" else []
        layers = [site for site in sites if site not in tables]
        ctx.ranks = allocate(layers, config.kept_fraction, config.rank_multiple, priority, caps, students)
        ctx.ranks |= allocate(tables, config.kept_fraction, config.rank_multiple, uniform_priority(config.kept_fraction), caps)
        # A site of a pruned hidden width needs a student even when it stays dense: the student computes
        # the kept neurons alone. At full rank it is past break-even, so finalize densifies it.
        for site in _hidden_width_sites(ctx):
            if ctx.ranks[site.name].rank is None:
                ctx.ranks[site.name] = RankDecision(min(site.in_features, site.out_features), "kept neurons, dense")
        return gm

    def ensures(self, gm: fx.GraphModule, ctx: PassContext) -> str | None:
        sites = ctx.compressed_sites
        full_rank = {site.name for site in _hidden_width_sites(ctx)}
        for site in sites:
            decision = ctx.ranks.get(site.name)
            if decision is None:
                return f"no rank decision for site '{site.name}'"
            if site.name in full_rank:
                bound, limit = f"full rank {min(site.in_features, site.out_features)}]", min(site.in_features, site.out_features) + 1
            else:
                bound, limit = f"break-even {site.break_even_rank})", site.break_even_rank
            if decision.rank is not None and not 1 <= decision.rank < limit:
                return f"site '{site.name}' got rank {decision.rank}, outside [1, {bound}"
        budget = ctx.config.kept_fraction * sum(s.unpruned_params for s in sites)
        kept = sum(_kept_params(s, ctx.ranks[s.name].rank) for s in final_sites(sites, ctx.hidden_widths))
        if kept > budget:
            return f"kept {kept:,} parameters, over the budget of {budget:,.0f}"
        return None
