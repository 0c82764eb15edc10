"""ONNX Runtime's default CPU session against tunecomp_fx.export.cpu_session (which turns off the
graph fusions in SLOW_CPU_FUSIONS), on the same ONNX models, timed interleaved in one process.

Writes a markdown table of median milliseconds and each model's speedup over the first model under
either session, at batch 1 and 32 (token ids, `--length` tokens, 1 thread by default).

    python benchmarks/ort_fusions.py benchmarks/results/minilm_sentiment/onnx/ft.onnx \\
        "benchmarks/results/minilm_sentiment/onnx/joint@0.7.onnx" -o benchmarks/results/minilm_sentiment/ort_fusions.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

from tunecomp_fx.export import SLOW_CPU_FUSIONS, compare_latency, cpu_session


def ort_default_session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", type=Path, nargs="+", help="ONNX files taking token ids; the first is the baseline")
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args()
    lines = [
        f"Command: `python {' '.join(sys.argv)}`",
        "",
        f"ONNX Runtime {ort.__version__}, CPU, {args.threads} thread(s), {args.length} tokens, median of {args.repeats} "
        f"interleaved runs. 'default': ORT's session defaults; 'cpu_session': without {', '.join(SLOW_CPU_FUSIONS)}.",
        "",
        "| model | batch | default ms | cpu_session ms | cpu_session / default | speedup (default) | speedup (cpu_session) |",
        "|---|---|---|---|---|---|---|",
    ]
    for batch in (1, 32):
        sessions = {}
        for path in args.models:
            sessions[f"{path.name}|default"] = ort_default_session(path, args.threads)
            sessions[f"{path.name}|cpu_session"] = cpu_session(path, args.threads)
        inputs = {i.name: np.ones((batch, args.length), dtype=np.int64) for i in next(iter(sessions.values())).get_inputs()}
        baseline = args.models[0].name
        ms = compare_latency(sessions, inputs, baseline=f"{baseline}|default", repeats=args.repeats, warmup=2).results
        for path in args.models:
            default, trimmed = ms[f"{path.name}|default"].median_ms, ms[f"{path.name}|cpu_session"].median_ms
            speedup_default = ms[f"{baseline}|default"].median_ms / default
            speedup_trimmed = ms[f"{baseline}|cpu_session"].median_ms / trimmed
            lines.append(
                f"| {path.name} | {batch} | {default:.2f} | {trimmed:.2f} | {trimmed / default:.2f} | "
                f"x{speedup_default:.2f} | x{speedup_trimmed:.2f} |"
            )
            print(lines[-1], flush=True)
    args.output.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
