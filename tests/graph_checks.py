"""Checks shared by the structured-pruning tests."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import torch

import tunecomp_fx
from tunecomp_fx.inputs import flatten_outputs


def finalize_from_student_path(prepared: torch.fx.GraphModule, *inputs: torch.Tensor, **named: torch.Tensor) -> tuple[torch.fx.GraphModule, Any]:
    """Blend to the students alone, record what they compute on the inputs, and finalize; the compact
    model must compute the same (1e-5: finalize re-associates products)."""
    tunecomp_fx.set_blend(prepared, 0.0)
    with torch.no_grad():
        student_path = prepared(*inputs, **named)
    compact = tunecomp_fx.finalize(prepared)
    with torch.no_grad():
        torch.testing.assert_close(compact(*inputs, **named), student_path, rtol=1e-5, atol=1e-5)
    return compact, student_path


def full_rank_student_path_finalizes(prepared: torch.fx.GraphModule, reference: torch.nn.Module, x: torch.Tensor, onnx_path: Any) -> torch.fx.GraphModule:
    """Students prepared at full rank: the student path alone computes what `reference` does (the model
    with the pruned neurons silenced, 1e-5); pruned of its rank slack it finalizes to what it then
    computes (`finalize_from_student_path`) and exports to ONNX Runtime within 1e-4. Returns the compact model."""
    from tunecomp_fx.export import to_onnx

    tunecomp_fx.set_blend(prepared, 0.0)
    with torch.no_grad():
        torch.testing.assert_close(prepared(x), reference(x), rtol=1e-5, atol=1e-5)
    tunecomp_fx.prune_slack(prepared)
    compact, _ = finalize_from_student_path(prepared, x)
    result = to_onnx(compact, (x,), onnx_path)
    assert all(error < 1e-4 for error in result.max_errors.values())
    return compact


def tiny_hugging_face(model_type: str, **options: Any) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A 2-layer Hugging Face model of `model_type` (width 64, 4 heads, 128 hidden neurons, `options`
    beside) at random initialization, in eval mode, and a batch of 2 texts of 12 tokens."""
    import pytest

    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(
        model_type, num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128, vocab_size=100,
        max_position_embeddings=64, use_cache=False, pad_token_id=0, bos_token_id=1, eos_token_id=2, **options,
    )  # fmt: skip
    return transformers.AutoModel.from_config(config).eval(), {"input_ids": torch.randint(3, 100, (2, 12))}


def first(outputs: Any) -> torch.Tensor:
    """A model output's first tensor (a Hugging Face model's last hidden state), as a tuple, a model
    output or the dict a symbolic trace returns."""
    return flatten_outputs(outputs)[0]


def hugging_face_prunes_exactly(prepared: torch.fx.GraphModule, model: torch.nn.Module, inputs: dict[str, torch.Tensor], onnx_path: Any) -> torch.fx.GraphModule:
    """A Hugging Face model prepared with students at full rank: the teacher path is the model, the
    student path the model with the pruned neurons (heads) alone silenced (1e-5); pruned of its rank
    slack it finalizes and exports to ONNX Runtime (1e-4). Returns the compact model."""
    from tunecomp_fx.export import to_onnx

    with torch.no_grad():
        torch.testing.assert_close(first(prepared(**inputs)), first(model(**inputs)), rtol=1e-5, atol=1e-5)  # alpha = 1: the teacher alone
    tunecomp_fx.set_blend(prepared, 0.0)
    with torch.no_grad():
        reference = first(silenced(model, prepared.meta["tunecomp"].context.hidden_widths)(**inputs))
        torch.testing.assert_close(first(prepared(**inputs)), reference, rtol=1e-5, atol=1e-5)
    tunecomp_fx.prune_slack(prepared)
    compact, _ = finalize_from_student_path(prepared, **inputs)
    result = to_onnx(compact, inputs, onnx_path)
    assert all(error < 1e-4 for error in result.max_errors.values())
    return compact


def train_with_hook(
    prepared: torch.fx.GraphModule, data: list[tuple[torch.Tensor, torch.Tensor]], loss_fn: Callable[[Any, Any], torch.Tensor], steps: int, blend_steps: int
) -> tunecomp_fx.StepHook:
    """`steps` AdamW steps (lr 1e-3) on `data`'s (inputs, targets) batches in turn, loss_fn plus the
    distillation loss, with StepHook moving the schedules; returns the hook."""
    hook = tunecomp_fx.StepHook(prepared, steps=steps, blend_steps=blend_steps)
    optimizer = torch.optim.AdamW([p for p in prepared.parameters() if p.requires_grad], lr=1e-3)
    for step in range(steps):
        inputs, targets = data[step % len(data)]
        (loss_fn(prepared(inputs), targets) + hook.distill_loss()).backward()
        optimizer.step()
        optimizer.zero_grad()
        hook.step()
    return hook


def silenced(model: torch.nn.Module, widths: Iterable[Any]) -> torch.nn.Module:
    """`model` with the pruned neurons' (heads') share of each width's down site zeroed: what a student
    path at full rank computes, the pruned ones alone taken out."""
    copied = copy.deepcopy(model)
    with torch.no_grad():
        for width in widths:
            copied.get_submodule(width.down).weight[:, sorted(set(range(width.width)) - set(width.kept))] = 0.0
    return copied
