"""A 2-process torchrun run (gloo, CPU) finishes with identical weights and rank masks on both
ranks, each rank trained on its own shard, and only rank 0 wrote checkpoints."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

WORKER = Path(__file__).with_name("ddp_worker.py")


def test_two_process_torchrun_agrees_on_weights_and_masks(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER), str(tmp_path)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    # A session of its own, so that a timeout kills torchrun's workers too, not torchrun alone.
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment, start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    assert process.returncode == 0, stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    first, second = ranks[0]["state"], ranks[1]["state"]
    assert first.keys() == second.keys()
    masks = [key for key in first if key.endswith("rank_mask")]
    assert masks and sum(first[k].sum() for k in masks) < sum(first[k].numel() for k in masks)  # pruned
    for key in first:
        assert torch.equal(first[key], second[key]), key
    assert not any("blend" in key for key in first)  # both ranks removed their teachers
    assert not torch.equal(ranks[0]["first_targets"], ranks[1]["first_targets"])  # sharded data
    assert ranks[0]["history"][-1]["accuracy"] == ranks[1]["history"][-1]["accuracy"]
    assert sorted(p.name for p in (tmp_path / "checkpoints_rank0").glob("*.pt")) == ["step_0000020.pt", "step_0000030.pt"]
    assert not (tmp_path / "checkpoints_rank1").exists()
