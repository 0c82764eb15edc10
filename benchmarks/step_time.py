"""Step time and peak memory of the joint run against plain fine-tuning, side by side on CPU.

Three models live in one process and their training steps are interleaved (the order rotates
every round), so machine load hits all three alike:
  plain   - the original model, every parameter trained by AdamW (plain fine-tuning);
  blend   - the prepared model during the blend: teacher and student branches both run, feature
            distillation and per-step rank pruning active (what JointTrainer does per step);
  student - the same after the teachers left (alpha = 0): students only, pruned ranks still
            masked (they are sliced away at finalize).
Every step is the driver's: forward, cross-entropy (+ the hook's feature loss), backward,
gradient clipping, AdamW step, hook.step().

Memory: each step's transient peak is measured as the rise of the process's peak RSS over its
RSS before the step (VmHWM is reset through /proc/self/clear_refs; glibc is told to serve large
blocks by mmap so freed activations leave RSS). The persistent state (parameters, buffers and
AdamW moments) is counted from the tensors. Peak = persistent + transient.

    python benchmarks/step_time.py                     # vit_small_patch16_224, 224 px, batch 8
    python benchmarks/step_time.py --model mixer_s16_224 --rounds 12
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _serve_large_blocks_by_mmap() -> None:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024)  # fixed: freed activations go back to the OS
    libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    tensors = list(model.parameters()) + list(model.buffers())
    tensors += [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in tensors)


def make_step(model: nn.Module, hook: object | None) -> tuple[Callable[[torch.Tensor, torch.Tensor], None], torch.optim.Optimizer]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        loss = F.cross_entropy(model(x), y)
        if hook is not None:
            loss = loss + hook.distill_loss()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if hook is not None:
            hook.step()

    return step, optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--rank-slack", type=float, default=0.25)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    _serve_large_blocks_by_mmap()
    import timm  # after mallopt, so every allocation follows it

    import tunecomp_fx
    from tunecomp_fx import StepHook

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    original = timm.create_model(args.model, pretrained=False, num_classes=10).eval()
    x = torch.randn(args.batch, 3, 224, 224)
    y = torch.randint(0, 10, (args.batch,))
    start = time.perf_counter()
    blend_model = tunecomp_fx.prepare(original, (x,), args.ratio, rank_slack=args.rank_slack)
    student_model = tunecomp_fx.prepare(original, (x,), args.ratio, rank_slack=args.rank_slack)
    print(f"prepared twice in {time.perf_counter() - start:.1f} s")
    # The blend stays on for the whole benchmark; the student model passes its blend's end at once.
    long_run = 10**6
    blend_hook = StepHook(blend_model, steps=long_run, blend_steps=long_run // 2)
    student_hook = StepHook(student_model, steps=long_run, blend_steps=1)
    student_hook.step()
    assert student_hook.teacher_removed and not blend_hook.teacher_removed
    plain_model = original.train()
    for model in (blend_model, student_model):
        model.train()
    modes = {
        "plain": make_step(plain_model, None) + (plain_model,),
        "blend": make_step(blend_model, blend_hook) + (blend_model,),
        "student": make_step(student_model, student_hook) + (student_model,),
    }
    names = list(modes)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    transient: dict[str, list[int]] = {name: [] for name in names}
    for round_index in range(args.warmup + args.rounds):
        order = names[round_index % 3 :] + names[: round_index % 3]
        for name in order:
            step = modes[name][0]
            before = _status_kib("VmRSS")
            _reset_peak_rss()
            begin = time.perf_counter()
            step(x, y)
            elapsed = time.perf_counter() - begin
            peak = _status_kib("VmHWM")
            if round_index >= args.warmup:
                seconds[name].append(elapsed)
                transient[name].append((peak - before) * 1024)
    results = {}
    for name in names:
        _, optimizer, model = modes[name]
        persistent = state_bytes(model, optimizer)
        results[name] = {
            "step_s_median": statistics.median(seconds[name]),
            "step_s_min": min(seconds[name]),
            "step_s_all": seconds[name],
            "persistent_bytes": persistent,
            "transient_peak_bytes": max(transient[name]),
            "peak_bytes": persistent + max(transient[name]),
        }
    plain = results["plain"]
    print(f"\n{args.model}, batch {args.batch}, 224 px, ratio {args.ratio}, rank slack {args.rank_slack}, "
          f"{args.threads} thread(s), {args.rounds} interleaved rounds; step time as median and min "
          "(the min is the least disturbed by other load on the machine)")
    print(
        f"{'mode':<8} {'median s':>9} {'x plain':>8} {'min s':>7} {'x plain':>8} {'state MiB':>10} "
        f"{'step peak MiB':>14} {'peak MiB':>9} {'x plain':>8}"
    )
    for name in names:
        r = results[name]
        print(
            f"{name:<8} {r['step_s_median']:9.3f} {r['step_s_median'] / plain['step_s_median']:8.2f} "
            f"{r['step_s_min']:7.3f} {r['step_s_min'] / plain['step_s_min']:8.2f} "
            f"{r['persistent_bytes'] / 2**20:10.1f} {r['transient_peak_bytes'] / 2**20:14.1f} "
            f"{r['peak_bytes'] / 2**20:9.1f} {r['peak_bytes'] / plain['peak_bytes']:8.2f}"
        )
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=2))


if __name__ == "__main__":
    main()
