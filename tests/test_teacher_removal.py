"""Once alpha reaches 0 the teachers leave the compute: their nodes and weights are gone and no
teacher matmul runs, while the optimizer keeps its state for every remaining parameter."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from tests.joint_task import digits_task, endless, fresh, single_thread  # noqa: F401
from torch.utils._python_dispatch import TorchDispatchMode

import tunecomp_fx
from tunecomp_fx import StepHook
from tunecomp_fx.sites import Blend, student_nodes

pytestmark = pytest.mark.usefixtures("single_thread")

aten = torch.ops.aten
_MATMULS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.linear.default}


class MatmulCounter(TorchDispatchMode):
    """Counts matrix multiplications by the shape of their weight operand."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: Counter[tuple[int, ...]] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        if func in _MATMULS:
            weight = args[2] if func is aten.addmm.default else args[1]
            self.shapes[tuple(weight.shape)] += 1
        return func(*args, **(kwargs or {}))


def _count(model: torch.nn.Module, inputs: torch.Tensor) -> Counter[tuple[int, ...]]:
    with torch.no_grad(), MatmulCounter() as counter:
        model(inputs)
    return counter.shapes


def test_teachers_leave_the_graph_and_the_compute_at_alpha_zero() -> None:
    task = digits_task()
    prepared = tunecomp_fx.prepare(fresh("mlp"), task.example_inputs(), 0.5, rank_slack=0.25)
    teacher_weights = {name: tuple(p.shape) for name, p in prepared.named_parameters() if not p.requires_grad}
    assert set(teacher_weights) == {"0.weight", "0.bias", "2.weight", "2.bias"}  # two factorized sites
    hook = StepHook(prepared, steps=12, blend_steps=6)
    optimizer = torch.optim.AdamW([p for p in prepared.parameters() if p.requires_grad], lr=1e-3)
    inputs = task.test[0][:32]
    # Multiplying by the transposed weight: addmm's operand is W^T (in x out).
    teacher_shapes = {(64, 256), (256, 256)}
    before = _count(prepared, inputs)
    assert sum(before[s] for s in teacher_shapes) == 2  # both teachers run during the blend
    data = endless(task.loader(seed=0))
    states = {}
    for step in range(12):
        inputs_batch, targets = next(data)
        (F.cross_entropy(prepared(inputs_batch), targets) + hook.distill_loss()).backward()
        optimizer.step()
        optimizer.zero_grad()
        if step == 5:
            states = {id(p): (p, optimizer.state[p]["exp_avg"].clone()) for p in optimizer.state}
        hook.step()
        if step == 5:  # alpha just reached 0
            assert hook.alpha == 0.0 and hook.teacher_removed
            assert all(torch.equal(optimizer.state[p]["exp_avg"], saved) for p, saved in states.values())
            after = _count(prepared, inputs)
            assert sum(after[s] for s in teacher_shapes) == 0
            assert sum(after.values()) == sum(before.values()) - 2  # the students and the head still run
    roles = {n.meta.get("tunecomp", {}).get("role") for n in prepared.graph.nodes}
    assert "teacher" not in roles and "blend" not in roles
    assert not any(isinstance(m, Blend) for m in prepared.modules())
    assert not set(teacher_weights) & {name for name, _ in prepared.named_parameters()}
    assert all("blend" not in roles for roles in student_nodes(prepared).values())
    # AdamW kept its state for every remaining parameter through the removal.
    live = {id(p) for p in prepared.parameters()}
    assert {id(p) for p in optimizer.state} == set(states) and set(states) <= live


def test_teacher_memory_is_released() -> None:
    task = digits_task()
    prepared = tunecomp_fx.prepare(fresh("mlp"), task.example_inputs(), 0.5, rank_slack=0.25)
    before = sum(p.numel() for p in prepared.parameters())
    hook = StepHook(prepared, steps=4, blend_steps=2)
    hook.step()
    hook.step()
    after = sum(p.numel() for p in prepared.parameters())
    assert before - after == 64 * 256 + 256 + 256 * 256 + 256
