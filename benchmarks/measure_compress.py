"""Training-free compress of a timm model (random init) at a ratio, in one or more forms, with a
per-pass wall-time breakdown, parameter and MAC ratios, and ONNX Runtime latency of every compact
model against the original at two batch sizes, all interleaved in one run.

A form is `lowrank` (the default compress) or CompressionConfig options, e.g. `prune_heads=0.5` or
`prune_neurons=0.5,prune_heads=0.5` (the ranks take the rest of the ratio).

    .venv/bin/python benchmarks/measure_compress.py --model vit_base_patch16_224 --ratio 0.4
    .venv/bin/python benchmarks/measure_compress.py --model vit_small_patch16_224 --ratio 0.5 \\
        --forms lowrank prune_heads=0.5 prune_neurons=0.5,prune_heads=0.5 --json vit_small_forms.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import timm
import torch

import tunecomp_fx
from tunecomp_fx.export import compare_latency, to_onnx


def form_options(form: str) -> dict[str, float | int]:
    """'lowrank' -> {}; 'prune_heads=0.5,rank_multiple=16' -> {'prune_heads': 0.5, 'rank_multiple': 16}."""
    if form == "lowrank":
        return {}
    options = dict(item.split("=", 1) for item in form.split(","))
    return {name: int(value) if value.isdigit() else float(value) for name, value in options.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--forms", nargs="+", default=["lowrank"], help="lowrank, or OPTION=VALUE[,OPTION=VALUE]")
    parser.add_argument("--batches", default="1,8", help="ONNX Runtime batch sizes")
    parser.add_argument("--calib-batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--json", help="result file name in --out (default compress_MODEL_RATIO.json)")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = timm.create_model(args.model).eval()
    x = torch.randn(args.calib_batch, 3, 224, 224)
    results: dict[str, Any] = {"model": args.model, "ratio": args.ratio, "forms": {}, "original_ms": {}}
    compacts = {}
    for form in args.forms:
        start = time.perf_counter()
        compacts[form] = tunecomp_fx.compress(model, (x,), ratio=args.ratio, progress=True, **form_options(form))
        wall = time.perf_counter() - start
        report = tunecomp_fx.get_report(compacts[form])
        print(f"\n{form}: compress wall time {wall:.1f} s\n{report}")
        results["forms"][form] = {
            "compress_seconds": wall,
            "pass_seconds": report.pass_seconds,
            **report.totals(),
            "params_before": report.model_params_before,
            "params_after": report.model_params_after,
            "latency": {},
        }
    with tempfile.TemporaryDirectory() as folder:
        paths = {label: Path(folder) / f"model{index}.onnx" for index, label in enumerate(["original", *args.forms])}
        for label, module in (("original", model), *compacts.items()):
            exported = to_onnx(module, (x[:2],), paths[label])
            print(f"{label}: exported with {exported.exporter}, max ORT error {max(exported.max_errors.values()):.2e}")
        for batch in (int(b) for b in args.batches.split(",")):
            inputs = (torch.randn(batch, 3, 224, 224).numpy(),)
            comparison = compare_latency(paths, inputs, baseline="original", repeats=args.repeats, threads=args.threads)
            results["original_ms"][batch] = comparison.results["original"].median_ms
            for form, row in results["forms"].items():
                speedup = comparison.speedups[form]
                row["latency"][batch] = {
                    "compact_ms": comparison.results[form].median_ms,
                    "speedup": speedup,
                    "speedup_over_mac_ideal": speedup * row["mac_ratio"],
                }
    print(json.dumps({**results, "forms": {f: {k: v for k, v in r.items() if k != "pass_seconds"} for f, r in results["forms"].items()}}, indent=2))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / (args.json or f"compress_{args.model}_{args.ratio}.json")).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
