"""Where ONNX Runtime spends its time, by operator type: what compressing the linear layers can
speed up (MatMul / Gemm) and what it leaves as it is (normalization, activations, attention glue).

Runs each model with ONNX Runtime's profiler (CPU, 1 thread) on a batch of token ids, sums kernel
times per operator type, and compares every model with the first one: total speedup, MatMul-only
speedup, and the end-to-end speedup that the MAC ratio would allow if only MatMul time shrank.

    python benchmarks/ort_op_profile.py benchmarks/results/minilm_sentiment/onnx/ft.onnx \\
        "benchmarks/results/minilm_sentiment/onnx/joint@0.7.onnx" --batch 32 --length 32
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


def op_times(path: Path, batch: int, length: int, runs: int) -> dict[str, float]:
    """Milliseconds per run by operator type."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "profile")
    session = cpu_session(path, options=options)
    feeds = {i.name: np.ones((batch, length), dtype=np.int64) for i in session.get_inputs()}
    session.run(None, feeds)  # warm-up, profiled too: subtracted below by counting runs
    for _ in range(runs):
        session.run(None, feeds)
    events = json.loads(Path(session.end_profiling()).read_text())
    totals: collections.Counter[str] = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            totals[event["args"]["op_name"]] += event["dur"]
    return {op: microseconds / (runs + 1) / 1000 for op, microseconds in totals.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", type=Path, nargs="+", help="ONNX files; the first is the baseline")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--runs", type=int, default=8)
    args = parser.parse_args()
    profiles = {path.name: op_times(path, args.batch, args.length, args.runs) for path in args.models}
    base_name, base = next(iter(profiles.items()))
    base_total = sum(base.values())
    base_matmul = sum(t for op, t in base.items() if op in MATMUL_OPS)
    print(f"batch {args.batch} x {args.length} tokens, 1 thread; baseline {base_name}: {base_total:.1f} ms, "
          f"{100 * base_matmul / base_total:.1f}% in MatMul")
    for name, ops in profiles.items():
        total = sum(ops.values())
        matmul = sum(t for op, t in ops.items() if op in MATMUL_OPS)
        rest = ", ".join(f"{op} {100 * t / total:.1f}%" for op, t in sorted(ops.items(), key=lambda kv: -kv[1])[:6])
        print(f"{name}: {total:.1f} ms (x{base_total / total:.2f}); MatMul {matmul:.1f} ms (x{base_matmul / matmul:.2f}), "
              f"other ops {total - matmul:.1f} ms; top: {rest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
