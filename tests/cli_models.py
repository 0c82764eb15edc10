"""Small models for the command-line tests, importable as `cli_models:NAME` specs."""

from __future__ import annotations

import torch
from torch import nn


class TwoLayer(nn.Module):
    """Linear(64 -> 96) -> ReLU -> Linear(96 -> 10): two sites, both factorized at ratio 0.5."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 96)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(96, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def two_layer() -> tuple[nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    return TwoLayer(), (torch.randn(4, 64),)


def two_layer_without_inputs() -> nn.Module:
    torch.manual_seed(0)
    return TwoLayer()
