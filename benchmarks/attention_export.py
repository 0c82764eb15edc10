"""tunecomp's ONNX translation of scaled_dot_product_attention (export/attention.py) against
onnxscript's own, on MiniLM and its training-free compressions at 0.7 (structured_width_probe.py's
forms): every model exported both ways, all timed interleaved in one process (ONNX Runtime, CPU,
1 thread, tunecomp_fx.export.cpu_session), at batch 1 and 32 on the benchmark's example texts.

Writes a markdown table: median milliseconds under each export, each model's speedup over the
original exported the same way, and that speedup as a share of the MAC bound.

    python benchmarks/attention_export.py --forms lowrank "prune_heads=0.5" -o benchmarks/results/attention_export/run1.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from unittest.mock import patch

sys.path.insert(0, str(Path(__file__).parent))
from structured_width_probe import forms  # noqa: E402

from tunecomp_fx.export.attention import TRANSLATIONS  # noqa: E402
from tunecomp_fx.export import compare_latency, to_onnx  # noqa: E402
from tunecomp_fx.metrics import count_macs  # noqa: E402
from tunecomp_fx.sentiment import sentiment_task  # noqa: E402

EXPORTS = ("onnxscript", "tunecomp")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--forms", nargs="+", default=["lowrank", "prune_heads=0.5"])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args()
    task = sentiment_task(max_length=32, batch_size=16)  # the quick profile's texts and head
    built = forms(task)
    unknown = set(args.forms) - set(built)
    if unknown:
        parser.error(f"unknown forms {sorted(unknown)}; choose from {list(built)}")
    models = {"original": task.model, **{name: built[name]() for name in args.forms}}
    macs_before = count_macs(task.model, task.example)
    bounds = {name: macs_before / count_macs(model, task.example) for name, model in models.items()}
    folder = args.output.parent / "onnx"
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, model in models.items():
        for export in EXPORTS:
            paths[f"{name}|{export}"] = folder / f"{name}.{export}.onnx"
            with patch.dict(TRANSLATIONS, clear=export == "onnxscript"):  # empty: the exporter's own
                to_onnx(model, dict(task.example), paths[f"{name}|{export}"])
    lines = [
        f"Command: `python {' '.join(sys.argv)}`",
        "",
        f"ONNX Runtime, CPU, 1 thread, cpu_session, median of {args.repeats} interleaved runs; speedups are over "
        "the original exported the same way; MAC bound = the original's MACs / the model's (count_macs).",
        "",
        "| model | batch | onnxscript ms | tunecomp ms | tunecomp / onnxscript | MAC bound "
        "| speedup (onnxscript) | % of bound | speedup (tunecomp) | % of bound |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for batch in (1, 32):
        inputs = {name: value[:1].expand(batch, *value.shape[1:]).contiguous().numpy() for name, value in task.example.items()}
        ms = {label: result.median_ms for label, result in compare_latency(
            paths, inputs, baseline="original|tunecomp", repeats=args.repeats, threads=1, warmup=2).results.items()}
        for name in models:
            speedups = {export: ms[f"original|{export}"] / ms[f"{name}|{export}"] for export in EXPORTS}
            before, after = ms[f"{name}|onnxscript"], ms[f"{name}|tunecomp"]
            lines.append(
                f"| {name} | {batch} | {before:.2f} | {after:.2f} | {after / before:.3f} | x{bounds[name]:.2f} | "
                + " | ".join(f"x{speedups[e]:.2f} | {100 * speedups[e] / bounds[name]:.1f}%" for e in EXPORTS) + " |"
            )
            print(lines[-1], flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
