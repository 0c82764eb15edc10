"""Plain fine-tuning and evaluation, with the joint driver's recipe (the sequential baselines).

`finetune` trains every parameter of an uncompressed model, or of a compact GraphModule, with the
same optimizer (AdamW, no decay on biases and norms), learning-rate schedule, clipping and seeding
as `JointTrainer`, so that a baseline differs from the joint run only in what it does to the model.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tunecomp_fx.errors import InputError
from tunecomp_fx.inputs import call_model
from tunecomp_fx.mode import set_training_mode
from tunecomp_fx.progress import progress_bar
from tunecomp_fx.batches import DataCursor, split_batch
from tunecomp_fx.train import (
    TrainingConfig,
    accuracy,
    autocast,
    build_optimizer,
    checked_loss,
    prediction,
    set_learning_rate,
)


def finetune(
    model: nn.Module,
    data: Iterable[Any],
    config: TrainingConfig,
    *,
    loss_fn: Callable[[Any, Any], torch.Tensor] = F.cross_entropy,
    progress: bool = True,
    desc: str = "fine-tune",
) -> nn.Module:
    """Train all of `model` in place for `config.steps` optimizer steps on (inputs, targets) batches;
    returns it in eval mode. `progress` shows a bar over the steps (on a terminal, as `JointTrainer`'s)."""
    if config.steps is None:
        raise InputError("plain fine-tuning needs config.steps")
    device = next(model.parameters()).device
    schedules = dataclasses.replace(config, blend_steps=0).schedules(config.steps)  # no blend here: the lr schedule only
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    model.requires_grad_(True)
    optimizer = build_optimizer(model, config)
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    cursor = DataCursor(data)
    set_training_mode(model, True)
    for step in progress_bar(range(config.steps), enabled=progress, desc=desc):
        set_learning_rate(optimizer, config.lr * schedules.lr_factor(step))
        for _ in range(config.accumulate):
            inputs, targets = split_batch(cursor.next(), device)
            with autocast(config, device):
                loss = checked_loss(loss_fn(prediction(call_model(model, inputs)), targets), f"at step {step + 1}")
            (loss / config.accumulate).backward()
        if config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    set_training_mode(model, False)
    return model


def evaluate(model: nn.Module, data: Iterable[Any], metric_fn: Callable[[Any, Any], Any] = accuracy) -> float:
    """The batch-size weighted mean of `metric_fn` over `data`, in eval mode without gradients."""
    device = next(model.parameters()).device
    was_training = model.training
    set_training_mode(model, False)
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for batch in data:
                inputs, targets = split_batch(batch, device)
                total += float(metric_fn(prediction(call_model(model, inputs)), targets)) * len(targets)
                count += len(targets)
    finally:
        set_training_mode(model, was_training)
    if count == 0:
        raise InputError("the evaluation data yielded no batches")
    return total / count
