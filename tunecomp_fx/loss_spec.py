"""--loss and --metric: what a command-line joint run minimizes and what it evaluates.

A spec is a name (LOSSES; for --metric also `accuracy`) or `module.path:function`, a function
(outputs, targets) -> a scalar tensor, the way JointTrainer's loss_fn and metric_fn are called.
Cross-entropy is evaluated by accuracy; any other loss by itself (lower is better) unless --metric says
otherwise."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F

from tunecomp_fx.errors import InputError
from tunecomp_fx.model_spec import close_names, import_object
from tunecomp_fx.train import accuracy

CROSS_ENTROPY = "cross_entropy"
LOSSES: dict[str, Callable[..., Any]] = {CROSS_ENTROPY: F.cross_entropy, "mse": F.mse_loss, "l1": F.l1_loss}
ELEMENTWISE = ("mse", "l1")  # they broadcast targets of another shape, silently, so the shapes must match
METRICS: dict[str, Callable[..., Any]] = {"accuracy": accuracy, **LOSSES}
LOSS_HELP = f"{', '.join(LOSSES)} (default {CROSS_ENTROPY}), or module.path:function taking (outputs, targets)"


@dataclass(frozen=True)
class Objective:
    loss: str
    loss_fn: Callable[..., Any]
    metric: str
    metric_fn: Callable[..., Any]

    @property
    def classifies(self) -> bool:
        """Cross-entropy: the model gives (batch, classes) logits and the targets are classes."""
        return self.loss == CROSS_ENTROPY

    @property
    def elementwise(self) -> bool:
        """The loss compares outputs and targets element by element: they must have one shape."""
        return self.loss in ELEMENTWISE


def _canonical(spec: str) -> str:
    """A name as LOSSES spells it ("Cross-Entropy" -> "cross_entropy"); a module.path:function as given."""
    return spec if ":" in spec else spec.replace("-", "_").lower()


def _function(spec: str, role: str, names: dict[str, Callable[..., Any]]) -> Callable[..., Any]:
    if ":" not in spec:
        if spec not in names:
            raise InputError(f"unknown {role} {spec!r} (named: {', '.join(names)}; or a module.path:function){close_names(spec, list(names))}")
        return names[spec]
    function = import_object(spec, f"{role} spec", "function")
    if not callable(function):
        raise InputError(f"{role} spec {spec} names a {type(function).__name__}; it must name a function (outputs, targets) -> tensor")
    return function


def objective(loss: str | None, metric: str | None) -> Objective:
    """The loss and metric the specs name (None: cross-entropy, and the loss's usual metric)."""
    loss = _canonical(loss or CROSS_ENTROPY)
    loss_fn = _function(loss, "loss", LOSSES)
    metric = _canonical(metric) if metric is not None else "accuracy" if loss == CROSS_ENTROPY else loss
    return Objective(loss, loss_fn, metric, loss_fn if metric == loss else _function(metric, "metric", METRICS))
