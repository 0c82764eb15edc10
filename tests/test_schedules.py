"""The blend, distillation and learning-rate schedules, and TrainingConfig validation."""

from __future__ import annotations

import math

import pytest

from tunecomp_fx import ConfigError, TrainingConfig
from tunecomp_fx.schedules import BLENDS, MIXES, blend_alpha, blend_beta, steps_of


@pytest.mark.parametrize("kind", BLENDS)
@pytest.mark.parametrize("length", [1, 7, 100])
def test_alpha_starts_at_one_falls_monotonically_and_is_exactly_zero_from_T(kind: str, length: int) -> None:
    alphas = [blend_alpha(kind, t, length) for t in range(length + 5)]
    assert alphas[0] == 1.0
    assert all(a >= b for a, b in zip(alphas, alphas[1:]))
    assert all(0.0 <= a <= 1.0 for a in alphas)
    assert alphas[length - 1] > 0.0
    assert all(a == 0.0 for a in alphas[length:])  # exactly, so the teachers can leave at step T


@pytest.mark.parametrize("kind", BLENDS)
def test_power_mix_preserves_power_and_convex_mix_sums_to_one(kind: str) -> None:
    for t in range(0, 51):
        alpha = blend_alpha(kind, t, 50)
        assert math.isclose(alpha**2 + blend_beta(alpha, "power") ** 2, 1.0, abs_tol=1e-12)
        assert math.isclose(alpha + blend_beta(alpha, "convex"), 1.0, abs_tol=1e-12)


@pytest.mark.parametrize("mix", MIXES)
def test_schedules_use_the_configured_mix(mix: str) -> None:
    schedules = TrainingConfig(steps=100, blend_steps=40, blend_mix=mix).schedules(100)
    assert schedules.beta(0) == 0.0 and schedules.beta(40) == 1.0
    alpha = schedules.alpha(20)
    assert schedules.beta(20) == pytest.approx(1 - alpha if mix == "convex" else math.sqrt(1 - alpha**2), abs=1e-15)


def test_unknown_mix_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"blend_mix='sum' is not one of convex, power"):
        TrainingConfig(steps=10, blend_mix="sum")


def test_sin_schedule_is_the_method_formula() -> None:
    for t in range(0, 40):
        assert blend_alpha("sin", t, 40) == pytest.approx(max(0.0, 1 - math.sin(math.pi * t / 80)), abs=1e-15)


def test_steps_or_fraction_of_the_run() -> None:
    assert steps_of(30, 200) == 30
    assert steps_of(0.25, 200) == 50
    assert steps_of(1.0, 200) == 200
    schedules = TrainingConfig(steps=200, blend_steps=0.25).schedules(200)
    assert schedules.blend_steps == 50
    assert schedules.alpha(50) == 0.0 and schedules.alpha(49) > 0.0


def test_distillation_weight_decays_to_zero_with_the_blend() -> None:
    schedules = TrainingConfig(steps=100, blend_steps=40, distill_weight=2.0).schedules(100)
    weights = [schedules.distill(t) for t in range(101)]
    assert weights[0] == 2.0
    assert all(a >= b for a, b in zip(weights, weights[1:]))
    assert weights[40:] == [0.0] * 61
    assert schedules.progress(0) == 0.0 and schedules.progress(40) == 1.0


def test_learning_rate_warms_up_then_decays() -> None:
    schedules = TrainingConfig(steps=100, warmup=10, blend_steps=0.5, lr_decay="cosine").schedules(100)
    factors = [schedules.lr_factor(t) for t in range(100)]
    assert factors[:10] == sorted(factors[:10]) and factors[0] < 0.2
    assert factors[10] == 1.0
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert factors[-1] < 0.01
    constant = TrainingConfig(steps=100, warmup=0, lr_decay="constant", blend_steps=0.5).schedules(100)
    assert {constant.lr_factor(t) for t in range(100)} == {1.0}


def test_the_default_learning_rate_holds_the_peak_through_the_blend_then_decays_over_the_rest() -> None:
    held = TrainingConfig(steps=100, warmup=10, blend_steps=40).schedules(100)
    plain = TrainingConfig(steps=100, warmup=10, blend_steps=40, lr_decay="cosine").schedules(100)
    factors = [held.lr_factor(t) for t in range(100)]
    assert factors[:10] == [plain.lr_factor(t) for t in range(10)]
    assert factors[10:41] == [1.0] * 31
    assert all(a > b for a, b in zip(factors[40:], factors[41:]))
    # the cosine over the 60 steps after the blend: halfway down at step 70
    assert factors[70] == pytest.approx(0.5) and factors[-1] < 0.01
    # without a blend (a fine-tune) it is the plain cosine
    no_blend = TrainingConfig(steps=100, warmup=10, blend_steps=0).schedules(100)
    assert [no_blend.lr_factor(t) for t in range(100)] == [plain.lr_factor(t) for t in range(100)]


@pytest.mark.parametrize("lr_decay", ["cosine", "linear", "cosine_after_blend"])
def test_lr_hold_holds_the_peak_until_its_step_under_every_decay(lr_decay: str) -> None:
    held = TrainingConfig(steps=100, warmup=10, blend_steps=20, lr_decay=lr_decay, lr_hold=0.5).schedules(100)
    factors = [held.lr_factor(t) for t in range(100)]
    assert factors[10:51] == [1.0] * 41
    assert all(a > b for a, b in zip(factors[50:], factors[51:]))


def test_a_fine_tune_holding_as_long_as_the_blend_gets_the_default_joint_schedule_exactly() -> None:
    fine_tune = TrainingConfig(steps=100, warmup=10, blend_steps=0, lr_hold=40).schedules(100)  # as finetune runs it
    joint = TrainingConfig(steps=100, warmup=10, blend_steps=40).schedules(100)
    assert [fine_tune.lr_factor(t) for t in range(100)] == [joint.lr_factor(t) for t in range(100)]


def test_lr_hold_0_makes_the_default_schedule_the_plain_cosine_and_a_hold_past_the_run_is_refused() -> None:
    unheld = TrainingConfig(steps=100, warmup=10, blend_steps=40, lr_hold=0).schedules(100)
    plain = TrainingConfig(steps=100, warmup=10, blend_steps=40, lr_decay="cosine").schedules(100)
    assert [unheld.lr_factor(t) for t in range(100)] == [plain.lr_factor(t) for t in range(100)]
    with pytest.raises(ConfigError, match="lr_hold=120 ends at step 120, after the run's 100 steps"):
        TrainingConfig(steps=100, blend_steps=10, lr_hold=120).schedules(100)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"steps": 10, "epochs": 1}, "not both"),
        ({"steps": 0}, "positive int"),
        ({"blend": "exp"}, "blend='exp'"),
        ({"blend_steps": 1.5}, "fraction of the run"),
        ({"lr_hold": -1}, "lr_hold must be a step count"),
        ({"lr_hold": 1.5}, "lr_hold=1.5 as a float is a fraction of the run"),
        ({"rank_selection": "random"}, "rank_selection"),
        ({"lr": 0.0}, "lr must be > 0"),
        ({"accumulate": 0}, "accumulate"),
    ],
)
def test_bad_training_options_raise_config_error(options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TrainingConfig(**options)


def test_blend_longer_than_the_run_is_refused() -> None:
    with pytest.raises(ConfigError, match="after the run's 100 steps"):
        TrainingConfig(steps=100, blend_steps=150).schedules(100)


@pytest.mark.parametrize("prune_steps", [None, 0, 40, 0.8])
def test_pruning_follows_the_blend_curve_over_its_own_length(prune_steps: int | float | None) -> None:
    schedules = TrainingConfig(steps=100, blend_steps=20, prune_steps=prune_steps).schedules(100)
    length = {None: 20, 0: 0, 40: 40, 0.8: 80}[prune_steps]  # None: with the blend
    assert schedules.blend_steps == 20 and schedules.prune_steps == length
    for step in range(101):
        assert schedules.pruning(step) == pytest.approx(1.0 - blend_alpha("sin", step, length), abs=0)
    assert schedules.pruning(length) == 1.0 and (length == 0 or schedules.pruning(length - 1) < 1.0)


def test_pruning_longer_than_the_run_or_negative_is_refused() -> None:
    with pytest.raises(ConfigError, match="prune_steps=150 ends at step 150, after the run's 100 steps"):
        TrainingConfig(steps=100, blend_steps=10, prune_steps=150).schedules(100)
    with pytest.raises(ConfigError, match="prune_steps must be a step count"):
        TrainingConfig(prune_steps=-1)


def test_config_round_trips_through_a_dict() -> None:
    config = TrainingConfig(steps=300, lr=3e-4, blend="cosine", blend_steps=120, prune_steps=200, max_grad_norm=None)
    assert TrainingConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="unknown training options"):
        TrainingConfig.from_dict({**config.to_dict(), "momentum": 0.9})


def test_a_config_saved_before_blend_mix_existed_reads_as_the_power_mix_it_ran() -> None:
    saved = TrainingConfig(steps=10).to_dict()
    del saved["blend_mix"]
    assert TrainingConfig.from_dict(saved).blend_mix == "power"
    assert TrainingConfig.from_dict(TrainingConfig(steps=10).to_dict()) == TrainingConfig(steps=10)


@pytest.mark.parametrize(("ratio", "fraction"), [(0.2, 0.2), (0.3, 0.3), (0.5, 0.5), (0.7, 0.5), (0.9, 0.5)])
def test_default_blend_lasts_the_removed_fraction_at_most_half_the_run(ratio: float, fraction: float) -> None:
    config = TrainingConfig(steps=200).for_ratio(ratio)
    assert config.blend_steps == fraction
    assert config.schedules(200).blend_steps == round(200 * fraction)


def test_a_given_blend_length_is_kept_at_any_ratio() -> None:
    for given in (0.8, 0.1, 30):
        assert TrainingConfig(steps=200, blend_steps=given).for_ratio(0.3).blend_steps == given


def test_unresolved_default_blend_has_no_schedules() -> None:
    with pytest.raises(ConfigError, match=r"call for_ratio\(ratio\) first"):
        TrainingConfig(steps=100).schedules(100)
