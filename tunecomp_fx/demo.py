"""The demo behind `make demo` and `tunecomp-fx demo`: compress timm's ViT-Tiny (random init, so
nothing is downloaded; training-free) at ratio 0.4, save the compact model, export the original and
the compact model to ONNX, and time both in ONNX Runtime side by side.

    python -m tunecomp_fx.demo [--output out/demo] [--ratio 0.4] [--repeats 20] [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from tunecomp_fx.errors import TunecompError
from tunecomp_fx.report import format_table

SUMMARY = "compress ViT-Tiny, export it to ONNX and time it against the original"
DESCRIPTION = (
    "Compress timm's vit_tiny_patch16_224 (random init, training-free), save the compact model with its "
    "report and plots, export original and compact models to ONNX and compare their ONNX Runtime latency."
)
MODEL = "vit_tiny_patch16_224"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", default="out/demo", help="output folder (default out/demo)")
    parser.add_argument("--ratio", type=float, default=0.4, help="fraction of linear-layer parameters to remove (default 0.4)")
    parser.add_argument("--repeats", type=int, default=20, help="timed ONNX Runtime runs per model (default 20)")
    parser.add_argument("--quick", action="store_true", help="a 2-block ViT at 64x64 pixels: a smoke test in seconds")


def _latency_table(rows: list[dict[str, object]]) -> str:
    header = ["model", "params", "MACs", "ORT median ms", "ORT p90 ms", "speedup", "MAC bound"]
    cells = [
        [
            str(r["model"]),
            f"{r['params']:,}",
            f"{r['macs']:,}",
            f"{r['median_ms']:.2f}",
            f"{r['p90_ms']:.2f}",
            f"x{r['speedup']:.2f}",
            f"x{r['mac_bound']:.2f}",
        ]
        for r in rows
    ]
    return "\n".join(format_table([header] + cells))


def run(args: argparse.Namespace) -> int:
    import timm

    from tunecomp_fx import export
    from tunecomp_fx.api import compress, get_report
    from tunecomp_fx.cli import describe_export
    from tunecomp_fx.export.artifacts import save_compact
    from tunecomp_fx.plots import plot_rank_allocation

    if not hasattr(export, "to_onnx"):  # fail before the slow part
        raise TunecompError("this build of tunecomp_fx has no ONNX exporter (tunecomp_fx.export.to_onnx)")
    output = Path(args.output)
    size = 64 if args.quick else 224
    torch.manual_seed(0)
    model = timm.create_model(MODEL, pretrained=False, **({"img_size": size, "depth": 2} if args.quick else {})).eval()
    example = (torch.randn(1, 3, size, size),)
    # A few more rows than the widest site has features, so that every input covariance is full rank.
    calibration = [(torch.randn(4, 3, size, size),)]
    print(f"compressing {MODEL}{' (quick: 2 blocks, 64x64)' if args.quick else ''} at ratio {args.ratio}")
    compact = compress(model, example, ratio=args.ratio, calib=calibration, progress=True)
    report = get_report(compact)
    print()
    print(report)
    saved = save_compact(compact, output / "compact", example)
    plot = plot_rank_allocation(report, output / "rank_allocation.png")

    paths = {"original": output / "original.onnx", "compact": output / "compact.onnx"}
    for label, module in (("original", model), ("compact", compact)):
        print(f"\nexporting the {label} model to ONNX")
        print(describe_export(export.to_onnx(module, example, paths[label])))
    print(f"\ntiming ONNX Runtime: {args.repeats} interleaved runs of each model")
    comparison = export.compare_latency(paths, example, baseline="original", repeats=args.repeats)
    counts = {
        "original": (report.model_params_before, report.model_macs_before),
        "compact": (report.model_params_after, report.model_macs_after),
    }
    rows = [
        {
            "model": label,
            "params": counts[label][0],
            "macs": counts[label][1],
            "median_ms": result.median_ms,
            "p90_ms": result.p90_ms,
            "speedup": comparison.speedups[label],
            "mac_bound": report.model_macs_before / counts[label][1],
        }
        for label, result in comparison.results.items()
    ]
    (output / "latency.json").write_text(json.dumps(rows, indent=2) + "\n")
    print()
    print(_latency_table(rows))
    print(f"\nartifacts in {output}:")
    for path in (*saved.files, plot, *paths.values(), output / "latency.json"):
        print(f"  {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from tunecomp_fx.cli import main as cli_main

    return cli_main(["demo", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
