"""Training and evaluation batches: (inputs, targets) pairs moved to a device, the errors for data
without batches, `DataCursor`, the endless resumable pass over a run's data that the joint driver
and plain fine-tuning share, and `ContinuedData`, the rest of such a pass for a second run."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader

from tunecomp_fx.errors import InputError
from tunecomp_fx.inputs import Inputs, normalize_inputs


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


class DataCursor:
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


class ContinuedData:
    """The batches a run over `data` sees from its batch `start` on (DataCursor's endless passes), so
    that a second run continues the first one's data instead of repeating it: the sequential
    pipelines' second fine-tune sees the batches the uncompressed run sees in its second half. A
    DataLoader's generators (its own and its sampler's) are put back, at every iteration, to their
    state when this was made (make it where the first run starts). A DataLoader that shuffles from
    torch's global RNG, which training draws on too, cannot be replayed: an InputError."""

    def __init__(self, data: Iterable[Any], start: int) -> None:
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise InputError(f"start must be a batch count >= 0; got {start!r}")
        self.data = data
        self.start = start
        self._generator_states = [(generator, generator.get_state()) for generator in _shuffle_generators(data)]

    def __iter__(self) -> Iterator[Any]:
        for generator, state in self._generator_states:
            generator.set_state(state)
        cursor = DataCursor(self.data)
        for _ in range(self.start):
            cursor.next()
        while True:
            yield cursor.next()


def _shuffle_generators(data: Iterable[Any]) -> list[torch.Generator]:
    """The generators that decide the order (and workers' seeds) of a DataLoader's batches."""
    if not isinstance(data, DataLoader):
        generator = getattr(data, "generator", None)
        return [] if generator is None else [generator]
    sampler = getattr(data.batch_sampler, "sampler", data.sampler)
    if getattr(sampler, "generator", False) is None:  # a random sampler without a generator of its own
        raise InputError(
            f"the data's {type(sampler).__name__} draws its order from torch's global random state, which training "
            "draws on too, so a second run cannot be given the rest of its batches: give the loader a generator, "
            "e.g. DataLoader(dataset, shuffle=True, generator=torch.Generator().manual_seed(0))"
        )
    generators = [data.generator]
    if getattr(sampler, "generator", None) is not data.generator:  # shuffle=True hands the loader's to its sampler
        generators.append(sampler.generator)
    return [generator for generator in generators if generator is not None]


def to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, Mapping):
        return {key: to_device(item, device) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(item, device) for item in value)
    return value


def split_batch(batch: Any, device: torch.device) -> tuple[Inputs, Any]:
    if not isinstance(batch, (list, tuple)) or len(batch) != 2:
        raise InputError(
            f"training and evaluation batches must be (inputs, targets) pairs, with inputs a tensor, a tuple "
            f"of tensors or a dict of keyword tensors; got {type(batch).__name__}"
            + (f" of length {len(batch)}" if isinstance(batch, (list, tuple)) else "")
        )
    inputs, targets = batch
    return normalize_inputs(to_device(inputs, device)), to_device(targets, device)


def batch_size(targets: Any) -> int:
    return targets.shape[0] if isinstance(targets, torch.Tensor) and targets.dim() else len(targets)
