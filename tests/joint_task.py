"""A small shifted-task setup for the joint-training tests: a model "pretrained" on scikit-learn's
8x8 digits 0-4, then fine-tuned (or jointly fine-tuned and compressed) on digits 5-9; the
single-thread fixture, and training data cut off as by Ctrl-C (`Interrupted`). Fixtures, not tests:
the test_*.py modules import them and assert on what training makes of them; pytest does not collect
this module."""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tunecomp_fx import TrainingConfig
from tunecomp_fx.finetune import finetune


@dataclass(frozen=True)
class Task:
    pretrain: tuple[torch.Tensor, torch.Tensor]
    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]

    def loader(self, batch_size: int = 64, seed: int | None = None) -> DataLoader:
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        return DataLoader(TensorDataset(*self.train), batch_size=batch_size, shuffle=True, generator=generator)

    def example_inputs(self) -> tuple[torch.Tensor]:
        return (self.train[0][:256],)


@functools.cache
def digits_task() -> Task:
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    old, new = y < 5, y >= 5
    x_new, y_new = x[new], y[new]
    cut = int(0.6 * len(x_new))
    return Task((x[old], y[old]), (x_new[:cut], y_new[:cut]), (x_new[cut:], y_new[cut:]))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))
        self.norm2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.norm1(x)
        q, k, v = (f(h).reshape(b, t, self.heads, d // self.heads).transpose(1, 2) for f in (self.q, self.k, self.v))
        attention = torch.softmax(q @ k.transpose(-2, -1) / (d // self.heads) ** 0.5, dim=-1)
        x = x + self.drop(self.o((attention @ v).transpose(1, 2).reshape(b, t, d)))
        return x + self.drop(self.fc2(F.gelu(self.fc1(self.norm2(x)))))


class TinyTransformer(nn.Module):
    """The 8 rows of a digit as 8 tokens of 8 pixels."""

    def __init__(self, width: int = 64, depth: int = 2, heads: int = 4, dropout: float = 0.1) -> None:
        super().__init__()
        self.embed = nn.Linear(8, width)
        self.position = nn.Parameter(torch.zeros(1, 8, width))
        self.blocks = nn.Sequential(*(Block(width, heads, dropout) for _ in range(depth)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x.reshape(-1, 8, 8)) + self.position
        return self.head(self.norm(self.blocks(tokens)).mean(dim=1))


@functools.cache
def pretrained(kind: str) -> nn.Module:
    task = digits_task()
    torch.manual_seed(0)
    model = mlp() if kind == "mlp" else TinyTransformer()
    loader = DataLoader(TensorDataset(*task.pretrain), batch_size=64, shuffle=True)
    return finetune(model, loader, TrainingConfig(steps=300, lr=2e-3, warmup=0, max_grad_norm=None), progress=False)


def endless(loader: DataLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    while True:
        yield from loader


def accuracy(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    model.eval()
    with torch.no_grad():
        return (model(data[0]).argmax(dim=-1) == data[1]).float().mean().item()


def fresh(kind: str) -> nn.Module:
    return copy.deepcopy(pretrained(kind))


@pytest.fixture
def single_thread() -> Iterator[None]:
    """These models are tiny: one thread is faster, and immune to OpenMP spin-waits when the
    machine's cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Interrupted:
    """The training data, cut off (as by Ctrl-C) after `after` batches (over all its passes)."""

    def __init__(self, loader: DataLoader | list[Any], after: int) -> None:
        self.loader, self.after, self.count = loader, after, 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            if self.count == self.after:
                raise KeyboardInterrupt
            self.count += 1
            yield batch
