"""Rank allocation: the budget is met exactly (never over), break-even sites stay dense and are
accounted for, ranks are multiples of `rank_multiple` where that fits, and global allocation follows energy."""

from __future__ import annotations

import pytest
import torch

from tunecomp_fx.errors import BudgetError
from tunecomp_fx.passes.allocate_ranks import allocate, global_priority, uniform_priority
from tunecomp_fx.sites import Site


def _site(name: str, out_features: int, in_features: int) -> Site:
    return Site(name, name, "call_module", in_features, out_features, f"{name}.weight", f"{name}.bias")


def _kept(sites, decisions) -> int:
    return sum(s.dense_params if decisions[s.name].rank is None else s.factorized_params(decisions[s.name].rank) for s in sites)


SITES = [_site("qkv", 2304, 768), _site("proj", 768, 768), _site("fc1", 3072, 768), _site("fc2", 768, 3072), _site("head", 10, 768)]


@pytest.mark.parametrize("multiple", [8, 16])
@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5, 0.7, 0.9])
def test_uniform_meets_budget_with_ranks_in_multiples(ratio, multiple):
    kept = 1 - ratio
    decisions = allocate(SITES, kept, multiple, uniform_priority(kept))
    total = sum(s.dense_params for s in SITES)
    assert kept * total - 0.01 * total <= _kept(SITES, decisions) <= kept * total
    big = [s for s in SITES if s.name != "head"]
    assert all(decisions[s.name].rank % multiple == 0 for s in big)
    fractions = [s.factorized_params(decisions[s.name].rank) / s.dense_params for s in big]
    # uniform: every big site keeps about the same share, each within a block of ranks of it
    block = max(multiple * (s.in_features + s.out_features) / s.dense_params for s in big)
    assert max(fractions) - min(fractions) <= 2 * block


def test_site_that_cannot_shrink_stays_dense_and_is_charged():
    tiny = _site("tiny", 1, 300)  # a rank-1 factorization (301 weights) beats nothing: stays dense
    sites = SITES[:2] + [tiny]
    decisions = allocate(sites, 0.5, 8, uniform_priority(0.5))
    assert decisions["tiny"].rank is None and "break-even" in decisions["tiny"].reason
    total = sum(s.dense_params for s in sites)
    assert _kept(sites, decisions) <= 0.5 * total


def test_impossible_budget_is_a_budget_error():
    sites = [_site("a", 1, 50), _site("b", 2, 2)]  # neither can shrink
    with pytest.raises(BudgetError, match=r"every compressed site is past break-even.*a \(1x50\), b \(2x2\)"):
        allocate(sites, 0.5, 8, uniform_priority(0.5))
    # c shrinks, but dense a (51) and rank-1 c (72) keep 123 of 311 weights: at most ratio 0.605.
    sites = [_site("a", 1, 50), _site("c", 4, 64)]
    with pytest.raises(BudgetError, match=r"ratio=0\.7 cannot be met.*largest reachable ratio is 0\.605.*smaller ratio"):
        allocate(sites, 0.3, 8, uniform_priority(0.3))


def test_global_gives_rank_to_the_flat_spectrum():
    flat, steep = _site("flat", 256, 256), _site("steep", 256, 256)
    energies = {
        "flat": torch.full((256,), 1 / 256, dtype=torch.float64),
        "steep": (lambda e: e / e.sum())(torch.exp(-torch.arange(256, dtype=torch.float64) / 4)),
    }
    decisions = allocate([flat, steep], 0.3, 8, global_priority(energies))
    # The steep site holds 98% of its energy in 16 ranks; past that every rank goes to the flat one.
    assert decisions["steep"].rank <= 17 and decisions["flat"].rank >= 56
    total = flat.dense_params + steep.dense_params
    assert 0.29 * total <= _kept([flat, steep], decisions) <= 0.3 * total


def test_global_turns_a_site_dense_when_dense_is_worth_it():
    # A small site with a flat spectrum beside a big one whose energy sits in a few ranks: once the
    # small site nears break-even, going dense recovers all its energy for a few more weights.
    square, big = _site("square", 64, 64), _site("big", 512, 512)
    energies = {
        "square": torch.full((64,), 1 / 64, dtype=torch.float64),
        "big": (lambda e: e / e.sum())(torch.exp(-torch.arange(512, dtype=torch.float64) / 4)),
    }
    decisions = allocate([square, big], 0.3, 8, global_priority(energies))
    assert decisions["square"].rank is None
    assert _kept([square, big], decisions) <= 0.3 * (square.dense_params + big.dense_params)
