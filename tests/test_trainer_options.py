"""JointTrainer options: gradient accumulation, epochs, logit distillation, the students' own task
loss, pruning longer than the blend, element-wise hard-shrink, trainable teachers, learning rates per
parameter (lr_scale), periodic evaluation and the progress bar."""

from __future__ import annotations

import json
import sys

from typing import Any

import pytest
import torch
from tests.joint_task import digits_task, fresh, single_thread  # noqa: F401

import tunecomp_fx
from tunecomp_fx import ConfigError, JointTrainer, TrainingConfig
from tunecomp_fx.api import prepared_state
from tunecomp_fx.sites import set_blend, students_alone, teacher_parameters

pytestmark = pytest.mark.usefixtures("single_thread")


def _trainer(batch_size: int = 64, seed: int = 0, **options: Any) -> JointTrainer:
    task = digits_task()
    prepared = tunecomp_fx.prepare(fresh("mlp"), task.example_inputs(), 0.5, rank_slack=0.25)
    settings = {"steps": 10, "blend_steps": 5, "lr": 1e-3, "progress": False, **options}
    return JointTrainer(prepared, data=task.loader(batch_size, seed=seed), **settings)


def test_gradient_accumulation_matches_the_large_batch() -> None:
    # Without the feature loss (a per-batch ratio), two micro-batches of 32 are one batch of 64
    # (8 steps stay inside the first epoch, whose batches are all full).
    large = _trainer(64, steps=8, blend_steps=4, distill_weight=0.0).fit()
    accumulated = _trainer(32, steps=8, blend_steps=4, accumulate=2, distill_weight=0.0).fit()
    for (name, a), (_, b) in zip(large.state_dict().items(), accumulated.state_dict().items()):
        assert torch.allclose(a, b, atol=2e-5), name


@pytest.mark.parametrize(("ratio", "teachers_leave_after"), [(0.3, 6), (0.7, 10)])
def test_default_blend_follows_the_ratio(ratio: float, teachers_leave_after: int) -> None:
    task = digits_task()
    prepared = tunecomp_fx.prepare(fresh("mlp"), task.example_inputs(), ratio, rank_slack=0.25)
    trainer = JointTrainer(prepared, data=task.loader(64, seed=0), steps=20, lr=1e-3, progress=False)
    assert trainer.config.blend_steps == min(ratio, 0.5)  # what reports and checkpoints record
    trainer.fit()
    alphas = [record["alpha"] for record in trainer.history]
    assert alphas.index(0.0) + 1 == teachers_leave_after and all(a > 0 for a in alphas[: teachers_leave_after - 1])
    assert trainer.hook.teacher_removed


def test_epochs_set_the_run_length() -> None:
    trainer = _trainer(steps=None, epochs=2, accumulate=3)
    assert trainer.total_steps == 6  # 9 batches of 64 per epoch
    trainer.fit()
    assert trainer.hook.step_count == 6 and trainer.hook.teacher_removed


def test_logit_distillation_against_the_original_model() -> None:
    with pytest.raises(ConfigError, match="original=model"):
        _trainer(logit_distill=1.0)
    plain = _trainer()
    plain.fit()
    distilled = _trainer(logit_distill=1.0, original=fresh("mlp"))
    distilled.fit()
    # At step 0 (alpha = 1) the prepared model computes the original's logits: the KL term is 0.
    assert distilled.history[0]["loss"] == pytest.approx(plain.history[0]["loss"], abs=1e-6)
    assert distilled.history[-1]["loss"] != pytest.approx(plain.history[-1]["loss"], abs=1e-6)


def test_students_alone_computes_the_model_without_teachers() -> None:
    task = digits_task()
    prepared = tunecomp_fx.prepare(fresh("mlp"), task.example_inputs(), 0.5, rank_slack=0.25)
    inputs = task.test[0][:16]
    set_blend(prepared, 0.0)
    without_teachers = prepared(inputs)
    set_blend(prepared, 0.6)
    blended = prepared(inputs)  # its backward needs alpha and beta as they are
    with students_alone(prepared):
        alone = prepared(inputs)
    torch.testing.assert_close(alone, without_teachers, rtol=0, atol=0)
    torch.testing.assert_close(prepared(inputs), blended, rtol=0, atol=0)  # the blends are back
    (blended.sum() + alone.sum()).backward()  # the flag wrote no buffer the first forward saved
    assert all(float(b) == pytest.approx(0.6) for n, b in prepared.named_buffers() if n.endswith("blend.alpha"))


def test_student_loss_adds_the_task_loss_of_the_students_alone_while_teachers_blend() -> None:
    calls: list[torch.Tensor] = []

    def recorded(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = torch.nn.functional.cross_entropy(outputs, targets)
        calls.append(loss.detach())
        return loss

    with pytest.raises(ConfigError, match="student_loss must be >= 0"):
        TrainingConfig(student_loss=-1.0)
    trainer = _trainer(student_loss=0.5, distill_weight=0.0, loss_fn=recorded)
    trainer.fit()
    assert len(calls) == trainer.total_steps + 5  # a second forward on each of the 5 blend steps
    alphas = [1.0] + [record["alpha"] for record in trainer.history]  # alpha during each step
    for step in range(5):
        blended, alone = calls[2 * step], calls[2 * step + 1]
        assert trainer.history[step]["loss"] == pytest.approx(float(blended + 0.5 * alphas[step] * alone), rel=1e-5)
    assert abs(float(calls[0]) - float(calls[1])) > 1e-4  # the teachers' output, then the students'
    assert [float(c) for c in calls[10:]] == pytest.approx([r["loss"] for r in trainer.history[5:]], rel=1e-6)


def test_students_go_on_shrinking_after_the_teachers_leave_when_pruning_is_longer() -> None:
    with_blend = _trainer(blend_steps=2)
    with_blend.fit()
    longer = _trainer(blend_steps=2, prune_steps=8)
    compact = tunecomp_fx.finalize(longer.fit())
    assert longer.config.prune_steps == 8
    for trainer in (with_blend, longer):
        assert [r["alpha"] for r in trainer.history][1:] == [0.0] * 9  # the teachers leave after step 2
    kept = [r["kept"] for r in longer.history]
    budget = with_blend.history[1]["kept"]  # pruned with the blend: at the budget from step 2 on
    assert [r["kept"] for r in with_blend.history][1:] == [budget] * 9
    assert all(a >= b for a, b in zip(kept, kept[1:]))
    assert kept[1] > kept[4] > kept[7] and kept[7:] == [kept[7]] * 3  # shrinking without teachers until step 8
    assert kept[7] == pytest.approx(budget, abs=0.01) and kept[7] <= 0.5
    rows = tunecomp_fx.get_report(compact).sites
    assert sum(row.params_after for row in rows) <= 0.5 * sum(row.params_before for row in rows)


def test_elementwise_hardshrink_zeroes_small_factor_entries() -> None:
    trained = _trainer(hardshrink=0.5).fit()
    factors = [p for name, p in trained.named_parameters() if name.endswith(("down.weight", "up.weight"))]
    zero = sum(int((p == 0).sum()) for p in factors) / sum(p.numel() for p in factors)
    assert zero > 0.2
    untouched = _trainer().fit()
    assert all(int((p == 0).sum()) == 0 for n, p in untouched.named_parameters() if n.endswith("down.weight"))


def _teachers(trainer: JointTrainer) -> list[torch.nn.Parameter]:
    return teacher_parameters(trainer.model, prepared_state(trainer.model).context.factorized_sites())


@pytest.mark.parametrize("train_teachers", [False, True])
def test_teachers_train_only_when_asked(train_teachers: bool) -> None:
    trainer = _trainer(train_teachers=train_teachers)
    teachers = _teachers(trainer)
    before = [p.detach().clone() for p in teachers]
    assert len(teachers) == 4 and all(p.requires_grad == train_teachers for p in teachers)  # 2 factorized sites
    trained = trainer.fit()
    changed = [not torch.equal(p, b) for p, b in zip(teachers, before)]
    assert changed == [train_teachers] * len(teachers)
    assert trainer.hook.teacher_removed and not {id(p) for p in teachers} & {id(p) for p in trained.parameters()}
    compact = tunecomp_fx.finalize(trained)
    assert torch.isfinite(compact(digits_task().test[0])).all()


def test_a_trained_teacher_is_not_pulled_toward_its_student() -> None:
    # A task loss with no gradient: only the feature loss trains. Its target (the teacher's output)
    # is detached, so the last site's teacher gets no gradient at all; the first one's does, through
    # the input it gives the second site's student, as every parameter before a site does.
    trainer = _trainer(train_teachers=True, weight_decay=0.0, loss_fn=lambda outputs, targets: 0.0 * outputs.sum())
    sites = prepared_state(trainer.model).context.factorized_sites()
    first, last = (teacher_parameters(trainer.model, [site]) for site in (sites[0], sites[-1]))
    before = {id(p): p.detach().clone() for p in first + last}
    trainer.fit()
    assert all(torch.equal(p, before[id(p)]) for p in last)
    assert not torch.equal(first[0], before[id(first[0])])


def test_train_teachers_must_be_a_bool() -> None:
    with pytest.raises(ConfigError, match="train_teachers must be True or False"):
        TrainingConfig(train_teachers="yes")  # type: ignore[arg-type]


def test_periodic_evaluation_and_progress_bar(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # bars show on terminals only
    task = digits_task()
    trainer = _trainer(eval_data=[task.test], eval_every=4, progress=True)
    trainer.fit()
    evaluated = [record["step"] for record in trainer.history if "accuracy" in record]
    assert evaluated == [4, 8, 10]
    bar = capsys.readouterr().err
    assert "10/10" in bar and "alpha=0.000" in bar and "kept=0.4" in bar and "accuracy=" in bar


def test_custom_loss_and_metric_see_the_logits_of_model_outputs() -> None:
    class Wrapped(torch.nn.Module):
        """Returns a dict with logits, like a Hugging Face model."""

        def __init__(self) -> None:
            super().__init__()
            self.inner = fresh("mlp")

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"logits": self.inner(x)}

    task = digits_task()
    prepared = tunecomp_fx.prepare(Wrapped(), task.example_inputs(), 0.5, rank_slack=0.25)

    def top2(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return (logits.topk(2).indices == targets[:, None]).any(dim=1).float().mean()

    trainer = JointTrainer(
        prepared, data=task.loader(seed=0), eval_data=[task.test], metric_fn=top2, steps=6, lr=1e-3, progress=False
    )
    trainer.fit()
    assert "top2" in trainer.history[-1] and 0.0 <= trainer.history[-1]["top2"] <= 1.0


def test_bad_batches_are_named() -> None:
    task = digits_task()
    prepared = tunecomp_fx.prepare(fresh("mlp"), task.example_inputs(), 0.5)
    trainer = JointTrainer(prepared, data=[task.test[0]], steps=2, progress=False)
    with pytest.raises(tunecomp_fx.InputError, match=r"\(inputs, targets\) pairs"):
        trainer.fit()


def test_bf16_autocast_path_runs_on_cpu() -> None:
    # On CUDA bf16 autocast is the default; on CPU it is opt-in, which exercises the same path here.
    trainer = _trainer(bf16=True)
    autocast_in_training_steps: list[bool] = []  # (the numerics checks of passes run forwards too)
    trainer.model.register_forward_pre_hook(
        lambda module, args: autocast_in_training_steps.append(torch.is_autocast_enabled("cpu")) if torch.is_grad_enabled() else None
    )
    trainer.fit()
    assert len(autocast_in_training_steps) == trainer.total_steps and all(autocast_in_training_steps)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in trainer.history)
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # autocast, not a cast


def test_lr_scale_holds_back_the_students_it_names_through_the_whole_run() -> None:
    trainer = _trainer(lr_scale=(("lowrank.0.*", 1e-6),))
    named = dict(trainer.model.named_parameters())
    before = {name: p.detach().clone() for name, p in named.items() if p.requires_grad}
    trainer.fit()
    moved = {name: float((named[name].detach() - start).abs().max()) for name, start in before.items()}
    assert all(moved[name] < 1e-6 for name in moved if name.startswith("lowrank.0.")), moved  # 10 steps at lr 1e-9
    assert all(moved[name] > 1e-4 for name in moved if not name.startswith("lowrank.0.")), moved


def test_lr_scale_is_checked() -> None:
    assert TrainingConfig(lr_scale={"a*": 2}).lr_scale == TrainingConfig(lr_scale=[["a*", 2.0]]).lr_scale == (("a*", 2.0),)
    saved = TrainingConfig(lr_scale={"a*": 2, "b": 0.5})
    assert TrainingConfig.from_dict(json.loads(json.dumps(saved.to_dict()))) == saved  # a checkpoint's config resumes
    for bad, message in [
        ({"a*": 0}, "lr_scale factors must be finite numbers > 0; got 0 for 'a*'"),
        ({"a*": float("nan")}, "lr_scale factors must be finite numbers > 0; got nan"),
        ({"a*": True}, "lr_scale factors must be finite numbers > 0; got True"),
        ("a*=0.1", "lr_scale takes (pattern, factor) pairs or a {pattern: factor} mapping"),
        ([("a*",)], "got the item ('a*',)"),
        (0.1, "got 0.1"),
    ]:
        with pytest.raises(ConfigError) as caught:
            TrainingConfig(lr_scale=bad)  # type: ignore[arg-type]
        assert message in str(caught.value)
    # the teachers are frozen: a pattern that names them alone names no trainable parameter
    with pytest.raises(ConfigError, match=r"lr_scale patterns \['0\.\*', 'nope'\] match no trainable parameter of the model; its trainable "
                       r"parameters are 4\.weight, 4\.bias, lowrank\.0\.down\.weight"):
        _trainer(lr_scale={"lowrank.2.*": 0.5, "0.*": 0.1, "nope": 2.0}).fit()
    with pytest.raises(ConfigError, match=r"lr_scale patterns \['lowrank\.\*\.up\.\*'\] match only parameters an earlier pattern already takes"):
        _trainer(lr_scale={"lowrank.*": 2.0, "lowrank.*.up.*": 0.5}).fit()
