"""Example inputs are a tuple of positional tensors or a dict of keyword tensors; outputs may be a
tensor, a sequence, a dict or a Hugging Face ModelOutput. One place knows how to call and flatten."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Union

import torch
from torch import nn

from tunecomp_fx.errors import InputError

Inputs = Union[tuple[Any, ...], Mapping[str, Any]]


def normalize_inputs(example_inputs: Any, what: str = "example_inputs") -> Inputs:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, Mapping):
        return dict(example_inputs)
    if isinstance(example_inputs, (list, tuple)):
        return tuple(example_inputs)
    raise InputError(
        f"{what} must be a tensor, a tuple of positional tensors or a dict of keyword tensors; "
        f"got {type(example_inputs).__name__}"
    )


def call_model(model: nn.Module, inputs: Inputs) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(*inputs)


def flatten_outputs(outputs: Any) -> list[torch.Tensor]:
    """Every tensor in an output structure, in a stable order."""
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if isinstance(outputs, Mapping):
        return [t for key in outputs for t in flatten_outputs(outputs[key])]
    if hasattr(outputs, "to_tuple"):  # Hugging Face ModelOutput
        return [t for value in outputs.to_tuple() for t in flatten_outputs(value)]
    if isinstance(outputs, (list, tuple)):
        return [t for value in outputs for t in flatten_outputs(value)]
    return []


def named_tensors(inputs: Inputs) -> list[tuple[str, torch.Tensor]]:
    """The tensor inputs with names for messages: '#0', '#1', ... positionally, 'key' by keyword."""
    items = [(repr(k), v) for k, v in inputs.items()] if isinstance(inputs, Mapping) else [(f"#{i}", v) for i, v in enumerate(inputs)]
    return [(name, value) for name, value in items if isinstance(value, torch.Tensor)]


def describe_inputs(inputs: Inputs) -> str:
    """E.g. "inputs #0: torch.float32 [4, 64] on cpu", for messages about inputs that do not fit."""
    described = [f"{name}: {t.dtype} {list(t.shape)} on {t.device}" for name, t in named_tensors(inputs)]
    return "inputs " + ", ".join(described) if described else "no tensor inputs"
