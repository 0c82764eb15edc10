"""A training process killed with SIGKILL (no handler runs, no file is closed) resumes from its
latest checkpoint and ends with exactly the weights, rank masks and history of an uninterrupted
run (bit-identical: CPU, one thread, fixed seed, as the in-process tests/test_resume.py); the
checkpoint directory never holds a corrupt latest checkpoint, even when the kill lands in the
middle of a checkpoint write."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from tests.joint_task import single_thread  # noqa: F401
from tests.test_resume import _loader, _trainer

from tunecomp_fx.checkpoints import CHECKPOINT_FORMAT, latest_checkpoint

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).resolve().parents[1]
BATCH_DELAY = 0.05  # seconds per batch: steps 10 to 40 take at least 1.5 s, time enough to kill the run mid-way
DEADLINE = 600.0  # seconds any one wait may take before the test fails (a hung worker; a loaded machine is slow)


Worker = Callable[..., "subprocess.Popen[bytes]"]


@pytest.fixture
def worker() -> Iterator[Worker]:
    """Starts tests/killed_run_worker.py processes; kills those still running when the test ends."""
    started: list[subprocess.Popen[bytes]] = []

    def start(checkpoints: Path, out: Path, *options: str) -> subprocess.Popen[bytes]:
        command = [sys.executable, "-m", "tests.killed_run_worker", str(checkpoints), str(out), *options]
        started.append(subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
        return started[-1]

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


def _wait_for(condition: object, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():  # type: ignore[operator]
        assert process.poll() is None, f"the worker ended (rc {process.returncode}) early:\n{process.stdout.read().decode()}"
        assert time.monotonic() < deadline, "the worker hung"
        time.sleep(0.005)


def _kill(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=DEADLINE) == -signal.SIGKILL, "the worker finished before it was killed"


def _step(path: Path) -> int:
    return int(path.stem.removeprefix("step_"))


def _load_checkpoint(path: Path) -> dict:
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == CHECKPOINT_FORMAT and payload["hook"]["step"] == _step(path), path
    return payload


def _every_checkpoint_loads(checkpoints: Path) -> int:
    """Every complete checkpoint in the directory loads; returns the latest one's step."""
    for path in checkpoints.glob("step_*.pt"):
        _load_checkpoint(path)
    return _step(latest_checkpoint(checkpoints))


def test_run_killed_mid_write_and_mid_run_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path: Path, worker: Worker) -> None:
    checkpoints, out = tmp_path / "checkpoints", tmp_path / "out.pt"

    # 1. Killed in the middle of writing its second checkpoint (step 10): the half-written
    #    temporary file is not a checkpoint, and the first one (step 5) is still the latest.
    stalled = tmp_path / "stalled"
    first = worker(checkpoints, out, "--stall-at-checkpoint", "2", "--stalled", str(stalled))
    _wait_for(stalled.exists, first)
    _kill(first)
    partial = checkpoints / "step_0000010.pt.partial"
    assert partial.exists()
    with pytest.raises(Exception):  # truncated: torch.load cannot read it
        torch.load(partial, weights_only=True)
    assert _every_checkpoint_loads(checkpoints) == 5

    # 2. Resumed, then killed at a random moment after it wrote a checkpoint of its own (between
    #    steps or during a write); meanwhile the latest checkpoint is read as often as possible.
    second = worker(checkpoints, out, "--resume", "--batch-delay", str(BATCH_DELAY))
    _wait_for((checkpoints / "step_0000010.pt").exists, second)
    delay = random.uniform(0.0, 0.4)
    until = time.monotonic() + delay
    seen = set()
    while time.monotonic() < until:
        latest = latest_checkpoint(checkpoints)
        _load_checkpoint(latest)
        seen.add(_step(latest))
    _kill(second)
    reached = _every_checkpoint_loads(checkpoints)
    assert 10 <= reached < 40 and seen <= set(range(10, reached + 1, 5)), (delay, seen, reached)

    # 3. Resumed again to the end.
    third = worker(checkpoints, out, "--resume")
    output = third.communicate(timeout=DEADLINE)[0].decode()
    assert third.returncode == 0, output
    resumed = torch.load(out, weights_only=True)

    full = _trainer(_loader(), tmp_path / "full")
    full.fit()
    expected = full.model.state_dict()
    assert expected.keys() == resumed["state"].keys()
    assert any(key.endswith("rank_mask") for key in expected)
    for key, value in expected.items():
        assert torch.equal(value, resumed["state"][key]), (key, delay)
    assert resumed["history"] == full.history
