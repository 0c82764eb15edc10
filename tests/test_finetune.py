"""Plain fine-tuning with the joint driver's recipe (the benchmark's sequential baselines)."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from tests.joint_task import digits_task, fresh
from tunecomp_fx import TrainingConfig, compress
from tunecomp_fx.batches import ContinuedData
from tunecomp_fx.errors import InputError, TrainingError
from tunecomp_fx.finetune import evaluate, finetune


def _loader() -> DataLoader:
    task = digits_task()
    return DataLoader(TensorDataset(*task.train), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))


def test_finetune_learns_the_new_task_and_is_reproducible() -> None:
    task = digits_task()
    test = [task.test]
    before = evaluate(fresh("mlp"), test)
    config = TrainingConfig(steps=60, lr=2e-3)
    first = finetune(fresh("mlp"), _loader(), config, progress=False)
    second = finetune(fresh("mlp"), _loader(), config, progress=False)
    assert not first.training
    after = evaluate(first, test)
    assert after > before + 0.5, (before, after)  # digits 5-9 are unseen by the pretrained head
    for a, b in zip(first.parameters(), second.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_finetune_trains_a_compact_graph_module() -> None:
    task = digits_task()
    compact = compress(fresh("mlp"), task.example_inputs(), 0.5)
    start = copy.deepcopy(compact)
    finetune(compact, _loader(), TrainingConfig(steps=10, lr=1e-3), progress=False)
    changed = [not torch.equal(a, b) for a, b in zip(compact.parameters(), start.parameters())]
    assert changed and all(changed)  # every factor and bias is trained, none frozen


def test_finetune_needs_a_step_count() -> None:
    with pytest.raises(InputError, match="steps"):
        finetune(fresh("mlp"), _loader(), TrainingConfig(epochs=1.0), progress=False)


def test_finetune_rejects_a_loss_that_is_not_a_scalar() -> None:
    per_sample = torch.nn.CrossEntropyLoss(reduction="none")
    with pytest.raises(TrainingError, match=r"loss_fn returned a tensor of shape \[64\] at step 1; it must return a scalar"):
        finetune(fresh("mlp"), _loader(), TrainingConfig(steps=2, lr=1e-3), loss_fn=per_sample, progress=False)


def test_finetune_shows_no_progress_bar_outside_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    finetune(fresh("mlp"), _loader(), TrainingConfig(steps=3, lr=1e-3), desc="fine-tune")  # progress defaults on
    assert capsys.readouterr().err == ""  # a log or CI output gets no carriage-return noise


def _samples_loader(generator_of: str) -> tuple[DataLoader, torch.Generator]:
    """30 samples in batches of 4 (7 a pass), the targets naming the samples, shuffled by a generator
    given to the loader or to its sampler."""
    samples, generator = TensorDataset(torch.randn(30, 3), torch.arange(30)), torch.Generator()
    if generator_of == "loader":
        return DataLoader(samples, batch_size=4, shuffle=True, drop_last=True, generator=generator), generator
    return DataLoader(samples, batch_size=4, sampler=RandomSampler(samples, generator=generator), drop_last=True), generator


@pytest.mark.parametrize("generator_of", ["loader", "sampler"])
def test_a_second_run_on_continued_data_sees_the_batches_of_the_first_runs_rest(generator_of: str) -> None:
    loader, generator = _samples_loader(generator_of)  # the 12 steps below cross a pass

    def seen(data: object, steps: int) -> list[list[int]]:
        batches: list[list[int]] = []

        def recording_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            batches.append(targets.tolist())
            return outputs.square().mean()

        finetune(torch.nn.Linear(3, 2), data, TrainingConfig(steps=steps, lr=1e-3), loss_fn=recording_loss, progress=False)
        return batches

    generator.manual_seed(5)
    whole = seen(loader, 12)
    generator.manual_seed(5)
    rest = ContinuedData(loader, start=5)
    assert seen(loader, 5) == whole[:5]
    assert seen(rest, 7) == whole[5:]
    assert seen(rest, 7) == whole[5:]  # every pass over it starts at the same batch
    generator.manual_seed(5)
    assert seen(loader, 7) != whole[5:]  # the loader itself would repeat the first run's batches


def test_continued_data_refuses_a_loader_that_shuffles_from_the_global_rng() -> None:
    samples = TensorDataset(torch.randn(30, 3), torch.arange(30))
    with pytest.raises(InputError, match=r"the data's RandomSampler draws its order from torch's global random state.*give the loader a generator"):
        ContinuedData(DataLoader(samples, batch_size=4, shuffle=True), start=5)
    in_order = ContinuedData(DataLoader(samples, batch_size=4), start=7)  # no shuffle: nothing to replay
    assert next(iter(in_order))[1].tolist() == [28, 29]


@pytest.mark.parametrize("start", [-1, 1.5, True])
def test_continued_data_needs_a_batch_count(start: object) -> None:
    with pytest.raises(InputError, match=f"start must be a batch count >= 0; got {start!r}"):
        ContinuedData(_loader(), start)  # type: ignore[arg-type]


def test_lr_scale_sets_the_step_of_the_parameters_it_names() -> None:
    # AdamW's first step moves each weight by lr * g / (|g| + eps), that is by lr where the gradient is
    # not tiny: the median move of a parameter is its learning rate.
    model = fresh("mlp")
    start = copy.deepcopy(model)
    config = TrainingConfig(steps=1, lr=1e-2, warmup=0, lr_decay="constant", weight_decay=0.0, lr_scale={"0.*": 0.1, "4.bias": 3.0})
    finetune(model, _loader(), config, progress=False)
    starts = dict(start.named_parameters())
    moves = {name: float((p - starts[name]).detach().abs().median()) for name, p in model.named_parameters()}
    assert moves == pytest.approx({"0.weight": 1e-3, "0.bias": 1e-3, "2.weight": 1e-2, "2.bias": 1e-2, "4.weight": 1e-2, "4.bias": 3e-2}, rel=1e-3)


def test_finetune_holds_the_peak_for_lr_hold_before_the_decay(monkeypatch: pytest.MonkeyPatch) -> None:
    model = fresh("mlp")  # trained on the digits first: before the learning rates are recorded
    rates: list[float] = []
    module = sys.modules[finetune.__module__]
    original = module.set_learning_rate
    monkeypatch.setattr(module, "set_learning_rate", lambda optimizer, lr: (rates.append(lr), original(optimizer, lr)))
    finetune(model, _loader(), TrainingConfig(steps=8, lr=1e-2, warmup=0, lr_hold=0.5), progress=False)
    assert rates[:5] == [1e-2] * 5  # steps 0-3 held (the first half), then the cosine, from the peak at step 4
    assert rates[4] > rates[5] > rates[6] > rates[7] > 0
