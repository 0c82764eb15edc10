"""Example inputs are a tuple of positional tensors or a dict of keyword tensors; outputs may be a
tensor, a sequence, a dict or a Hugging Face ModelOutput. One place knows how to call and flatten."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Union

import torch
from torch import nn

from tunecomp_fx.errors import InputError

Inputs = Union[tuple[Any, ...], Mapping[str, Any]]


def normalize_inputs(example_inputs: Any) -> Inputs:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, Mapping):
        return dict(example_inputs)
    if isinstance(example_inputs, (list, tuple)):
        return tuple(example_inputs)
    raise InputError(
        f"example_inputs must be a tensor, a tuple of positional tensors or a dict of keyword tensors; "
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


def tensors_of(inputs: Inputs) -> list[torch.Tensor]:
    values = inputs.values() if isinstance(inputs, Mapping) else inputs
    return [v for v in values if isinstance(v, torch.Tensor)]
