"""tunecomp's ONNX translations (export/translations.py: attention, linear) against onnxscript's own, on
MiniLM and its training-free compressions at 0.7 (structured_width_probe.py's forms): every model
exported each way, all timed interleaved in one process (ONNX Runtime, CPU, 1 thread,
tunecomp_fx.export.cpu_session), at batch 1 and 32 on the benchmark's example texts.

Exports (--exports, the first is the one the others are compared with):
  onnxscript  onnxscript's translations only
  attention   tunecomp's scaled_dot_product_attention, onnxscript's linear (MatMul + Add)
  tunecomp    all of tunecomp's translations (what to_onnx does)

Writes a markdown table: median milliseconds under each export, the time against the first export,
each model's speedup over the original exported the same way, and that speedup as a share of the MAC bound.

    python benchmarks/export_translations.py --forms lowrank "prune_heads=0.5" --exports attention tunecomp \\
        -o benchmarks/results/export_translations/linear_run1.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from unittest.mock import patch

import torch

sys.path.insert(0, str(Path(__file__).parent))
from structured_width_probe import forms  # noqa: E402

from tunecomp_fx.export import compare_latency, to_onnx  # noqa: E402
from tunecomp_fx.export.translations import TRANSLATIONS  # noqa: E402
from tunecomp_fx.metrics import count_macs  # noqa: E402
from tunecomp_fx.sentiment import sentiment_task  # noqa: E402

EXPORTS = {
    "onnxscript": (),
    "attention": (torch.ops.aten.scaled_dot_product_attention.default,),
    "tunecomp": tuple(TRANSLATIONS),
}


def markdown_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--forms", nargs="+", default=["lowrank", "prune_heads=0.5"])
    parser.add_argument("--exports", nargs="+", choices=list(EXPORTS), default=["onnxscript", "tunecomp"])
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
        for export in args.exports:
            paths[f"{name}|{export}"] = folder / f"{name}.{export}.onnx"
            kept = {op: TRANSLATIONS[op] for op in EXPORTS[export]}
            with patch.dict(TRANSLATIONS, kept, clear=True):
                to_onnx(model, dict(task.example), paths[f"{name}|{export}"])
    first = args.exports[0]
    header = ["model", "batch", "MAC bound"]
    header += [f"{export} ms" for export in args.exports] + [f"{export} / {first}" for export in args.exports[1:]]
    header += [column for export in args.exports for column in (f"speedup ({export})", "% of bound")]
    lines = [
        f"Command: `python {' '.join(sys.argv)}`",
        "",
        f"ONNX Runtime, CPU, 1 thread, cpu_session, median of {args.repeats} interleaved runs; speedups are over "
        "the original exported the same way; MAC bound = the original's MACs / the model's (count_macs).",
        "",
        markdown_row(header),
        markdown_row(["---"] * len(header)),
    ]
    for batch in (1, 32):
        inputs = {name: value[:1].expand(batch, *value.shape[1:]).contiguous().numpy() for name, value in task.example.items()}
        ms = {label: result.median_ms for label, result in compare_latency(
            paths, inputs, baseline=f"original|{first}", repeats=args.repeats, threads=1, warmup=2).results.items()}
        for name in models:
            times = [ms[f"{name}|{export}"] for export in args.exports]
            speedups = [ms[f"original|{export}"] / ms[f"{name}|{export}"] for export in args.exports]
            cells = [name, str(batch), f"x{bounds[name]:.2f}"] + [f"{time:.2f}" for time in times]
            cells += [f"{time / times[0]:.3f}" for time in times[1:]]
            cells += [cell for speedup in speedups for cell in (f"x{speedup:.2f}", f"{100 * speedup / bounds[name]:.1f}%")]
            lines.append(markdown_row(cells))
            print(lines[-1], flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
