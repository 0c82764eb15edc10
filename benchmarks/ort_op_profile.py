"""Where ONNX Runtime spends its time, by operator type: what compressing the linear layers can
speed up (MatMul / Gemm) and what it leaves as it is (normalization, activations, attention glue).

Runs the models with ONNX Runtime's profiler (CPU, 1 thread, interleaved) on a batch of token ids,
sums kernel times per operator type, and compares every model with the first one: total speedup,
MatMul-only speedup, and, given each model's fraction of the baseline's MACs (--macs-kept), the MAC bound
(1 / fraction) beside the ceiling left when only MatMul time shrinks by that fraction and the other
operators take what they took in the baseline (Amdahl's law).

    python benchmarks/ort_op_profile.py benchmarks/results/minilm_sentiment/onnx/ft.onnx \\
        "benchmarks/results/minilm_sentiment/onnx/joint@0.7.onnx" --macs-kept 1 0.298 --batch 32 --length 32
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

from tunecomp_fx.export import cpu_session

MATMUL_OPS = ("MatMul", "FusedMatMul", "Gemm", "MatMulInteger")


def op_times(paths: list[Path], batch: int, length: int, runs: int) -> dict[str, dict[str, float]]:
    """Milliseconds per run by operator type, for each model; the models' runs are interleaved, so
    that a machine slowing down mid-way weighs on all of them alike."""
    sessions = {}
    for path in paths:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "profile")
        sessions[path.name] = cpu_session(path, options=options)
    feeds = {i.name: np.ones((batch, length), dtype=np.int64) for i in next(iter(sessions.values())).get_inputs()}
    for _ in range(runs + 1):  # the first is a warm-up, profiled too: divided out below
        for session in sessions.values():
            session.run(None, feeds)
    times = {}
    for name, session in sessions.items():
        events = json.loads(Path(session.end_profiling()).read_text())
        totals: collections.Counter[str] = collections.Counter()
        for event in events:
            if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
                totals[event["args"]["op_name"]] += event["dur"]
        times[name] = {op: microseconds / (runs + 1) / 1000 for op, microseconds in totals.items()}
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", type=Path, nargs="+", help="ONNX files; the first is the baseline")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--macs-kept", type=float, nargs="+", help="each model's MACs over the baseline's, in model order")
    args = parser.parse_args()
    if args.macs_kept is not None and len(args.macs_kept) != len(args.models):
        parser.error(f"--macs-kept takes one fraction per model: got {len(args.macs_kept)} for {len(args.models)} models")
    profiles = op_times(args.models, args.batch, args.length, args.runs)
    base_name, base = next(iter(profiles.items()))
    base_total = sum(base.values())
    base_matmul = sum(t for op, t in base.items() if op in MATMUL_OPS)
    print(f"batch {args.batch} x {args.length} tokens, 1 thread; baseline {base_name}: {base_total:.1f} ms, "
          f"{100 * base_matmul / base_total:.1f}% in MatMul")
    for index, (name, ops) in enumerate(profiles.items()):
        total = sum(ops.values())
        matmul = sum(t for op, t in ops.items() if op in MATMUL_OPS)
        rest = ", ".join(f"{op} {100 * t / total:.1f}%" for op, t in sorted(ops.items(), key=lambda kv: -kv[1])[:6])
        print(f"{name}: {total:.1f} ms (x{base_total / total:.2f}); MatMul {matmul:.1f} ms (x{base_matmul / matmul:.2f}), "
              f"other ops {total - matmul:.1f} ms; top: {rest}")
        if args.macs_kept is not None:
            kept = args.macs_kept[index]
            bound, ceiling = 1 / kept, base_total / (base_matmul * kept + base_total - base_matmul)
            speedup = base_total / total
            print(f"    MAC bound x{bound:.2f}; ceiling with the other ops unchanged x{ceiling:.2f} "
                  f"({100 * ceiling / bound:.0f}% of the bound); measured: {100 * speedup / bound:.0f}% of the bound, "
                  f"{100 * speedup / ceiling:.0f}% of the ceiling")
    return 0


if __name__ == "__main__":
    sys.exit(main())
