"""The joint fine-tuning and compression driver (DESIGN.md section 2).

- `TrainingConfig`: the optimization recipe, one frozen dataclass saved in every checkpoint.
- `StepHook`: drives a prepared model through the schedules; users with their own loop add
  `hook.distill_loss()` to their loss and call `hook.step()` after `optimizer.step()`. Each step
  sets the blends, shrinks the rank masks and, once alpha reaches 0, takes the teachers out of
  the graph (fold_blends + eliminate_dead_code on the live model).
- `JointTrainer`: the loop (AdamW with warm-up and decay, gradient accumulation, bf16 autocast on
  CUDA, periodic evaluation, checkpoints with exact resume (`checkpoints`, over a `batches.DataCursor`),
  NaN/inf guard, DDP under torchrun).
- `joint_compress`: prepare -> JointTrainer -> finalize, what `compress(..., data=...)` runs.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import math
import os
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.utils.hooks import RemovableHandle

from tunecomp_fx import distributed
from tunecomp_fx.api import finalize, prepare, prepared_state
from tunecomp_fx.config import CompressionConfig, reject_unknown_keys
from tunecomp_fx.batches import DataCursor, batch_size, check_training_data, split_batch, to_device
from tunecomp_fx.checkpoints import (
    check_checkpoint_dir,
    fingerprint,
    read_checkpoint,
    rng_state,
    set_rng_state,
    write_checkpoint,
)
from tunecomp_fx.errors import ConfigError, InputError, TrainingError
from tunecomp_fx.inputs import Inputs, call_model
from tunecomp_fx.mode import set_training_mode
from tunecomp_fx.passes.eliminate_dead_code import EliminateDeadCode
from tunecomp_fx.passes.fold_blends import FoldBlends
from tunecomp_fx.pipeline import run_passes
from tunecomp_fx.progress import progress_bar
from tunecomp_fx.pruning import SELECTIONS, RankPruner
from tunecomp_fx.schedules import BLENDS, DEFAULT_MIX, LR_DECAYS, MIXES, Schedules, steps_of
from tunecomp_fx.sites import Blend, set_blend, students_alone, teacher_parameters

DEFAULT_RANK_SLACK = 0.5  # extra rank students start with when trained, pruned away by the blend's end (README: 0.5 won at 0.7)
LONGEST_DEFAULT_BLEND = 0.5  # the default blend lasts the ratio's fraction of the run, at most this (README: "Evidence for the defaults")
UNION_CALIBRATION_BATCHES = 8  # training batches method="union" calibrates on when given no calib
TRAINING_KEY = "tunecomp_training"  # compact GraphModule.meta key: training config and history


def _lr_scale_pairs(lr_scale: Any) -> tuple[tuple[str, float], ...]:
    """lr_scale as (pattern, factor) pairs, from pairs or a mapping (a saved config's lists too)."""
    items = lr_scale.items() if isinstance(lr_scale, Mapping) else lr_scale
    usage = 'lr_scale takes (pattern, factor) pairs or a {pattern: factor} mapping, e.g. {"lowrank.words.*": 0.1}'
    if isinstance(items, str):
        raise ConfigError(f"{usage}; got the string {items!r}")
    try:
        pairs = [tuple(item) for item in items]
    except TypeError:
        raise ConfigError(f"{usage}; got {lr_scale!r}") from None
    for pair in pairs:
        if len(pair) != 2 or not isinstance(pair[0], str) or not pair[0]:
            raise ConfigError(f"{usage}; got the item {pair!r}")
        factor = pair[1]
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor < math.inf:
            raise ConfigError(f"lr_scale factors must be finite numbers > 0; got {factor!r} for {pair[0]!r}")
    return tuple((pattern, float(factor)) for pattern, factor in pairs)


@dataclass(frozen=True)
class TrainingConfig:
    """How the joint run optimizes (everything that decides its result).

    steps / epochs: length of the run in optimizer steps, or in passes over the data (one of them).
    lr, weight_decay: AdamW (no decay on biases and norms); warmup: steps (int) or fraction of the
        run (float); lr_decay: "cosine_after_blend" (the default: the peak held through the blend,
        then a cosine over the steps the students train alone, so the compact model gets a decay of
        its own; at lr 1e-4 it ties or beats the cosine in both MiniLM profiles, at 2e-4 on batches
        of 16 it loses, benchmarks/README.md), or "cosine", "linear" or "constant" over the whole run;
        lr_hold: until when the peak is held before the decay starts, a step (int) or a fraction of
        the run (float), counted from the start (the warm-up inside it); None (the default): the
        end of the blend under "cosine_after_blend", no hold otherwise. It applies to `finetune`
        too, which has no blend, so a fine-tune can get the default joint run's learning rate.
    lr_scale: (pattern, factor) pairs: a trainable parameter whose name matches the fnmatch pattern
        (the first that does) trains at factor x the learning rate, e.g. (("lowrank.words.*", 0.1),)
        for an embedding table's factors (names as `prepare` gives them: `lowrank.<site>.up.weight`;
        a mapping {pattern: factor} is taken too). A pattern that matches no trainable parameter, or
        only ones an earlier pattern takes, is an error.
    accumulate: micro-batches per optimizer step; max_grad_norm: clipping (None: no clipping).
    blend: "sin" (alpha = 1 - sin(pi t / 2T)), "linear" or "cosine"; blend_steps: T, in steps (int)
        or as a fraction of the run (float); None (the default) takes the fraction the compression
        removes, at most half the run (`for_ratio`): milder compression hands over sooner. The
        teachers leave the compute at step T.
    prune_steps: how long the students take to shrink from their slack rank (and widths) to the
        budget, in steps (int) or as a fraction of the run (float); None (the default): the blend's
        length, so they reach the budget as the teachers leave. Longer: they go on shrinking while
        they fine-tune alone.
    blend_mix: the student's weight beta in the blend, "convex" (1 - alpha, the default: keeps a
        site's output at its scale while the student approximates it) or "power" (sqrt(1 - alpha^2)).
    distill_weight: initial weight of the layer-wise feature loss, which decays with alpha.
    student_loss: initial weight of a second task loss, on the output of the students alone (every
        blend at the student), which decays with alpha: the students learn the task from the start
        as they do after the blend, at the cost of a second forward per step during the blend (0: off;
        1 did not pass compress -> fine-tune at 0.5 in the MiniLM benchmark, benchmarks/README.md).
    logit_distill, temperature: weight of a KL loss against the original model's outputs (0: off).
    rank_selection: "global" (one threshold over per-site normalized importances, so ranks move to
        the sites that use them; the default, better on the digits transformer test; embedding
        tables, which save no MACs, keep their own schedule) or "site" (each student shrinks to the
        rank allocation gave it).
    hardshrink: element-wise hard-shrink of the factors, in units of each factor's RMS, rising
        with the blend (0: off).
    train_teachers: the teachers' weights train too until they leave (their task gradient scaled
        by alpha), so the students distill from a model that fine-tunes; False (the default, as in
        DESIGN.md): the pretrained teachers stay frozen.
    seed: seeds torch's RNG at the start of a fresh run (shuffling, dropout).
    bf16: autocast to bfloat16 (None: on CUDA only).
    """

    steps: int | None = None
    epochs: float | None = None
    lr: float = 1e-4
    lr_scale: tuple[tuple[str, float], ...] = ()
    weight_decay: float = 0.01
    warmup: int | float = 0.05
    lr_decay: str = "cosine_after_blend"
    lr_hold: int | float | None = None
    accumulate: int = 1
    max_grad_norm: float | None = 1.0
    blend: str = "sin"
    blend_steps: int | float | None = None
    prune_steps: int | float | None = None
    blend_mix: str = DEFAULT_MIX
    distill_weight: float = 1.0
    student_loss: float = 0.0
    logit_distill: float = 0.0
    temperature: float = 2.0
    rank_selection: str = "global"
    hardshrink: float = 0.0
    train_teachers: bool = False
    seed: int = 0
    bf16: bool | None = None

    def __post_init__(self) -> None:
        if self.steps is not None and self.epochs is not None:
            raise ConfigError(f"give steps or epochs, not both (steps={self.steps}, epochs={self.epochs})")
        if self.steps is not None and (isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1):
            raise ConfigError(f"steps must be a positive int; got {self.steps!r}")
        if self.epochs is not None and not self.epochs > 0:
            raise ConfigError(f"epochs must be > 0; got {self.epochs!r}")
        for name in ("warmup", "lr_hold", "blend_steps", "prune_steps"):
            value = getattr(self, name)
            if value is None and name != "warmup":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"{name} must be a step count (int) or a fraction of the run (float); got {value!r}")
            if isinstance(value, float) and value > 1:
                raise ConfigError(f"{name}={value} as a float is a fraction of the run and must be <= 1")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0; got {self.lr}")
        object.__setattr__(self, "lr_scale", _lr_scale_pairs(self.lr_scale))
        if self.accumulate < 1:
            raise ConfigError(f"accumulate must be >= 1; got {self.accumulate}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ConfigError(f"max_grad_norm must be > 0 or None; got {self.max_grad_norm}")
        for name in ("weight_decay", "distill_weight", "student_loss", "logit_distill", "hardshrink"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name} must be >= 0; got {getattr(self, name)}")
        if not isinstance(self.train_teachers, bool):
            raise ConfigError(f"train_teachers must be True or False; got {self.train_teachers!r}")
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0; got {self.temperature}")
        for name, choices in (("blend", BLENDS), ("blend_mix", MIXES), ("lr_decay", LR_DECAYS), ("rank_selection", SELECTIONS)):
            if getattr(self, name) not in choices:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not one of {', '.join(choices)}")

    def for_ratio(self, ratio: float) -> TrainingConfig:
        """This config with the default blend length set for a run compressing by `ratio`."""
        if self.blend_steps is not None:
            return self
        return dataclasses.replace(self, blend_steps=min(float(ratio), LONGEST_DEFAULT_BLEND))

    def schedules(self, total: int) -> Schedules:
        if self.blend_steps is None:
            raise ConfigError("blend_steps=None is set by the compression ratio: call for_ratio(ratio) first")
        blend_steps = steps_of(self.blend_steps, total)
        prune_steps = blend_steps if self.prune_steps is None else steps_of(self.prune_steps, total)
        warmup_steps = steps_of(self.warmup, total)
        if self.lr_hold is not None:
            hold_steps = steps_of(self.lr_hold, total)
        else:
            hold_steps = blend_steps if self.lr_decay == "cosine_after_blend" else 0
        if blend_steps > total:
            raise ConfigError(
                f"blend_steps={self.blend_steps} ends at step {blend_steps}, after the run's {total} steps; "
                "the teachers must be gone by the end (use a fraction <= 1 or fewer steps)"
            )
        if prune_steps > total:
            raise ConfigError(
                f"prune_steps={self.prune_steps} ends at step {prune_steps}, after the run's {total} steps; "
                "the students must reach the budget by the end (use a fraction <= 1 or fewer steps)"
            )
        if warmup_steps >= total:
            raise ConfigError(f"warmup={self.warmup} covers the whole run of {total} steps")
        if hold_steps > total:
            raise ConfigError(
                f"lr_hold={self.lr_hold} ends at step {hold_steps}, after the run's {total} steps "
                "(use a fraction <= 1 or fewer steps; lr_decay='constant' never decays)"
            )
        return Schedules(
            total, self.blend, blend_steps, prune_steps, self.blend_mix, warmup_steps, hold_steps, self.lr_decay,
            self.distill_weight,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainingConfig:
        reject_unknown_keys(cls, data, "training options")
        # saved before blend_mix existed: those runs blended with the power mix
        return cls(**{"blend_mix": "power", **data})


def training_config(config: TrainingConfig | None, options: Mapping[str, Any]) -> TrainingConfig:
    """`config` with `options` (TrainingConfig fields) applied."""
    try:
        return dataclasses.replace(config or TrainingConfig(), **options)
    except TypeError as error:
        raise ConfigError(f"{error}; see tunecomp_fx.TrainingConfig for the training options") from error


def prediction(outputs: Any) -> Any:
    """What losses and metrics see: the logits of a Hugging Face output, else the outputs."""
    if hasattr(outputs, "logits"):
        return outputs.logits
    if isinstance(outputs, Mapping) and "logits" in outputs:
        return outputs["logits"]
    return outputs


def accuracy(outputs: Any, targets: torch.Tensor) -> torch.Tensor:
    return (outputs.argmax(dim=-1) == targets).float().mean()


class StepHook:
    """Advances a prepared model through the joint schedules, one optimizer step at a time.

        hook = StepHook(prepared, steps=1000)
        for inputs, targets in loader:
            loss = F.cross_entropy(prepared(inputs), targets) + hook.distill_loss()
            loss.backward(); optimizer.step(); optimizer.zero_grad()
            hook.step()

    Put the model in train mode first with tunecomp_fx.mode.set_training_mode(prepared, True)
    (it also handles graphs captured by torch.export), and build the optimizer over the trainable
    parameters only, after making the hook (the teachers are frozen unless train_teachers=True, and
    leave the model after the blend)."""

    def __init__(self, prepared: fx.GraphModule, config: TrainingConfig | None = None, *, total_steps: int | None = None, **options: Any) -> None:
        self.context = prepared_state(prepared).context
        self.config = training_config(config, options).for_ratio(self.context.config.ratio)
        total = total_steps if total_steps is not None else self.config.steps
        if total is None:
            raise ConfigError("the hook needs the run's length: pass steps= (or total_steps=)")
        self.schedules = self.config.schedules(total)
        self.model = prepared
        if self.config.hardshrink > 0 and self.context.config.method == "union":
            raise ConfigError("hardshrink would shrink the fixed bases of method='union'; use hardshrink=0")
        self.pruner = RankPruner(prepared, self.context, self.config.rank_selection)
        if self.config.train_teachers:
            for parameter in teacher_parameters(prepared, self.context.factorized_sites()):
                parameter.requires_grad_(True)
        self.step_count = 0
        self.teacher_removed = False
        self._site_losses: list[torch.Tensor] = []
        self._blend_handles = [prepared.register_forward_pre_hook(self._clear)]
        self._blend_handles += [m.register_forward_hook(self._collect) for m in prepared.modules() if isinstance(m, Blend)]
        self._width_handles = self.pruner.track_widths()
        self._apply()

    @property
    def alpha(self) -> float:
        return self.schedules.alpha(self.step_count)

    def distill_loss(self) -> torch.Tensor | float:
        """Weighted layer-wise feature loss of the last forward: the mean over sites of
        ||student - teacher||^2 / ||teacher||^2 (0 once the weight has decayed)."""
        losses, self._site_losses = self._site_losses, []
        if not losses:
            return 0.0
        return self.schedules.distill(self.step_count) * torch.stack(losses).mean()

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step_count, "pruner": self.pruner.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the step and the graph structure (teachers removed after the blend). Call it
        before loading the model's state dict, which holds the masks and blend values."""
        self.step_count = int(state["step"])
        self.pruner.load_state_dict(state.get("pruner", {}))  # checkpoints before width_slack have none
        if not self.teacher_removed:
            set_blend(self.model, self.alpha, self.schedules.mix)
            if self.alpha == 0.0:
                self._remove_teacher()
        if self.step_count >= self.schedules.prune_steps:
            self._remove(self._width_handles)

    def close(self) -> None:
        self._remove(self._blend_handles)
        self._remove(self._width_handles)

    @staticmethod
    def _remove(handles: list[RemovableHandle]) -> None:
        for handle in handles:
            handle.remove()
        handles.clear()

    def _clear(self, module: nn.Module, args: Any) -> None:
        self._site_losses = []

    def _collect(self, module: nn.Module, args: tuple[torch.Tensor, torch.Tensor], output: torch.Tensor) -> None:
        if not torch.is_grad_enabled() or module.student_alone or self.schedules.distill(self.step_count) == 0.0:
            return
        teacher, student = args
        target = teacher.detach().float()
        error = torch.linalg.vector_norm(student.float() - target).square()
        self._site_losses.append(error / torch.linalg.vector_norm(target).square().clamp_min(1e-12))

    def _apply(self) -> None:
        step, schedules = self.step_count, self.schedules
        alpha = schedules.alpha(step)
        if not self.teacher_removed:
            set_blend(self.model, alpha, schedules.mix)
        if step <= schedules.prune_steps:
            self.pruner.update(schedules.pruning(step))
            distributed.broadcast_(self.pruner.masks())  # rank 0 decides
        if step >= schedules.prune_steps:
            self._remove(self._width_handles)  # the widths are final: stop tracking what they read
        self.pruner.shrink_elements(self.config.hardshrink * schedules.progress(step))
        if alpha == 0.0 and not self.teacher_removed:
            self._remove_teacher()

    def _remove_teacher(self) -> None:
        """At alpha = 0 the teachers contribute nothing: fold the blends into the students and drop
        the teacher nodes and weights, so no teacher matmul runs and no teacher memory is held."""
        model = run_passes(self.model, [FoldBlends(), EliminateDeadCode()], self.context)
        assert model is self.model, "fold_blends and eliminate_dead_code rewrite the model in place"
        self.teacher_removed = True
        self._remove(self._blend_handles)  # no teacher, no feature loss


def checked_loss(loss: Any, where: str) -> torch.Tensor:
    """`loss` (what loss_fn returned `where`) if it is a scalar tensor; else the error saying what it is."""
    if isinstance(loss, torch.Tensor) and loss.dim() == 0:
        return loss
    got = f"a tensor of shape {list(loss.shape)}" if isinstance(loss, torch.Tensor) else f"a {type(loss).__name__}"
    raise TrainingError(
        f"loss_fn returned {got} {where}; it must return a scalar (0-dim) tensor to differentiate. Reduce it over the "
        "batch, e.g. with .mean() or reduction='mean'"
    )


def _retain_live_parameters(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """Drop from the optimizer the parameters a graph change removed from the model (unused
    trainable weights that eliminate_dead_code deleted), keeping every other state untouched."""
    live = {id(p) for p in model.parameters()}
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            if id(parameter) not in live:
                optimizer.state.pop(parameter, None)
        group["params"] = [p for p in group["params"] if id(p) in live]


def autocast(config: TrainingConfig, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bfloat16 autocast when config.bf16 says so (None: on CUDA only)."""
    enabled = config.bf16 if config.bf16 is not None else device.type == "cuda"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def build_optimizer(model: nn.Module, config: TrainingConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, without weight decay on biases and norms, each group at
    its `lr_scale` factor (kept in the group as "lr_scale"; `set_learning_rate` applies it)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    patterns = [pattern for pattern, _ in config.lr_scale]
    groups: dict[tuple[int, bool], list[nn.Parameter]] = {}
    for name, parameter in named:
        scale_index = next((i + 1 for i, pattern in enumerate(patterns) if fnmatch(name, pattern)), 0)
        groups.setdefault((scale_index, parameter.dim() < 2), []).append(parameter)
    idle = [pattern for i, pattern in enumerate(patterns) if not any(key[0] == i + 1 for key in groups)]
    unmatched = [pattern for pattern in idle if not any(fnmatch(name, pattern) for name, _ in named)]
    if unmatched:
        shown = ", ".join(name for name, _ in named[:8]) + (", ..." if len(named) > 8 else "")
        raise ConfigError(
            f"lr_scale patterns {unmatched} match no trainable parameter of the model; its trainable parameters "
            f"are {shown} (a prepared model's students are lowrank.<site>.down/up.weight)"
        )
    if idle:
        raise ConfigError(
            f"lr_scale patterns {idle} match only parameters an earlier pattern already takes (the first match wins): "
            "put the narrower pattern first, or drop it"
        )
    factors = (1.0, *(factor for _, factor in config.lr_scale))
    return torch.optim.AdamW(
        [
            {"params": groups[key], "weight_decay": 0.0 if key[1] else config.weight_decay, "lr_scale": factors[key[0]]}
            for key in sorted(groups)  # without lr_scale: the decayed group, then the rest, as checkpoints hold them
        ],
        lr=config.lr,
    )


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group at `lr` times its lr_scale (1 in a checkpoint saved before lr_scale existed)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


class JointTrainer:
    """Joint fine-tuning and compression of a prepared model.

        prepared = tunecomp_fx.prepare(model, example_inputs, ratio=0.5, rank_slack=0.25)
        trainer = JointTrainer(prepared, data=train_loader, eval_data=val_loader, steps=2000, lr=3e-4)
        compact = tunecomp_fx.finalize(trainer.fit())

    Batches are (inputs, targets); inputs a tensor, a tuple of tensors or a dict of keyword tensors.
    loss_fn(outputs, targets) defaults to cross-entropy, metric_fn(outputs, targets) (a batch mean)
    to accuracy; both see the logits of Hugging Face outputs. `original` is the uncompressed model
    for logit distillation. Checkpoints go to checkpoint_dir every checkpoint_every steps (rank 0
    only); fit(resume=path or directory) continues a run exactly. Options are TrainingConfig fields."""

    def __init__(
        self,
        prepared: fx.GraphModule,
        config: TrainingConfig | None = None,
        *,
        data: Iterable[Any],
        eval_data: Iterable[Any] | None = None,
        loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
        metric_fn: Callable[[Any, Any], Any] | None = None,
        original: nn.Module | None = None,
        device: str | torch.device | None = None,
        eval_every: int | None = None,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        checkpoint_every: int | None = None,
        progress: bool = True,
        **options: Any,
    ) -> None:
        self.config = training_config(config, options)
        self.fingerprint = fingerprint(prepared)
        if self.config.logit_distill > 0 and original is None:
            raise ConfigError("logit_distill > 0 needs the original model: pass original=model")
        if checkpoint_every is not None and checkpoint_dir is None:
            raise ConfigError("checkpoint_every needs a checkpoint_dir")
        check_training_data(data)
        for name, value in (("eval_every", eval_every), ("checkpoint_every", checkpoint_every)):
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1; got {value}")
        self.setup, self.device = distributed.setup(device)
        self.model = prepared
        self.data = distributed.shard(data, self.setup, self.config.seed)
        self.eval_data = eval_data
        self.loss_fn = loss_fn or F.cross_entropy
        self.metric_fn = metric_fn or accuracy
        self.metric_name = "accuracy" if metric_fn is None else getattr(metric_fn, "__name__", "metric")
        self.original = original
        self.eval_every = eval_every
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.checkpoint_every = checkpoint_every
        if self.checkpoint_dir is not None and self.setup.is_main:
            check_checkpoint_dir(self.checkpoint_dir)
        self.progress = progress and self.setup.is_main
        self.total_steps = self._total_steps()
        self.hook = StepHook(prepared, self.config, total_steps=self.total_steps)
        self.config = self.hook.config  # the blend length resolved for the ratio: what checkpoints and reports record
        self.history: list[dict[str, float]] = []

    def _total_steps(self) -> int:
        if self.config.steps is not None:
            return self.config.steps
        if self.config.epochs is None:
            raise ConfigError("give the run's length: steps= or epochs=")
        try:
            batches = len(self.data)  # type: ignore[arg-type]
        except TypeError:
            raise ConfigError("epochs= needs data with a length; give steps= for an iterable without one") from None
        return max(1, round(self.config.epochs * batches / self.config.accumulate))

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        return autocast(self.config, self.device)

    def _optimizer(self) -> torch.optim.AdamW:
        return build_optimizer(self.model, self.config)

    def fit(self, resume: str | os.PathLike[str] | None = None) -> fx.GraphModule:
        """Train to the end of the run; returns the prepared model, teachers removed, in eval mode
        (ready for tunecomp_fx.finalize)."""
        try:
            return self._fit(resume)
        finally:
            distributed.teardown(self.setup)

    def _fit(self, resume: str | os.PathLike[str] | None) -> fx.GraphModule:
        config, hook = self.config, self.hook
        self.model.to(self.device)
        if self.original is not None:
            self.original.to(self.device).eval().requires_grad_(False)
        cursor = DataCursor(self.data)
        payload = self._read_checkpoint(resume) if resume is not None else None
        if payload is not None:
            hook.load_state_dict(payload["hook"])
        optimizer = self._optimizer()
        if payload is not None:
            self.model.load_state_dict(payload["model"])
            optimizer.load_state_dict(payload["optimizer"])
            self.history = list(payload["history"])
            cursor.load_state_dict(payload["data"])
            set_rng_state(payload["rng"], self.device)
        else:
            torch.manual_seed(config.seed)
            random.seed(config.seed)
        set_training_mode(self.model, True)
        network = distributed.wrap(self.model, self.setup, self.device)
        trainable = [p for group in optimizer.param_groups for p in group["params"]]
        bar = progress_bar(total=self.total_steps, initial=hook.step_count, enabled=self.progress, desc="joint")
        while hook.step_count < self.total_steps:
            step = hook.step_count
            set_learning_rate(optimizer, config.lr * hook.schedules.lr_factor(step))
            loss_sum = torch.zeros((), device=self.device)
            for micro in range(config.accumulate):
                inputs, targets = split_batch(cursor.next(), self.device)
                last = micro == config.accumulate - 1
                sync = contextlib.nullcontext() if last or not self.setup.enabled else network.no_sync()
                with sync:
                    with self._autocast():
                        loss = self._loss(network, inputs, targets)
                    (loss / config.accumulate).backward()
                loss_sum += loss.detach().float()
            loss_value = loss_sum.item() / config.accumulate
            max_norm = config.max_grad_norm if config.max_grad_norm is not None else float("inf")
            norm = torch.nn.utils.clip_grad_norm_(trainable, max_norm)
            self._check_finite(step, loss_value, norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            removed = hook.teacher_removed
            hook.step()
            if hook.teacher_removed and not removed:
                _retain_live_parameters(optimizer, self.model)
                trainable = [p for group in optimizer.param_groups for p in group["params"]]
                network = distributed.wrap(self.model, self.setup, self.device)
            record = {"step": hook.step_count, "loss": loss_value, "alpha": hook.alpha, "kept": hook.pruner.kept_fraction()}
            at_end = hook.step_count == self.total_steps
            if self.eval_data is not None and (at_end or (self.eval_every and hook.step_count % self.eval_every == 0)):
                record[self.metric_name] = self.evaluate()
            self.history.append(record)
            if self.checkpoint_every and hook.step_count % self.checkpoint_every == 0:
                self._write_checkpoint(optimizer, cursor)
            bar.set_postfix(self._postfix(), refresh=False)
            bar.update(1)
        bar.close()
        set_training_mode(self.model, False)
        return self.model

    def _loss(self, network: nn.Module, inputs: Inputs, targets: Any) -> torch.Tensor:
        predicted = prediction(call_model(network, inputs))
        where = f"at step {self.hook.step_count + 1} of {self.total_steps}"
        loss = checked_loss(self.loss_fn(predicted, targets), where) + self.hook.distill_loss()
        student_weight = self.config.student_loss * self.hook.alpha  # 0 once the teachers are gone
        if student_weight > 0:
            with students_alone(self.model):
                alone = prediction(call_model(network, inputs))
            loss = loss + student_weight * checked_loss(self.loss_fn(alone, targets), where)
        if self.config.logit_distill > 0:
            with torch.no_grad():
                reference = prediction(call_model(self.original, inputs))
            t = self.config.temperature
            kl = F.kl_div(
                F.log_softmax(predicted.float() / t, dim=-1), F.log_softmax(reference.float() / t, dim=-1),
                log_target=True, reduction="batchmean",
            )
            loss = loss + self.config.logit_distill * t * t * kl
        return loss

    def _check_finite(self, step: int, loss: float, norm: torch.Tensor) -> None:
        """Stop before the optimizer applies a bad update, so no checkpoint ever holds one."""
        where = f"at step {step + 1} of {self.total_steps}"
        if not math.isfinite(loss):
            raise TrainingError(
                f"the loss is {loss} {where} (alpha = {self.hook.alpha:.3g}); the model was not updated "
                "and no checkpoint was written for this step. Lower lr, check the data for NaN/inf, or "
                "use bf16=False"
            )
        if not torch.isfinite(norm):
            raise TrainingError(
                f"the gradients are non-finite (norm {norm.item()}) {where}, with a finite loss {loss:.4g}; "
                "the model was not updated and no checkpoint was written for this step. Lower lr or set "
                "max_grad_norm"
            )

    def _postfix(self) -> dict[str, str]:
        last = self.history[-1]
        postfix = {"loss": f"{last['loss']:.4f}", "alpha": f"{last['alpha']:.3f}", "kept": f"{last['kept']:.3f}"}
        evaluated = [r for r in self.history if self.metric_name in r]
        if evaluated:
            postfix[self.metric_name] = f"{evaluated[-1][self.metric_name]:.4f}"
        return postfix

    def evaluate(self) -> float:
        """The metric over eval_data (a batch-size weighted mean, summed over ranks)."""
        if self.eval_data is None:
            raise ConfigError("no eval_data to evaluate on")
        was_training = self.model.training
        set_training_mode(self.model, False)
        total, count = 0.0, 0
        try:
            with torch.no_grad(), self._autocast():
                for batch in self.eval_data:
                    inputs, targets = split_batch(batch, self.device)
                    value = self.metric_fn(prediction(call_model(self.model, inputs)), targets)
                    size = batch_size(targets)
                    total += float(value) * size
                    count += size
        finally:
            set_training_mode(self.model, was_training)
        total, count = distributed.sum_over_ranks([total, float(count)], self.device)
        if count == 0:
            raise InputError("eval_data yielded no batches")
        return total / count

    # -- checkpoints ------------------------------------------------------------------------

    def _write_checkpoint(self, optimizer: torch.optim.Optimizer, cursor: DataCursor) -> None:
        if not self.setup.is_main or self.checkpoint_dir is None:
            return
        write_checkpoint(self.checkpoint_dir, self.hook.step_count, {
            "training_config": self.config.to_dict(),
            "fingerprint": self.fingerprint,
            "world_size": self.setup.world_size,
            "total_steps": self.total_steps,
            "hook": self.hook.state_dict(),
            "model": self.model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "data": cursor.state_dict(),
            "rng": rng_state(self.device),
            "history": self.history,
        })

    def _read_checkpoint(self, resume: str | os.PathLike[str]) -> dict[str, Any]:
        return read_checkpoint(
            resume, self.device, fingerprint=self.fingerprint, config=self.config,
            world_size=self.setup.world_size, total_steps=self.total_steps,
        )


_TRAINER_OPTIONS = {"loss_fn", "metric_fn", "device", "eval_every", "checkpoint_dir", "checkpoint_every", "resume", "training"}


def joint_compress(
    model: nn.Module,
    example_inputs: Any,
    ratio: float | None,
    *,
    config: CompressionConfig | None,
    calib: Iterable[Any] | None,
    progress: bool,
    data: Iterable[Any],
    eval_data: Iterable[Any] | None,
    steps: int | None,
    epochs: float | None,
    dynamic_dims: dict[str | int, dict[int, str]] | None = None,
    **options: Any,
) -> fx.GraphModule:
    """prepare (students with slack rank) -> JointTrainer -> finalize. Options are CompressionConfig
    fields, TrainingConfig fields, or JointTrainer's loss_fn, metric_fn, device, eval_every,
    checkpoint_dir, checkpoint_every, plus resume= and training=TrainingConfig(...)."""
    check_training_data(data)
    compression_fields = {f.name for f in dataclasses.fields(CompressionConfig)}
    training_fields = {f.name for f in dataclasses.fields(TrainingConfig)}
    unknown = sorted(set(options) - compression_fields - training_fields - _TRAINER_OPTIONS)
    if unknown:
        raise ConfigError(
            f"unknown options {unknown}; compress takes CompressionConfig and TrainingConfig fields and "
            f"{sorted(_TRAINER_OPTIONS)}"
        )
    compression = {k: v for k, v in options.items() if k in compression_fields}
    training = {k: v for k, v in options.items() if k in training_fields}
    trainer_options = {k: v for k, v in options.items() if k in _TRAINER_OPTIONS}
    method = config.method if config is not None else compression.get("method", "tunecomp")
    slack_unset = config is None or config.rank_slack is None
    if slack_unset and method != "union":  # union trains fixed-rank cores: no slack to prune
        compression.setdefault("rank_slack", DEFAULT_RANK_SLACK)
    if method == "union" and calib is None:  # labelled training batches, where the model is
        device = next(itertools.chain(model.parameters(), model.buffers()), torch.empty(0)).device
        calib = [to_device(batch, device) for batch in itertools.islice(iter(data), UNION_CALIBRATION_BATCHES)]
    for name, value in (("steps", steps), ("epochs", epochs)):
        if value is not None:
            training[name] = value
    training_cfg = training_config(trainer_options.pop("training", None), training)
    resume = trainer_options.pop("resume", None)
    if trainer_options.get("checkpoint_dir") is not None:  # before prepare's minutes of work, not after
        check_checkpoint_dir(trainer_options["checkpoint_dir"])
    prepared = prepare(
        model, example_inputs, ratio, config=config, calib=calib, progress=progress,
        loss_fn=trainer_options.get("loss_fn"), dynamic_dims=dynamic_dims, **compression,
    )
    original = copy.deepcopy(model).eval() if training_cfg.logit_distill > 0 else None
    trainer = JointTrainer(
        prepared, training_cfg, data=data, eval_data=eval_data, original=original, progress=progress, **trainer_options
    )
    compact = finalize(trainer.fit(resume=resume), inplace=True, progress=progress)
    compact.meta[TRAINING_KEY] = {"config": trainer.config.to_dict(), "history": trainer.history, "metric": trainer.metric_name}
    return compact
