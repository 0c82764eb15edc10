"""Progress bars for the long steps (training, calibration, SVDs, ONNX export, latency runs).

A bar shows when its caller asks for one and stderr is a terminal (in a notebook, always): logs,
pipes and CI output get no carriage-return noise. Library calls take `progress=False` by default, except
the training loops (`JointTrainer`, `finetune`), whose bar is their only sign of life."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress_bar(iterable: Iterable[T] | None = None, *, enabled: bool, **options: Any) -> tqdm:
    """A tqdm bar (tqdm's own options: total, desc, leave, ...), silent unless `enabled` and on a terminal."""
    # disable=None is tqdm's terminal test; its notebook bar treats None as enabled.
    return tqdm(iterable, disable=None if enabled else True, **options)
