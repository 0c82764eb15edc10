"""Checkpoints: an interrupted run resumed from its last checkpoint ends with exactly the weights
of an uninterrupted run (CPU, fixed seed); a checkpoint of another config or model is refused;
NaN/inf stops the run with the step named and no checkpoint written for it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from tests.joint_task import Interrupted, digits_task, single_thread  # noqa: F401
from torch import nn
from torch.utils.data import DataLoader

import tunecomp_fx
from tunecomp_fx import JointTrainer, TrainingError
from tunecomp_fx.sites import student_calls

pytestmark = pytest.mark.usefixtures("single_thread")

STEPS, BLEND = 40, 20


class DropoutMLP(nn.Module):
    """Dropout draws on the RNG; the unused `aux` norm is dead code whose trainable parameters
    leave the model with the teachers (eliminate_dead_code), and so leave the optimizer. With
    `shared`, an FFN of two more layers is applied twice (a student per layer, two calls each; with
    prune_neurons its width keeps the same neurons at both)."""

    def __init__(self, shared: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 128)
        self.fc2 = nn.Linear(128, 128)
        self.shared_up, self.shared_down = (nn.Linear(128, 256), nn.Linear(256, 128)) if shared else (None, None)
        self.head = nn.Linear(128, 10)
        self.drop = nn.Dropout(0.2)
        self.aux = nn.LayerNorm(64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.aux(x)
        h = self.drop(F.relu(self.fc1(x)))
        h = self.drop(F.relu(self.fc2(h)))
        if self.shared_up is not None:
            for _ in range(2):
                h = h + self.shared_down(F.relu(self.shared_up(h)))
        return self.head(h)


def _trainer(data: Any, checkpoints: Path, compression: dict[str, Any] | None = None, shared: bool = False, **options: Any) -> JointTrainer:
    task = digits_task()
    torch.manual_seed(123)
    model = DropoutMLP(shared)
    prepared = tunecomp_fx.prepare(model, task.example_inputs(), 0.5, rank_slack=0.25, **(compression or {}))
    settings = {"steps": STEPS, "blend_steps": BLEND, "lr": 1e-3, "warmup": 5, **options}
    return JointTrainer(prepared, data=data, checkpoint_dir=checkpoints, checkpoint_every=5, progress=False, **settings)


def _loader() -> DataLoader:
    return digits_task().loader(batch_size=64)  # shuffled by torch's global RNG


# Gradual width pruning also carries the widths' tracked covariances in the checkpoint.
WIDTH_SLACK = {"prune_neurons": 0.25, "width_slack": 1.0}


# Pruning that goes on after the teachers leave (steps 10-30), the widths still tracked.
PRUNING_PAST_THE_BLEND = {"blend_steps": 10, "prune_steps": 30}


@pytest.mark.parametrize(
    ("interrupt_after", "compression", "options"),
    [(13, None, {}), (33, None, {}), (13, WIDTH_SLACK, {}), (23, WIDTH_SLACK, PRUNING_PAST_THE_BLEND), (33, None, {"shared": True}), (13, WIDTH_SLACK, {"shared": True})],
    ids=[
        "during-blend", "after-teacher-removal", "during-blend-width-slack", "pruning-past-the-blend-width-slack",
        "after-teacher-removal-shared-layers", "during-blend-width-slack-shared-layers",
    ],  # fmt: skip
)
def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_run(
    tmp_path: Path, interrupt_after: int, compression: dict | None, options: dict
) -> None:
    full = _trainer(_loader(), tmp_path / "full", compression, **options)
    full.fit()
    assert "aux.weight" not in dict(full.model.named_parameters())
    assert len(student_calls(full.model).get("shared_up", ())) == (2 if options.get("shared") else 0)  # one student, both calls
    widths = full.model.meta["tunecomp"].context.hidden_widths
    assert any(w.down == "shared_down" and len(w.betweens) == 2 for w in widths) == bool(options.get("shared") and compression)

    broken = _trainer(Interrupted(_loader(), interrupt_after), tmp_path / "broken", compression, **options)
    with pytest.raises(KeyboardInterrupt):
        broken.fit()
    latest = sorted((tmp_path / "broken").glob("step_*.pt"))[-1]
    assert latest.name == f"step_{(interrupt_after // 5) * 5:07d}.pt"

    resumed = _trainer(_loader(), tmp_path / "broken", compression, **options)
    resumed.fit(resume=tmp_path / "broken")
    expected, actual = full.model.state_dict(), resumed.model.state_dict()
    assert expected.keys() == actual.keys()
    assert any(key.endswith("rank_mask") for key in actual)
    assert any(key.endswith("width_mask") for key in actual) == (compression is not None)
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    assert resumed.history == full.history


def test_resume_with_another_config_or_model_is_refused(tmp_path: Path) -> None:
    broken = _trainer(Interrupted(_loader(), 7), tmp_path)
    with pytest.raises(KeyboardInterrupt):
        broken.fit()
    with pytest.raises(TrainingError, match=r"different training config.*'lr': \(0.001, 0.002\)"):
        _trainer(_loader(), tmp_path, lr=2e-3).fit(resume=tmp_path)
    task = digits_task()
    other = tunecomp_fx.prepare(DropoutMLP(), task.example_inputs(), 0.4, rank_slack=0.25)
    trainer = JointTrainer(other, data=_loader(), steps=STEPS, blend_steps=BLEND, lr=1e-3, warmup=5, progress=False)
    with pytest.raises(TrainingError, match="different model or compression"):
        trainer.fit(resume=tmp_path)
    with pytest.raises(TrainingError, match="does not exist"):
        _trainer(_loader(), tmp_path).fit(resume=tmp_path / "missing.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainingError, match=r"no checkpoint \(step_\*.pt\) in"):
        _trainer(_loader(), tmp_path).fit(resume=tmp_path / "empty")


def test_non_finite_loss_stops_at_its_step_without_writing_a_checkpoint(tmp_path: Path) -> None:
    calls = {"n": 0}

    def loss_fn(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        loss = F.cross_entropy(outputs, targets)
        return loss * float("nan") if calls["n"] == 12 else loss

    with pytest.raises(TrainingError, match="the loss is nan at step 12 of 40"):
        _trainer(_loader(), tmp_path, loss_fn=loss_fn).fit()
    assert [p.name for p in sorted(tmp_path.glob("step_*.pt"))] == ["step_0000005.pt", "step_0000010.pt"]
    assert not list(tmp_path.glob("*.partial"))


def test_non_finite_gradient_with_a_finite_loss_stops_too(tmp_path: Path) -> None:
    def loss_fn(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # sqrt at 0 has an infinite derivative: the loss stays finite, its gradient does not.
        return F.cross_entropy(outputs, targets) + (outputs.sum() * 0).sqrt()

    with pytest.raises(TrainingError, match="gradients are non-finite .* at step 1 of 40"):
        _trainer(_loader(), tmp_path, loss_fn=loss_fn).fit()
    assert not list(tmp_path.glob("step_*.pt"))


def test_a_checkpoint_reaches_the_disk_before_it_replaces_the_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """fsync of the written file, then the atomic rename, then fsync of the folder (so that the
    rename survives a power loss too); the file loads with what was saved."""
    import os

    from tunecomp_fx.checkpoints import save_durably

    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda src, dst: (events.append(("replace", str(dst))), real_replace(src, dst))[1])
    path = tmp_path / "step_0000003.pt"

    save_durably({"step": 3, "weight": torch.arange(4.0)}, path)

    assert events == [("fsync", f"{path}.partial"), ("replace", str(path)), ("fsync", str(tmp_path))]
    loaded = torch.load(path, weights_only=True)
    assert loaded["step"] == 3 and torch.equal(loaded["weight"], torch.arange(4.0))
    assert not Path(f"{path}.partial").exists()
