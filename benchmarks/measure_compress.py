"""Issue 2's measurement: training-free compress of a timm model (random init) at a ratio, with a
per-pass wall-time breakdown, parameter and MAC ratios, and ONNX Runtime latency of the compact
model against the original at two batch sizes, interleaved in one run.

    .venv/bin/python benchmarks/measure_compress.py --model vit_base_patch16_224 --ratio 0.4
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import timm
import torch

import tunecomp_fx
from tunecomp_fx.export import compare_latency, to_onnx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--batches", default="1,8", help="ONNX Runtime batch sizes")
    parser.add_argument("--calib-batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()

    torch.manual_seed(0)
    model = timm.create_model(args.model).eval()
    x = torch.randn(args.calib_batch, 3, 224, 224)
    start = time.perf_counter()
    compact = tunecomp_fx.compress(model, (x,), ratio=args.ratio, progress=True)
    wall = time.perf_counter() - start
    report = tunecomp_fx.get_report(compact)
    print(f"\ncompress wall time: {wall:.1f} s")
    results = {
        "model": args.model,
        "ratio": args.ratio,
        "compress_seconds": wall,
        "pass_seconds": report.pass_seconds,
        **report.totals(),
        "params_before": report.model_params_before,
        "params_after": report.model_params_after,
        "latency": {},
    }
    with tempfile.TemporaryDirectory() as folder:
        paths = {"original": Path(folder) / "original.onnx", "compact": Path(folder) / "compact.onnx"}
        for label, module in (("original", model), ("compact", compact)):
            exported = to_onnx(module, (x[:2],), paths[label])
            print(f"{label}: exported with {exported.exporter}, max ORT error {max(exported.max_errors.values()):.2e}")
        for batch in (int(b) for b in args.batches.split(",")):
            inputs = (torch.randn(batch, 3, 224, 224).numpy(),)
            comparison = compare_latency(paths, inputs, baseline="original", repeats=args.repeats, threads=args.threads)
            speedup = comparison.speedups["compact"]
            results["latency"][batch] = {
                "original_ms": comparison.results["original"].median_ms,
                "compact_ms": comparison.results["compact"].median_ms,
                "speedup": speedup,
                "speedup_over_mac_ideal": speedup * report.mac_ratio,
            }
    print(report)
    print(json.dumps({k: v for k, v in results.items() if k != "pass_seconds"}, indent=2))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"compress_{args.model}_{args.ratio}.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
