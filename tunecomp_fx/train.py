"""The joint fine-tuning and compression driver (DESIGN.md section 2).

- `TrainingConfig`: the optimization recipe, one frozen dataclass saved in every checkpoint.
- `StepHook`: drives a prepared model through the schedules; users with their own loop add
  `hook.distill_loss()` to their loss and call `hook.step()` after `optimizer.step()`. Each step
  sets the blends, shrinks the rank masks and, once alpha reaches 0, takes the teachers out of
  the graph (fold_blends + eliminate_dead_code on the live model).
- `JointTrainer`: the loop (AdamW with warm-up and decay, gradient accumulation, bf16 autocast on
  CUDA, periodic evaluation, checkpoints with exact resume, NaN/inf guard, DDP under torchrun).
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
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from tunecomp_fx import distributed
from tunecomp_fx.api import finalize, prepare, prepared_state
from tunecomp_fx.config import CompressionConfig, reject_unknown_keys
from tunecomp_fx.errors import ConfigError, InputError, TrainingError, first_line
from tunecomp_fx.folders import check_writable_folder
from tunecomp_fx.inputs import Inputs, call_model, normalize_inputs
from tunecomp_fx.mode import set_training_mode
from tunecomp_fx.passes.eliminate_dead_code import EliminateDeadCode
from tunecomp_fx.passes.fold_blends import FoldBlends
from tunecomp_fx.pipeline import run_passes
from tunecomp_fx.progress import progress_bar
from tunecomp_fx.pruning import SELECTIONS, RankPruner
from tunecomp_fx.schedules import BLENDS, DEFAULT_MIX, LR_DECAYS, MIXES, Schedules, steps_of
from tunecomp_fx.sites import Blend, set_blend, teacher_parameters

DEFAULT_RANK_SLACK = 0.5  # extra rank students start with when trained, pruned away by the blend's end (README: 0.5 won at 0.7)
LONGEST_DEFAULT_BLEND = 0.5  # the default blend lasts the ratio's fraction of the run, at most this (README: "Evidence for the defaults")
UNION_CALIBRATION_BATCHES = 8  # training batches method="union" calibrates on when given no calib
CHECKPOINT_FORMAT = "tunecomp-checkpoint/1"
TRAINING_KEY = "tunecomp_training"  # compact GraphModule.meta key: training config and history
_KEEP_CHECKPOINTS = 2
_RESUME_FROM = "give resume= a run's checkpoint_dir (its newest complete step_*.pt is used) or one of those files"
_START_AFRESH = "start a fresh run without resume= (in another checkpoint_dir, to keep these checkpoints)"


@dataclass(frozen=True)
class TrainingConfig:
    """How the joint run optimizes (everything that decides its result).

    steps / epochs: length of the run in optimizer steps, or in passes over the data (one of them).
    lr, weight_decay: AdamW (no decay on biases and norms); warmup: steps (int) or fraction of the
        run (float); lr_decay: "cosine", "linear" or "constant" after warm-up.
    accumulate: micro-batches per optimizer step; max_grad_norm: clipping (None: no clipping).
    blend: "sin" (alpha = 1 - sin(pi t / 2T)), "linear" or "cosine"; blend_steps: T, in steps (int)
        or as a fraction of the run (float); None (the default) takes the fraction the compression
        removes, at most half the run (`for_ratio`): milder compression hands over sooner. The
        teachers leave the compute at step T.
    blend_mix: the student's weight beta in the blend, "convex" (1 - alpha, the default: keeps a
        site's output at its scale while the student approximates it) or "power" (sqrt(1 - alpha^2)).
    distill_weight: initial weight of the layer-wise feature loss, which decays with alpha.
    logit_distill, temperature: weight of a KL loss against the original model's outputs (0: off).
    rank_selection: "global" (one threshold over per-site normalized importances, so ranks move to
        the sites that use them; the default, better on the digits transformer test) or "site"
        (each student shrinks to the rank allocation gave it).
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
    weight_decay: float = 0.01
    warmup: int | float = 0.05
    lr_decay: str = "cosine"
    accumulate: int = 1
    max_grad_norm: float | None = 1.0
    blend: str = "sin"
    blend_steps: int | float | None = None
    blend_mix: str = DEFAULT_MIX
    distill_weight: float = 1.0
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
        for name in ("warmup", "blend_steps"):
            value = getattr(self, name)
            if value is None and name == "blend_steps":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"{name} must be a step count (int) or a fraction of the run (float); got {value!r}")
            if isinstance(value, float) and value > 1:
                raise ConfigError(f"{name}={value} as a float is a fraction of the run and must be <= 1")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0; got {self.lr}")
        if self.accumulate < 1:
            raise ConfigError(f"accumulate must be >= 1; got {self.accumulate}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ConfigError(f"max_grad_norm must be > 0 or None; got {self.max_grad_norm}")
        for name in ("weight_decay", "distill_weight", "logit_distill", "hardshrink"):
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
        warmup_steps = steps_of(self.warmup, total)
        if blend_steps > total:
            raise ConfigError(
                f"blend_steps={self.blend_steps} ends at step {blend_steps}, after the run's {total} steps; "
                "the teachers must be gone by the end (use a fraction <= 1 or fewer steps)"
            )
        if warmup_steps >= total:
            raise ConfigError(f"warmup={self.warmup} covers the whole run of {total} steps")
        return Schedules(total, self.blend, blend_steps, self.blend_mix, warmup_steps, self.lr_decay, self.distill_weight)

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
        self._handles = [prepared.register_forward_pre_hook(self._clear)]
        self._handles += [m.register_forward_hook(self._collect) for m in prepared.modules() if isinstance(m, Blend)]
        self._handles += self.pruner.track_widths()
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

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _clear(self, module: nn.Module, args: Any) -> None:
        self._site_losses = []

    def _collect(self, module: nn.Module, args: tuple[torch.Tensor, torch.Tensor], output: torch.Tensor) -> None:
        if not torch.is_grad_enabled() or self.schedules.distill(self.step_count) == 0.0:
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
        if step <= schedules.blend_steps:
            self.pruner.update(schedules.progress(step))
            distributed.broadcast_(self.pruner.masks())  # rank 0 decides
        self.pruner.shrink_elements(self.config.hardshrink * schedules.progress(step))
        if alpha == 0.0 and not self.teacher_removed:
            self._remove_teacher()

    def _remove_teacher(self) -> None:
        """At alpha = 0 the teachers contribute nothing: fold the blends into the students and drop
        the teacher nodes and weights, so no teacher matmul runs and no teacher memory is held."""
        model = run_passes(self.model, [FoldBlends(), EliminateDeadCode()], self.context)
        assert model is self.model, "fold_blends and eliminate_dead_code rewrite the model in place"
        self.teacher_removed = True
        self.close()  # no teacher, no feature loss: the model carries no hooks of ours any more


def check_checkpoint_dir(folder: str | os.PathLike[str]) -> None:
    check_writable_folder(Path(folder), f"checkpoints to checkpoint_dir={folder}", TrainingError)


def save_durably(payload: Any, path: Path) -> None:
    """torch.save to `path` so that neither a crash nor a power loss leaves a truncated file there:
    written beside it, flushed to disk, renamed over it atomically, and the rename flushed too."""
    partial = path.with_suffix(path.suffix + ".partial")
    with open(partial, "wb") as handle:
        torch.save(payload, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def no_batches(epoch: int = 0) -> InputError:
    """The error for training data that yields no batch when a new pass over it begins."""
    if epoch > 0:
        return InputError(
            f"the training data (data=) yielded no batches in pass {epoch + 1} over it, after yielding batches in the "
            "first: a generator or iterator is used up after one pass. Pass data that can be iterated again "
            "(a DataLoader or a list of batches), or fewer steps"
        )
    return InputError(
        "the training data (data=) yielded no batches. Pass an iterable of (inputs, targets) batches with at least "
        "one batch (a DataLoader with drop_last=True yields none when the data set is smaller than its batch_size)"
    )


def check_training_data(data: Iterable[Any]) -> None:
    """Fail before any work when `data` has a length and it is 0 (other iterables are checked when read)."""
    try:
        empty = len(data) == 0  # type: ignore[arg-type]
    except TypeError:
        return
    if empty:
        raise no_batches()


def checked_loss(loss: Any, where: str) -> torch.Tensor:
    """`loss` (what loss_fn returned `where`) if it is a scalar tensor; else the error saying what it is."""
    if isinstance(loss, torch.Tensor) and loss.dim() == 0:
        return loss
    got = f"a tensor of shape {list(loss.shape)}" if isinstance(loss, torch.Tensor) else f"a {type(loss).__name__}"
    raise TrainingError(
        f"loss_fn returned {got} {where}; it must return a scalar (0-dim) tensor to differentiate. Reduce it over the "
        "batch, e.g. with .mean() or reduction='mean'"
    )


class _DataCursor:
    """Endless batches over epochs of `data`, resumable exactly: a position is (epoch, batches
    consumed) plus the RNG state the epoch's iterator was opened with, so a resume reopens the
    epoch with the same shuffle and skips the consumed batches."""

    def __init__(self, data: Iterable[Any]) -> None:
        self.data = data
        self.epoch = 0
        self.index = 0
        self._iterator: Any = None
        self._epoch_rng: dict[str, Any] = {}

    def next(self) -> Any:
        while True:
            if self._iterator is None:
                self._open(None)
            try:
                batch = next(self._iterator)
            except StopIteration:
                if self.index == 0:
                    raise no_batches(self.epoch) from None
                self.epoch, self.index, self._iterator = self.epoch + 1, 0, None
                continue
            self.index += 1
            return batch

    def _open(self, rng: dict[str, Any] | None) -> None:
        sampler = getattr(self.data, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.epoch)
        generator = getattr(self.data, "generator", None)
        if rng is None:
            rng = {"torch": torch.get_rng_state()}
            if generator is not None:
                rng["loader"] = generator.get_state()
        else:
            torch.set_rng_state(rng["torch"])
            if generator is not None:
                generator.set_state(rng["loader"])
        self._epoch_rng = rng
        self._iterator = iter(self.data)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index, "rng": self._epoch_rng}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Reopen the checkpoint's epoch and skip its consumed batches (this draws on torch's RNG:
        restore the run's RNG state afterwards)."""
        self.epoch, self.index = int(state["epoch"]), 0
        self._open(state["rng"])
        for _ in range(int(state["index"])):
            next(self._iterator)
            self.index += 1


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, Mapping):
        return {key: _to_device(item, device) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(item, device) for item in value)
    return value


def split_batch(batch: Any, device: torch.device) -> tuple[Inputs, Any]:
    if not isinstance(batch, (list, tuple)) or len(batch) != 2:
        raise InputError(
            f"training and evaluation batches must be (inputs, targets) pairs, with inputs a tensor, a tuple "
            f"of tensors or a dict of keyword tensors; got {type(batch).__name__}"
            + (f" of length {len(batch)}" if isinstance(batch, (list, tuple)) else "")
        )
    inputs, targets = batch
    return normalize_inputs(_to_device(inputs, device)), _to_device(targets, device)


def _batch_size(targets: Any) -> int:
    return targets.shape[0] if isinstance(targets, torch.Tensor) and targets.dim() else len(targets)


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: Mapping[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


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
    """AdamW over the trainable parameters, without weight decay on biases and norms."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for _, p in named if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr)


def fingerprint(prepared: fx.GraphModule) -> dict[str, Any]:
    """What a checkpoint must match to be resumed into this prepared model."""
    context = prepared_state(prepared).context
    return {
        "compression_config": context.config.to_dict(),
        "ranks": {name: decision.rank for name, decision in sorted(context.ranks.items())},
        "parameters": {name: list(p.shape) for name, p in prepared.named_parameters()},
    }


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
        cursor = _DataCursor(self.data)
        payload = self._read_checkpoint(resume) if resume is not None else None
        if payload is not None:
            hook.load_state_dict(payload["hook"])
        optimizer = self._optimizer()
        if payload is not None:
            self.model.load_state_dict(payload["model"])
            optimizer.load_state_dict(payload["optimizer"])
            self.history = list(payload["history"])
            cursor.load_state_dict(payload["data"])
            _set_rng_state(payload["rng"], self.device)
        else:
            torch.manual_seed(config.seed)
            random.seed(config.seed)
        set_training_mode(self.model, True)
        network = distributed.wrap(self.model, self.setup, self.device)
        trainable = [p for group in optimizer.param_groups for p in group["params"]]
        bar = progress_bar(total=self.total_steps, initial=hook.step_count, enabled=self.progress, desc="joint")
        while hook.step_count < self.total_steps:
            step = hook.step_count
            for group in optimizer.param_groups:
                group["lr"] = config.lr * hook.schedules.lr_factor(step)
            loss_sum = torch.zeros((), device=self.device)
            for micro in range(config.accumulate):
                inputs, targets = split_batch(cursor.next(), self.device)
                last = micro == config.accumulate - 1
                sync = contextlib.nullcontext() if last or not self.setup.enabled else network.no_sync()
                with sync:
                    with self._autocast():
                        loss = self._loss(call_model(network, inputs), inputs, targets)
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

    def _loss(self, outputs: Any, inputs: Inputs, targets: Any) -> torch.Tensor:
        predicted = prediction(outputs)
        where = f"at step {self.hook.step_count + 1} of {self.total_steps}"
        loss = checked_loss(self.loss_fn(predicted, targets), where) + self.hook.distill_loss()
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
                    size = _batch_size(targets)
                    total += float(value) * size
                    count += size
        finally:
            set_training_mode(self.model, was_training)
        total, count = distributed.sum_over_ranks([total, float(count)], self.device)
        if count == 0:
            raise InputError("eval_data yielded no batches")
        return total / count

    # -- checkpoints ------------------------------------------------------------------------

    def _write_checkpoint(self, optimizer: torch.optim.Optimizer, cursor: _DataCursor) -> None:
        if not self.setup.is_main or self.checkpoint_dir is None:
            return
        payload = {
            "format": CHECKPOINT_FORMAT,
            "training_config": self.config.to_dict(),
            "fingerprint": self.fingerprint,
            "world_size": self.setup.world_size,
            "total_steps": self.total_steps,
            "hook": self.hook.state_dict(),
            "model": self.model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "data": cursor.state_dict(),
            "rng": _rng_state(self.device),
            "history": self.history,
        }
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        save_durably(payload, self.checkpoint_dir / f"step_{self.hook.step_count:07d}.pt")
        for old in sorted(self.checkpoint_dir.glob("step_*.pt"))[:-_KEEP_CHECKPOINTS]:
            old.unlink()

    def _read_checkpoint(self, resume: str | os.PathLike[str]) -> dict[str, Any]:
        path = latest_checkpoint(resume)
        try:
            payload = torch.load(path, map_location=self.device, weights_only=True)
        except Exception as error:
            detail = first_line(error)
            reason = detail if detail == type(error).__name__ else f"{type(error).__name__}: {detail}"
            raise TrainingError(f"cannot read checkpoint {path} ({reason}); {_RESUME_FROM}") from error
        if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
            raise TrainingError(f"{path} is not a tunecomp checkpoint ({CHECKPOINT_FORMAT}); {_RESUME_FROM}")
        # the model and compression first: the default blend length derives from the ratio
        if payload["fingerprint"] != self.fingerprint:
            saved_print = payload["fingerprint"]
            mismatched = [
                f"{key} ({_differences(saved_print.get(key, {}), now)})"
                for key, now in self.fingerprint.items() if saved_print.get(key) != now
            ]
            raise TrainingError(
                f"{path} was written for a different model or compression; saved -> now: {'; '.join(mismatched)}. "
                f"Prepare the same model with the same options to resume, or {_START_AFRESH}"
            )
        saved = TrainingConfig.from_dict(payload["training_config"])
        if saved != self.config:
            changed = {k: (v, getattr(self.config, k)) for k, v in saved.to_dict().items() if getattr(self.config, k) != v}
            raise TrainingError(
                f"{path} was written with a different training config (saved, now): {changed}. Resume with the "
                f"training options it was written with, or {_START_AFRESH}"
            )
        if payload["world_size"] != self.setup.world_size or payload["total_steps"] != self.total_steps:
            raise TrainingError(
                f"{path} comes from a run of {payload['total_steps']} steps on {payload['world_size']} processes; "
                f"this run has {self.total_steps} steps on {self.setup.world_size}. Resume with the same run length "
                f"and number of processes, or {_START_AFRESH}"
            )
        return payload


def _differences(saved: Mapping[str, Any], now: Mapping[str, Any], shown: int = 3) -> str:
    """The first `shown` entries in which two dicts differ, as 'key: saved -> now'."""
    keys = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))
    listed = ", ".join(f"{k}: {saved.get(k, 'absent')} -> {now.get(k, 'absent')}" for k in keys[:shown])
    return listed + (f" and {len(keys) - shown} more" if len(keys) > shown else "")


def latest_checkpoint(path: str | os.PathLike[str]) -> Path:
    """`path` itself, or the newest step_*.pt checkpoint in the directory `path`."""
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("step_*.pt"))
        if not found:
            raise TrainingError(
                f"no checkpoint (step_*.pt) in {path}: the run wrote none there (its first is written at step "
                "checkpoint_every). Give resume= the checkpoint_dir of the run to continue, or start it without resume="
            )
        return found[-1]
    if not path.exists():
        raise TrainingError(f"checkpoint {path} does not exist; {_RESUME_FROM}")
    return path


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
    if config is None and method != "union":  # union trains fixed-rank cores: no slack to prune
        compression.setdefault("rank_slack", DEFAULT_RANK_SLACK)
    if method == "union" and calib is None:  # labelled training batches, where the model is
        device = next(itertools.chain(model.parameters(), model.buffers()), torch.empty(0)).device
        calib = [_to_device(batch, device) for batch in itertools.islice(iter(data), UNION_CALIBRATION_BATCHES)]
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
