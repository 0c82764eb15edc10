"""Model coverage sweep: for each model, training-free `compress(ratio=0.4)`, ONNX export of the original
and of the compact model with dynamic axes, ONNX Runtime verification at two shapes per dynamic axis,
and the ONNX Runtime latency of both, side by side in one run.

    python benchmarks/coverage.py                      # the whole list -> benchmarks/results/coverage.{md,json}
    python benchmarks/coverage.py --models resnet50    # a subset (names as in MODELS)

timm and torchvision models are randomly initialized (coverage, not accuracy); all-MiniLM-L6-v2 is
the pretrained encoder with a new 2-class head, fed real sentences. Each model runs in its own
process, so that one failure or one large model does not disturb the others.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
RATIO = 0.4
BATCH = 2
TEXT_SENTENCES, TEXT_MAX_LENGTH = 8, 64
# ONNX Runtime latency: one intra-op thread (this machine's 2 cores are shared with other jobs, and
# threads waiting on a busy core make timings swing by +-30%), interleaved runs for at least this long.
ORT_THREADS, TIMING_SECONDS, MIN_REPEATS = 1, 6.0, 20

MODELS = [
    "timm:vit_tiny_patch16_224",
    "timm:deit_small_patch16_224",
    "timm:swin_tiny_patch4_window7_224",
    "timm:mixer_b16_224",
    "timm:levit_128",
    "timm:pvt_v2_b0",
    "timm:beit_base_patch16_224",
    "timm:maxvit_tiny_tf_224",
    "timm:mobilevit_xxs",
    "timm:efficientvit_b0",
    "timm:convnext_atto",
    "timm:resnet18",
    "timm:mobilenetv3_small_100",
    "torchvision:vit_b_16",
    "torchvision:swin_t",
    "torchvision:mobilenet_v2",
    "torchvision:resnet50",
    "hf:all-MiniLM-L6-v2",
]


def build(spec: str):
    """(model, example inputs, ONNX dynamic dims beyond batch, input description)."""
    import torch

    source, name = spec.split(":", 1)
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if source == "hf":
        from tunecomp_fx.data import load_minilm_classifier, load_rotten_tomatoes, tokenize

        model, tokenizer = load_minilm_classifier(num_labels=2)
        texts = [text for text, _ in list(load_rotten_tomatoes().train)[:TEXT_SENTENCES]]
        inputs = tokenize(tokenizer, texts, max_length=TEXT_MAX_LENGTH)
        dims = {key: {1: "sequence"} for key in inputs}
        return model, inputs, dims, f"{TEXT_SENTENCES} sentences, padded length {inputs['input_ids'].shape[1]}"
    if source == "timm":
        import timm

        model = timm.create_model(name, pretrained=False)
        size = tuple(model.default_cfg["input_size"])
    else:
        import torchvision

        model = getattr(torchvision.models, name)(weights=None)
        size = (3, 224, 224)
    with torch.no_grad():
        # timm's Mixer and torchvision's ViT start with an all-zero classifier: the outputs would be
        # zero and their ONNX check empty. Random weights there instead.
        for parameter in model.parameters():
            if parameter.dim() > 1 and not parameter.any():
                parameter.normal_(0.0, 0.02, generator=generator)
    x = torch.randn(BATCH, *size, generator=generator)
    return model.eval(), (x,), None, "x".join(map(str, x.shape))


def run_one(spec: str) -> dict:
    import torch

    import tunecomp_fx
    from tunecomp_fx.export import compare_latency, to_onnx

    row: dict = {"model": spec}
    stage = "build"
    try:
        model, inputs, dims, described = build(spec)
        row["inputs"] = described
        stage = "compress"
        start = time.perf_counter()
        compact = tunecomp_fx.compress(model, inputs, ratio=RATIO)
        row["compress_s"] = time.perf_counter() - start
        report = tunecomp_fx.get_report(compact)
        decisions = Counter(site.decision for site in report.sites)
        left_alone = Counter(f"{site.decision}: {site.reason.split(' (')[0]}" for site in report.sites if site.decision not in ("rank", "dense"))
        row.update(
            capture_path=report.capture_path,
            capture_reason=report.capture_reason,
            sites_found=len(report.sites),
            sites_compressed=len(report.compressed_rows),
            factorized=decisions["rank"],
            dense_at_break_even=decisions["dense"],
            left_alone=dict(left_alone),
            forms=dict(Counter(f"{site.form}{' 1x1 conv' if site.layout == 'conv1x1' else ''}" for site in report.compressed_rows)),
            kept_fraction=report.kept_fraction,
            param_ratio=report.param_ratio,
            mac_ratio=report.mac_ratio,
        )
        with tempfile.TemporaryDirectory() as folder:
            paths = {"original": Path(folder) / "original.onnx", "compact": Path(folder) / "compact.onnx"}
            stage = "export"
            seconds = {}
            for label, module in (("original", model), ("compact", compact)):
                start = time.perf_counter()
                result = to_onnx(module, inputs, paths[label], dynamic_dims=dims)
                seconds[label] = time.perf_counter() - start
                row[f"{label}_onnx"] = {"exporter": result.exporter, "max_errors": result.max_errors, "dynamic_axes": result.dynamic_axes}
            row["export_s"] = seconds
            with torch.no_grad():
                outputs = compact(**inputs) if isinstance(inputs, dict) else compact(*inputs)
            first = outputs if isinstance(outputs, torch.Tensor) else next(iter(outputs.values()))
            row["output_scale"] = float(first.abs().max())
            row["onnx_max_error"] = max(row["compact_onnx"]["max_errors"].values())
            stage = "latency"
            probe = compare_latency(paths, inputs, baseline="original", warmup=2, repeats=3, threads=ORT_THREADS)
            per_round_s = sum(result.median_ms for result in probe.results.values()) / 1e3
            repeats = max(MIN_REPEATS, int(TIMING_SECONDS / per_round_s))
            latency = compare_latency(paths, inputs, baseline="original", warmup=3, repeats=repeats, threads=ORT_THREADS)
            row["ort_repeats"], row["ort_threads"] = repeats, ORT_THREADS
            row["ort_ms"] = {label: result.median_ms for label, result in latency.results.items()}
            row["ort_speedup"] = latency.speedups["compact"]
    except Exception as error:
        row["error"] = f"{stage}: {type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        row["traceback"] = traceback.format_exc(limit=-4)
    return row


def markdown(rows: list[dict], seconds: float) -> str:
    header = (
        "| model | inputs | capture | sites found | compressed (rank / dense) | left alone | kept | params | MACs "
        "| ONNX max error (output scale) | ORT ms original -> compact | ORT speedup | error |"
    )
    lines = [
        "# Model coverage: compress(ratio=0.4) + ONNX export + ONNX Runtime verification",
        "",
        f"Command: `python benchmarks/coverage.py` (torch {_version('torch')}, onnxruntime {_version('onnxruntime')}, "
        f"{os.cpu_count()} CPU cores); {seconds / 60:.0f} min. Random initialization for timm and torchvision; "
        "all-MiniLM-L6-v2 pretrained with a new 2-class head on real sentences. Batch "
        f"{BATCH} (vision). ONNX Runtime is verified against PyTorch at the example shapes and at one more size of "
        "every dynamic axis (batch + 1; for text also sequence - 1); the error column is the compact model's "
        "largest absolute error over those shapes, with the largest output magnitude beside it. Latency: the "
        f"medians of interleaved runs (at least {MIN_REPEATS}, at least {TIMING_SECONDS:.0f} s per model pair) at "
        f"the example shapes, ONNX Runtime CPU with {ORT_THREADS} intra-op thread. `kept` is the kept fraction of "
        "the compressed sites (target 0.6); params and MACs are whole-model ratios. All-zero weight matrices of the "
        "random initialization (the classifiers of timm's Mixer and torchvision's ViT) are drawn from N(0, 0.02) "
        "so that the outputs checked are not zero.",
        "",
        header,
        "|" + "---|" * (header.count("|") - 1),
    ]
    for row in rows:
        if "sites_found" not in row:
            lines.append(f"| {row['model']} | {row.get('inputs', '')} | | | | | | | | | | | {row['error']} |")
            continue
        left = "; ".join(f"{count} {why}" for why, count in row["left_alone"].items()) or "-"
        error = row.get("error", "")
        onnx = f"{row['onnx_max_error']:.2g} ({row['output_scale']:.2g})" if "onnx_max_error" in row else ""
        ms = f"{row['ort_ms']['original']:.1f} -> {row['ort_ms']['compact']:.1f}" if "ort_ms" in row else ""
        speedup = f"{row['ort_speedup']:.2f}x" if "ort_speedup" in row else ""
        lines.append(
            f"| {row['model']} | {row['inputs']} | {row['capture_path']} | {row['sites_found']} | "
            f"{row['sites_compressed']} ({row['factorized']} / {row['dense_at_break_even']}) | {left} | "
            f"{row['kept_fraction']:.3f} | {row['param_ratio']:.3f} | {row['mac_ratio']:.3f} | {onnx} | {ms} | {speedup} | {error} |"
        )
    passed = [row for row in rows if "ort_speedup" in row and "error" not in row]
    lines += [
        "",
        f"**{len(passed)} of {len(rows)} models compress, export and verify in ONNX Runtime.**",
        "",
        "Capture reasons (torch.export is used where symbolic tracing fails or hides compressible layers):",
        "",
    ]
    lines += [f"- {row['model']}: {row['capture_reason']}" for row in rows if "capture_reason" in row]
    lines += ["", "Site forms compressed:", ""]
    lines += [f"- {row['model']}: " + ", ".join(f"{form} {count}" for form, count in row["forms"].items()) for row in rows if "forms" in row]
    return "\n".join(lines) + "\n"


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", help="a subset: names as in MODELS, with or without the source prefix")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one model, print its JSON row
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per model")
    parser.add_argument("--out", type=Path, default=RESULTS / "coverage", help="results path without extension")
    args = parser.parse_args()
    if args.one:
        print("COVERAGE_ROW " + json.dumps(run_one(args.one)))
        return
    chosen = [spec for spec in MODELS if not args.models or spec in args.models or spec.split(":", 1)[1] in args.models]
    rows, start = [], time.perf_counter()
    for spec in chosen:
        print(f"{spec} ...", flush=True)
        env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore"}
        try:
            done = subprocess.run(
                [sys.executable, __file__, "--one", spec], capture_output=True, text=True, timeout=args.timeout, env=env
            )
            found = [line for line in done.stdout.splitlines() if line.startswith("COVERAGE_ROW ")]
            row = json.loads(found[-1].removeprefix("COVERAGE_ROW ")) if found else {
                "model": spec, "error": f"process exited with {done.returncode}: {done.stderr.strip().splitlines()[-1:]}"
            }
        except subprocess.TimeoutExpired:
            row = {"model": spec, "error": f"timed out after {args.timeout} s"}
        rows.append(row)
        print(f"  {row.get('error') or 'ok'} {row.get('ort_speedup', '')}", flush=True)
    seconds = time.perf_counter() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"ratio": RATIO, "seconds": seconds, "rows": rows}, indent=2))
    args.out.with_suffix(".md").write_text(markdown(rows, seconds))
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
