"""One process of the 2-process torchrun test (tests/test_distributed.py): joint training of the
digits MLP under DDP/gloo, with the students' own task loss (two forwards per step during the
blend); writes what it ended with to OUT/rank<r>.pt for the test to compare.
Each rank is given its own checkpoint directory, so the test can see that only rank 0 writes."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from joint_task import digits_task, fresh  # noqa: E402

import tunecomp_fx  # noqa: E402


def main(out: Path) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    task = digits_task()
    prepared = tunecomp_fx.prepare(fresh("mlp"), task.example_inputs(), 0.5, rank_slack=0.25)
    seen: list[torch.Tensor] = []

    def loss_fn(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        seen.append(targets.clone())
        return F.cross_entropy(outputs, targets)

    trainer = tunecomp_fx.JointTrainer(
        prepared, data=task.loader(), eval_data=[task.test], loss_fn=loss_fn, steps=30, blend_steps=15, lr=1e-3, student_loss=1.0,
        warmup=0, checkpoint_dir=out / f"checkpoints_rank{rank}", checkpoint_every=10, progress=False,
    )
    trained = trainer.fit()
    # the students-alone forward ran on each of the 15 blend steps, under DDP too
    assert len(seen) == 30 + 15, f"rank {rank}: loss_fn called {len(seen)} times, expected 45"
    torch.save(
        {
            "state": trained.state_dict(),
            "first_targets": seen[0],
            "history": trainer.history,
            "world_size": trainer.setup.world_size,
        },
        out / f"rank{rank}.pt",
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
