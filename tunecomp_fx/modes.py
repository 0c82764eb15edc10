"""Train/eval mode of any module, GraphModules from torch.export included."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for every submodule, restored exactly afterwards.

    Sets the flags directly because GraphModules from torch.export refuse `.train()`/`.eval()`;
    their dropout mode was fixed when they were captured.
    """
    modes = {module: module.training for module in model.modules()}
    for module in modes:
        module.training = False
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training
