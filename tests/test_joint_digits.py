"""Joint fine-tuning and compression on a shifted task: models "pretrained" on digits 0-4 are
adapted to digits 5-9, jointly compressed at ratio 0.5, and compared with plain fine-tuning of
the full model under the same step budget."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tests.joint_task import accuracy, digits_task, endless, fresh, single_thread  # noqa: F401

import tunecomp_fx
from tunecomp_fx import StepHook, TrainingConfig, get_report
from tunecomp_fx.api import CONFIG_KEY, prepared_state
from tunecomp_fx.finetune import finetune
from tunecomp_fx.sites import Blend
from tunecomp_fx.train import DEFAULT_RANK_SLACK, TRAINING_KEY

pytestmark = pytest.mark.usefixtures("single_thread")

MARGIN = 0.03  # joint compression may trail plain fine-tuning of the full model by at most 3 points
STEPS = 150
RATIO = 0.5


@pytest.mark.parametrize("kind", ["mlp", "transformer"])
def test_joint_compression_is_within_margin_of_plain_fine_tuning(kind: str) -> None:
    task = digits_task()
    assert accuracy(fresh(kind), task.test) < 0.05  # the new task really is new to the model
    plain = accuracy(finetune(fresh(kind), task.loader(seed=0), TrainingConfig(steps=STEPS, lr=1e-3, warmup=0), progress=False), task.test)
    compact = tunecomp_fx.compress(
        fresh(kind), task.example_inputs(), RATIO, data=task.loader(seed=0), eval_data=[task.test],
        steps=STEPS, lr=1e-3, warmup=0,
    )
    joint = accuracy(compact, task.test)
    report = get_report(compact)
    assert joint >= plain - MARGIN, f"joint {joint:.3f} vs plain fine-tuning {plain:.3f}"
    assert joint > 0.85
    assert report.kept_fraction <= 1 - RATIO
    assert report.param_ratio < 0.6
    assert not any(isinstance(m, Blend) for m in compact.modules())
    history = compact.meta["tunecomp_training"]["history"]
    assert history[-1]["step"] == STEPS and history[-1]["alpha"] == 0.0
    assert history[-1]["accuracy"] == pytest.approx(joint, abs=1e-6)  # evaluated at the end of the run


@pytest.mark.parametrize("selection", ["site", "global"])
def test_rank_pruning_shrinks_to_the_budget_by_the_end_of_the_blend(selection: str) -> None:
    task = digits_task()
    prepared = tunecomp_fx.prepare(fresh("transformer"), task.example_inputs(), RATIO, rank_slack=0.5)
    hook = StepHook(prepared, steps=40, blend_steps=20, rank_selection=selection)
    pruner = hook.pruner
    optimizer = torch.optim.AdamW([p for p in prepared.parameters() if p.requires_grad], lr=1e-3)
    kept = [pruner.kept_params()]
    assert kept[0] > pruner.budget  # the slack
    counts = [student.kept for student in pruner.students]
    data = endless(task.loader(seed=0))
    for _ in range(20):
        inputs, targets = next(data)
        loss = F.cross_entropy(prepared(inputs), targets) + hook.distill_loss()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        hook.step()
        kept.append(pruner.kept_params())
        now = [student.kept for student in pruner.students]
        assert all(b <= a for a, b in zip(counts, now))  # masks only ever shrink
        counts = now
    assert all(b <= a for a, b in zip(kept, kept[1:]))
    assert kept[10] > pruner.budget  # still pruning half-way through
    assert kept[20] <= pruner.budget  # budget met exactly at the end of the blend
    if selection == "site":
        assert counts == [student.target_rank for student in pruner.students]
    compact = tunecomp_fx.finalize(prepared)
    assert get_report(compact).kept_fraction <= 1 - RATIO
    assert get_report(compact).kept_fraction == pytest.approx(pruner.kept_fraction())


def test_step_hook_drives_a_users_own_loop() -> None:
    task = digits_task()
    prepared = tunecomp_fx.prepare(fresh("mlp"), task.example_inputs(), RATIO, rank_slack=0.25)
    hook = StepHook(prepared, TrainingConfig(steps=120, blend_steps=60))
    prepared.train()
    optimizer = torch.optim.AdamW([p for p in prepared.parameters() if p.requires_grad], lr=1e-3)
    distill = []
    data = endless(task.loader(seed=1))
    for step in range(120):
        inputs, targets = next(data)
        outputs = prepared(inputs)
        feature_loss = hook.distill_loss()  # collected by the forward just run
        distill.append(float(feature_loss.detach()) if torch.is_tensor(feature_loss) else feature_loss)
        (F.cross_entropy(outputs, targets) + feature_loss).backward()
        optimizer.step()
        optimizer.zero_grad()
        hook.step()
        assert hook.teacher_removed == (step + 1 >= 60)
    assert distill[0] > 0.0
    assert distill[60:] == [0.0] * 60  # no teacher, no feature loss
    compact = tunecomp_fx.finalize(prepared)
    assert accuracy(compact, task.test) > 0.8


def test_compress_without_data_refuses_training_options() -> None:
    task = digits_task()
    with pytest.raises(tunecomp_fx.ConfigError, match="data="):
        tunecomp_fx.compress(fresh("mlp"), task.example_inputs(), RATIO, steps=10)
    with pytest.raises(tunecomp_fx.ConfigError, match="unknown options"):
        tunecomp_fx.compress(fresh("mlp"), task.example_inputs(), RATIO, data=task.loader(), steps=10, momentum=0.9)


def test_rank_slack_defaults_to_the_trained_runs_whether_options_come_as_keywords_or_a_config() -> None:
    task = digits_task()

    def run(**options: object) -> torch.fx.GraphModule:
        torch.manual_seed(0)
        return tunecomp_fx.compress(
            fresh("mlp"), task.example_inputs(), data=task.loader(seed=0), steps=6, lr=1e-3, **options
        )

    by_keywords = run(ratio=RATIO)
    by_config = run(config=tunecomp_fx.CompressionConfig(ratio=RATIO))
    without_slack = run(config=tunecomp_fx.CompressionConfig(ratio=RATIO, rank_slack=0.0))
    slacks = [model.meta[CONFIG_KEY]["rank_slack"] for model in (by_keywords, by_config, without_slack)]
    assert slacks == [DEFAULT_RANK_SLACK, DEFAULT_RANK_SLACK, 0.0]
    histories = [model.meta[TRAINING_KEY]["history"] for model in (by_keywords, by_config, without_slack)]
    assert histories[0] == histories[1]  # the same run, step for step
    # Slack students start above the budget and are pruned within it; without slack they start there.
    budget = 1 - RATIO
    assert histories[0][0]["kept"] > budget >= histories[0][-1]["kept"]
    assert budget >= histories[2][0]["kept"] == histories[2][-1]["kept"]


def test_rank_slack_left_unset_is_zero_outside_a_trained_run() -> None:
    task = digits_task()
    prepared = tunecomp_fx.prepare(fresh("mlp"), task.example_inputs(), config=tunecomp_fx.CompressionConfig(ratio=RATIO))
    assert prepared_state(prepared).context.config.rank_slack == 0.0
    compact = tunecomp_fx.compress(fresh("mlp"), task.example_inputs(), RATIO)
    assert compact.meta[CONFIG_KEY]["rank_slack"] == 0.0
    with pytest.raises(tunecomp_fx.ConfigError, match="rank_slack must be a number >= 0, or None"):
        tunecomp_fx.CompressionConfig(rank_slack=-0.5)
