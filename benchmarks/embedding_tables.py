"""What compress_embeddings buys on MiniLM: the demo's joint run (Rotten Tomatoes, 240 steps of batch
16, 32 tokens; the demo's recipe until 2026-12-07, lr 2e-4 and the cosine over the whole run) with
the linear layers alone compressed, with the word embedding table (30522 x 384, half the model's
parameters) compressed too at the same ratio, with it at the ratio that keeps as
many parameters as the first, and both forms at the same ratio with each student pruned to its own
allocated rank (rank_selection="site"; the default "global" moves ranks between the linear sites,
the tables keep their own schedule). Test accuracy, parameters, MACs and ONNX Runtime latency against the
uncompressed model fine-tuned on the same batches (1 thread, interleaved; the first seed's models).

    python benchmarks/embedding_tables.py [--seeds 0 1 2 3] [--ratio 0.4] [--steps 240] [-o benchmarks/results/embedding_tables]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from tunecomp_fx.api import compress, get_report
from tunecomp_fx.finetune import evaluate, finetune
from tunecomp_fx.metrics import count_macs, count_parameters
from tunecomp_fx.sentiment import onnx_latency, sentiment_task
from tunecomp_fx.train import TrainingConfig

sys.path.insert(0, str(Path(__file__).parent))
from seed_summary import mean_and_error, seed_cells  # noqa: E402


def _equal_params_ratio(tables: Any, linear_params_after: int) -> float:
    """The ratio at which compressing the tables too keeps `linear_params_after` parameters in the
    whole model: what the linear-only run removed, over what the tables run compresses."""
    compressible = sum(row.params_before for row in tables.sites if row.decision in ("rank", "dense", "removed"))
    return (tables.model_params_before - linear_params_after) / compressible


def run_seed(seed: int, ratio: float, steps: int) -> tuple[dict[str, dict[str, Any]], dict[str, Any], Any]:
    task = sentiment_task(batch_size=16, seed=seed, max_length=32)
    recipe = TrainingConfig(steps=steps, lr=2e-4, lr_decay="cosine")  # the demo's recipe when the stored results were made
    models = {"original": finetune(copy.deepcopy(task.model), task.train, recipe, desc="fine-tune")}
    rows: dict[str, dict[str, Any]] = {}

    def joint(label: str, at: float, training: TrainingConfig = recipe, **options: Any) -> Any:
        task.train.generator.manual_seed(seed)  # every run sees the same batches in the same order
        compact = compress(task.model, task.example, at, calib=task.calibration, data=task.train, training=training, progress=True, **options)
        report = get_report(compact)
        models[label] = compact
        rows[label] = {
            "ratio": at, "accuracy": evaluate(compact, task.test), "params": report.model_params_after,
            "macs": report.model_macs_after // len(task.example["input_ids"]),
        }  # fmt: skip
        print(json.dumps({"seed": seed, "form": label, **rows[label]}), flush=True)
        return report

    rows["original"] = {
        "ratio": 0.0, "accuracy": evaluate(models["original"], task.test), "params": count_parameters(models["original"]),
        "macs": count_macs(models["original"], task.example) // len(task.example["input_ids"]),
    }  # fmt: skip
    joint("linear layers", ratio)
    joint("linear layers, per-site selection", ratio, dataclasses.replace(recipe, rank_selection="site"))
    tables = joint("with tables", ratio, compress_embeddings=True)
    joint("with tables, equal params", _equal_params_ratio(tables, rows["linear layers"]["params"]), compress_embeddings=True)
    # the linear layers too pruned each to its own allocated rank
    joint("with tables, per-site selection", ratio, dataclasses.replace(recipe, rank_selection="site"), compress_embeddings=True)
    return rows, models, task.example


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("-o", "--output", default="benchmarks/results/embedding_tables")
    args = parser.parse_args(argv)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    by_seed, latency = {}, {}
    for seed in args.seeds:
        rows, models, example = run_seed(seed, args.ratio, args.steps)
        by_seed[seed] = rows
        if not latency:
            with tempfile.TemporaryDirectory() as folder:  # the ONNX files are not results
                latency = onnx_latency(models, example, folder, baseline="original", repeats=args.repeats)
    (output / "embedding_tables.json").write_text(json.dumps({"args": vars(args), "seeds": by_seed, "latency": latency}, indent=2) + "\n")
    lines = [
        f"# compress_embeddings on MiniLM (Rotten Tomatoes, {args.steps} steps, ratio {args.ratio})", "",
        f"`python benchmarks/embedding_tables.py --seeds {' '.join(map(str, args.seeds))} --ratio {args.ratio} --steps {args.steps}`", "",
        "| form | ratio | test accuracy (seeds " + ", ".join(map(str, args.seeds)) + ") | mean | minus linear layers (paired) | params | MACs/text | ORT b1 | ORT b32 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    first = by_seed[args.seeds[0]]
    for label, row in first.items():
        accuracies = [100 * by_seed[seed][label]["accuracy"] for seed in args.seeds]
        differences = [a - 100 * by_seed[seed]["linear layers"]["accuracy"] for a, seed in zip(accuracies, args.seeds)]
        speed = latency[label] if label != "original" else {"batch1_speedup": 1.0, "batch32_speedup": 1.0}
        lines.append(
            f"| {label} | {row['ratio']:.3g} | {seed_cells(accuracies)} "
            f"| {mean_and_error(differences)} "
            f"| {row['params'] / 1e6:.2f}M | {row['macs'] / 1e6:.0f}M | x{speed['batch1_speedup']:.2f} | x{speed['batch32_speedup']:.2f} |"
        )
    (output / "embedding_tables.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
