"""The schedules of a joint run, all pure functions of the optimizer step (so a resumed run and every
distributed rank compute the same values from the step alone).

- blend: alpha_t falls from 1 to exactly 0 at step T ("sin": 1 - sin(pi t / 2T), "linear", "cosine");
  beta_t = 1 - alpha_t (mix "convex", the default: a student starts as an approximation of its
  teacher, so the blend keeps the site's output at its scale), or sqrt(1 - alpha_t^2) (mix "power",
  alpha^2 + beta^2 = 1, right for uncorrelated outputs; on correlated ones it scales a site's output
  by up to sqrt(2) in mid-blend). The MiniLM benchmark's seeds favour convex (README).
- progress p_t = 1 - alpha_t, in [0, 1]: drives the feature-distillation weight (w * alpha_t, zero
  once the teacher is gone).
- pruning progress: the same curve over its own length (by default the blend's), on which the
  students shrink from their slack rank to the budget; with a longer one they go on shrinking
  after the teachers have left.
- learning rate: linear warm-up, then held at its peak for hold_steps, then a cosine or linear decay
  to 0 over the rest of the run (or constant). Under "cosine_after_blend" (TrainingConfig's default)
  the hold lasts the blend, so the compact model gets a whole decay of its own, as it does when it
  is fine-tuned after compression.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tunecomp_fx.errors import ConfigError

BLENDS = ("sin", "linear", "cosine")
LR_DECAYS = ("cosine", "linear", "constant", "cosine_after_blend")
MIXES = ("convex", "power")
DEFAULT_MIX = "convex"


def blend_alpha(kind: str, step: int, length: int) -> float:
    """Teacher weight at `step` for a blend of `length` steps: 1 at step 0, exactly 0 from `length` on."""
    if step >= length:
        return 0.0
    if step <= 0:
        return 1.0
    x = step / length
    if kind == "sin":
        return max(0.0, 1.0 - math.sin(0.5 * math.pi * x))
    if kind == "linear":
        return 1.0 - x
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * x))
    raise ConfigError(f"blend={kind!r} is not one of {', '.join(BLENDS)}")


def blend_beta(alpha: float, mix: str = DEFAULT_MIX) -> float:
    """Student weight: 1 - alpha ("convex") or sqrt(1 - alpha^2) ("power": alpha^2 + beta^2 = 1)."""
    if mix == "convex":
        return 1.0 - alpha
    if mix == "power":
        return math.sqrt(max(0.0, 1.0 - alpha * alpha))
    raise ConfigError(f"blend_mix={mix!r} is not one of {', '.join(MIXES)}")


def steps_of(value: int | float, total: int) -> int:
    """An int is a number of steps; a float in [0, 1] is that fraction of a `total`-step run."""
    if isinstance(value, bool):
        raise ConfigError(f"expected a step count or a fraction of the run; got {value!r}")
    if isinstance(value, int):
        return value
    return round(value * total)


@dataclass(frozen=True)
class Schedules:
    """Every schedule of one run of `total` optimizer steps."""

    total: int
    blend: str
    blend_steps: int
    prune_steps: int
    mix: str
    warmup_steps: int
    hold_steps: int
    lr_decay: str
    distill_weight: float

    def alpha(self, step: int) -> float:
        return blend_alpha(self.blend, step, self.blend_steps)

    def beta(self, step: int) -> float:
        return blend_beta(self.alpha(step), self.mix)

    def progress(self, step: int) -> float:
        """How far the student has taken over: 0 at the start, 1 from the end of the blend."""
        return 1.0 - self.alpha(step)

    def pruning(self, step: int) -> float:
        """How far rank (and width) pruning has gone: 0 at the start, 1 from step prune_steps on."""
        return 1.0 - blend_alpha(self.blend, step, self.prune_steps)

    def distill(self, step: int) -> float:
        """Weight of the feature-distillation loss: decays with the teacher, 0 once it is gone."""
        return self.distill_weight * self.alpha(step)

    def lr_factor(self, step: int) -> float:
        """Multiplier of the base learning rate for the update made at `step` (0-based)."""
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.lr_decay == "constant":
            return 1.0
        start = max(self.warmup_steps, self.hold_steps)
        if step < start:
            return 1.0
        span = max(self.total - start, 1)
        x = min((step - start) / span, 1.0)
        if self.lr_decay == "linear":
            return 1.0 - x
        return 0.5 * (1.0 + math.cos(math.pi * x))
