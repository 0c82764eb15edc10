"""Checkpoints of a joint run: written durably every checkpoint_every steps (the newest two kept) and
read back only into the run they came from (same model, compression, training config, length and
number of processes), with the RNG states that make a resumed run continue exactly."""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import fx

from tunecomp_fx.api import prepared_state
from tunecomp_fx.errors import TrainingError, first_line
from tunecomp_fx.folders import check_writable_folder

if TYPE_CHECKING:
    from tunecomp_fx.train import TrainingConfig

CHECKPOINT_FORMAT = "tunecomp-checkpoint/1"
_KEEP_CHECKPOINTS = 2
_RESUME_FROM = "give resume= a run's checkpoint_dir (its newest complete step_*.pt is used) or one of those files"
_START_AFRESH = "start a fresh run without resume= (in another checkpoint_dir, to keep these checkpoints)"


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


def rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: Mapping[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def fingerprint(prepared: fx.GraphModule) -> dict[str, Any]:
    """What a checkpoint must match to be resumed into this prepared model."""
    context = prepared_state(prepared).context
    return {
        "compression_config": context.config.to_dict(),
        "ranks": {name: decision.rank for name, decision in sorted(context.ranks.items())},
        "parameters": {name: list(p.shape) for name, p in prepared.named_parameters()},
    }


def differences(saved: Mapping[str, Any], now: Mapping[str, Any], shown: int = 3) -> str:
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


def write_checkpoint(folder: Path, step: int, payload: Mapping[str, Any]) -> None:
    """`payload` as folder/step_NNNNNNN.pt, tagged with the format; older checkpoints beyond the newest two are removed."""
    folder.mkdir(parents=True, exist_ok=True)
    save_durably({"format": CHECKPOINT_FORMAT, **payload}, folder / f"step_{step:07d}.pt")
    for old in sorted(folder.glob("step_*.pt"))[:-_KEEP_CHECKPOINTS]:
        old.unlink()


def read_checkpoint(
    resume: str | os.PathLike[str],
    device: torch.device,
    *,
    fingerprint: Mapping[str, Any],
    config: TrainingConfig,
    world_size: int,
    total_steps: int,
) -> dict[str, Any]:
    """The newest checkpoint at `resume`, after checking it was written by this run: the same
    model and compression (`fingerprint`), training config, run length and number of processes."""
    path = latest_checkpoint(resume)
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except Exception as error:
        detail = first_line(error)
        reason = detail if detail == type(error).__name__ else f"{type(error).__name__}: {detail}"
        raise TrainingError(f"cannot read checkpoint {path} ({reason}); {_RESUME_FROM}") from error
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise TrainingError(f"{path} is not a tunecomp checkpoint ({CHECKPOINT_FORMAT}); {_RESUME_FROM}")
    # the model and compression first: the default blend length derives from the ratio
    if payload["fingerprint"] != fingerprint:
        saved_print = payload["fingerprint"]
        mismatched = [
            f"{key} ({differences(saved_print.get(key, {}), now)})"
            for key, now in fingerprint.items() if saved_print.get(key) != now
        ]
        raise TrainingError(
            f"{path} was written for a different model or compression; saved -> now: {'; '.join(mismatched)}. "
            f"Prepare the same model with the same options to resume, or {_START_AFRESH}"
        )
    saved = type(config).from_dict(payload["training_config"])
    if saved != config:
        changed = {k: (v, getattr(config, k)) for k, v in saved.to_dict().items() if getattr(config, k) != v}
        raise TrainingError(
            f"{path} was written with a different training config (saved, now): {changed}. Resume with the "
            f"training options it was written with, or {_START_AFRESH}"
        )
    if payload["world_size"] != world_size or payload["total_steps"] != total_steps:
        raise TrainingError(
            f"{path} comes from a run of {payload['total_steps']} steps on {payload['world_size']} processes; "
            f"this run has {total_steps} steps on {world_size}. Resume with the same run length "
            f"and number of processes, or {_START_AFRESH}"
        )
    return payload
