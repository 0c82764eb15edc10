"""Small models for the command-line tests, importable as `cli_models:NAME` specs."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn


class TwoLayer(nn.Module):
    """Linear(64 -> 96) -> ReLU -> Linear(96 -> classes): two sites, both factorized at ratio 0.5."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 96)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(96, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def two_layer(classes: int = 10) -> tuple[nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    return TwoLayer(classes), (torch.randn(4, 64),)


def two_layer_without_inputs() -> nn.Module:
    torch.manual_seed(0)
    return TwoLayer()


def digits_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A user's loader for --data: scikit-learn's digits as 8 batches of 32 flattened images and labels."""
    from sklearn.datasets import load_digits

    pixels, labels = load_digits(return_X_y=True)
    x = torch.tensor(pixels[:256], dtype=torch.float32) / 16.0
    y = torch.tensor(labels[:256])
    return list(zip(x.split(32), y.split(32)))


def digits_stream() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """A one-shot generator: training needs data it can iterate once per epoch, so --data refuses it."""
    yield from digits_batches()


def unlabelled_batches() -> list[torch.Tensor]:
    """Batches without targets: --data needs (inputs, targets) pairs."""
    return [x for x, _ in digits_batches()]


class Regressor(nn.Module):
    """Linear(8 -> 32) -> ReLU -> Linear(32 -> 1): a model of one number, trained with --loss mse."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 32)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def regressor() -> tuple[nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    return Regressor(), (torch.randn(4, 8),)


def sum_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A regression loader: targets are the sum of the eight inputs, shaped (batch, 1) like the outputs."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=generator)
    return list(zip(x.split(32), x.sum(dim=1, keepdim=True).split(32)))


def per_example_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """A loss the user forgot to reduce: --loss refuses it before training."""
    return (outputs - targets).pow(2).flatten()


def within_half(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """A user's metric: the share of predictions within 0.5 of the target."""
    return ((outputs - targets).abs() < 0.5).float().mean()


NOT_A_FUNCTION = 3
