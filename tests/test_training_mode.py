"""Train/eval mode: symbolic-traced graphs follow .train()/.eval(); torch.export graphs cannot
(.train() raises), so set_training_mode rewrites their dropout nodes' `train` argument."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tests.joint_task import digits_task, single_thread  # noqa: F401
from torch import nn

import tunecomp_fx
from tunecomp_fx import JointTrainer
from tunecomp_fx.mode import set_training_mode

pytestmark = pytest.mark.usefixtures("single_thread")


class DropoutNet(nn.Module):
    def __init__(self, untraceable: bool) -> None:
        super().__init__()
        self.untraceable = untraceable
        self.fc1 = nn.Linear(64, 128)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.untraceable:
            x = x.reshape(-1, int(x.shape[-1]))  # int() of a Proxy: symbolic tracing fails, torch.export works
        return self.fc2(self.drop(F.relu(self.fc1(x))))


def _dropout_flags(gm: torch.fx.GraphModule) -> list[bool]:
    return [n.args[2] for n in gm.graph.nodes if n.target is torch.ops.aten.dropout.default]


@pytest.mark.parametrize("untraceable", [False, True], ids=["symbolic_trace", "torch.export"])
def test_dropout_follows_the_mode_on_both_capture_paths(untraceable: bool) -> None:
    task = digits_task()
    torch.manual_seed(0)
    prepared = tunecomp_fx.prepare(DropoutNet(untraceable), task.example_inputs(), 0.5)
    path = prepared.meta["tunecomp"].capture_path
    assert path == ("torch.export" if untraceable else "symbolic_trace")
    if untraceable:
        assert _dropout_flags(prepared) == [False]  # captured in eval mode
    x = task.test[0][:16]
    set_training_mode(prepared, True)
    assert prepared.training
    if untraceable:
        assert _dropout_flags(prepared) == [True]
    assert not torch.equal(prepared(x), prepared(x))  # dropout draws a new mask each call
    set_training_mode(prepared, False)
    assert not prepared.training and all(not m.training for m in prepared.modules())
    assert torch.equal(prepared(x), prepared(x))
    if untraceable:
        assert _dropout_flags(prepared) == [False]


def test_joint_training_runs_on_an_exported_graph() -> None:
    task = digits_task()
    torch.manual_seed(0)
    prepared = tunecomp_fx.prepare(DropoutNet(True), task.example_inputs(), 0.5, rank_slack=0.25)
    trainer = JointTrainer(prepared, data=task.loader(seed=0), eval_data=[task.test], steps=12, blend_steps=6, lr=1e-3, progress=False)
    trained = trainer.fit()
    assert trainer.hook.teacher_removed and _dropout_flags(trained) == [False]  # back in eval mode after fit
    compact = tunecomp_fx.finalize(trained)
    assert tunecomp_fx.get_report(compact).kept_fraction <= 0.5
    assert compact(task.test[0]).shape == (len(task.test[0]), 10)


class FunctionalDropoutNet(nn.Module):
    """F.dropout(training=self.training): symbolic tracing records the flag it saw (False here)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.dropout(F.relu(self.fc1(x)), p=0.5, training=self.training))


def test_functional_dropout_flag_baked_by_tracing_follows_the_mode() -> None:
    task = digits_task()
    torch.manual_seed(0)
    prepared = tunecomp_fx.prepare(FunctionalDropoutNet(), task.example_inputs(), 0.5)
    x = task.test[0][:16]
    assert torch.equal(prepared(x), prepared(x))  # captured in eval mode: the flag is False
    set_training_mode(prepared, True)
    assert not torch.equal(prepared(x), prepared(x))
    set_training_mode(prepared, False)
    assert torch.equal(prepared(x), prepared(x))
