"""One joint training process of tests/test_killed_run.py, which kills it with SIGKILL: the run of
tests/test_resume.py (checkpoints every 5 of 40 steps), resumed from its checkpoint directory when
asked, ending with its weights and history written to OUT.

    python -m tests.killed_run_worker CHECKPOINTS OUT [--resume] [--batch-delay S] [--stall-at-checkpoint N --stalled MARKER]

--batch-delay paces the run (seconds of sleep per batch), so that the test can kill it mid-run.
--stall-at-checkpoint N writes the first half of the Nth checkpoint's temporary file, creates the
file MARKER, and waits to be killed: a kill in the middle of a checkpoint write."""

from __future__ import annotations

import argparse
import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from tests.test_resume import _loader, _trainer


class Paced:
    """The training batches, each after a pause (the loader's RNG use is unchanged)."""

    def __init__(self, loader: DataLoader, delay: float) -> None:
        self.loader, self.delay = loader, delay

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            time.sleep(self.delay)
            yield batch


def stall_at_checkpoint(number: int, marker: Path) -> None:
    """Make the `number`th torch.save write half of its file, then hang (the trainer's only saves
    before the end of the run are its checkpoints)."""
    save, calls = torch.save, [0]

    def half_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        calls[0] += 1
        if calls[0] < number:
            return save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        save(obj, buffer, *args, **kwargs)
        f.write(buffer.getvalue()[: buffer.tell() // 2])  # the trainer saves into an open .partial file
        f.flush()
        marker.touch()
        time.sleep(600)

    torch.save = half_save


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoints", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--batch-delay", type=float, default=0.0)
    parser.add_argument("--stall-at-checkpoint", type=int)
    parser.add_argument("--stalled", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as the in-process reference run (tests.joint_task.single_thread)
    trainer = _trainer(Paced(_loader(), args.batch_delay), args.checkpoints)
    if args.stall_at_checkpoint is not None:
        stall_at_checkpoint(args.stall_at_checkpoint, args.stalled)
    model = trainer.fit(resume=args.checkpoints if args.resume else None)
    torch.save({"state": model.state_dict(), "history": trainer.history}, args.out)


if __name__ == "__main__":
    main()
