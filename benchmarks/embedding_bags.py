"""compress_embeddings on a model whose table is read in bags: MiniLM's pretrained word embeddings
(30522 x 384) averaged over each text's tokens by an nn.EmbeddingBag (padding left out), a 256-wide
hidden layer and a 2-way head (fastText's shape; the table holds 99% of the parameters), fine-tuned
for Rotten Tomatoes sentiment. At each ratio, every method gets the same S steps on the same batches:
  ft        fine-tune only (the uncompressed reference)
  ft_svd    fine-tune S, then training-free compression (activation-whitened SVD, rows weighted by their reads)
  ft_c_ft   fine-tune S/2, compress, fine-tune the compact model S/2 on the batches ft sees in its second half
  c_ft      compress the pretrained model, fine-tune the compact model S
  joint     tunecomp_fx.compress(..., data=train, training=S steps), the default TrainingConfig
  joint[...] joint with one of minilm_sentiment.py's ablations (--ablations), at every ratio
all with compress_embeddings=True (--table-lr-scale F: the table's factors, lowrank.words.*, train at F x
the learning rate in c_ft, ft_c_ft's second fine-tune and joint). Test accuracy, parameters, MACs per
text, and (the first seed's models) ONNX Runtime latency of joint's compact models against ft's (1
thread, interleaved), and of ft exported with onnxscript's embedding_bag translation instead of
tunecomp's.

    python benchmarks/embedding_bags.py [--seeds 0 1 2 3] [--ratios 0.5 0.7 0.9] [--steps 480] [--lr 3e-3]
        [--ablations T=0.1 ...] [--table-lr-scale 0.1] [-o benchmarks/results/embedding_bags]
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

import torch
from onnxscript.function_libs.torch_lib.ops.core import aten_embedding_bag_padding_idx
from torch import nn

from tunecomp_fx.api import compress
from tunecomp_fx.batches import ContinuedData
from tunecomp_fx.finetune import evaluate, finetune
from tunecomp_fx.metrics import count_macs, count_parameters
from tunecomp_fx.sentiment import onnx_latency, sentiment_task
from tunecomp_fx.train import TrainingConfig

sys.path.insert(0, str(Path(__file__).parent))
from minilm_sentiment import ABLATIONS, TRAINING_OPTIONS  # noqa: E402
from seed_summary import mean_and_error, seed_cells  # noqa: E402

METHODS = ("ft_svd", "ft_c_ft", "c_ft", "joint")
# ft exported with onnxscript's embedding_bag translation (a Loop over the bags) instead of tunecomp's
ONNXSCRIPT_FT = "ft (onnxscript's embedding_bag)"
ONNXSCRIPT_BAGS = {torch.ops.aten.embedding_bag.padding_idx: aten_embedding_bag_padding_idx}
TABLE_FACTORS = "lowrank.words.*"  # the word table's factors, as prepare and compress name them


class BagClassifier(nn.Module):
    """The mean of a text's word embeddings (padding left out), a hidden layer and a 2-way head."""

    def __init__(self, words: torch.Tensor, padding_idx: int) -> None:
        super().__init__()
        self.words = nn.EmbeddingBag.from_pretrained(words, freeze=False, mode="mean", padding_idx=padding_idx)
        self.hidden = nn.Linear(words.shape[1], 256)
        self.classifier = nn.Linear(256, 2)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.classifier(torch.relu(self.hidden(self.words(input_ids))))


def run_seed(
    seed: int, ratios: list[float], steps: int, lr: float, ablations: list[str], table_lr_scale: float = 1.0
) -> tuple[dict[str, dict[str, Any]], dict[str, nn.Module], dict[str, torch.Tensor]]:
    task = sentiment_task(batch_size=16, seed=seed, max_length=32)
    embeddings = task.model.bert.embeddings.word_embeddings
    torch.manual_seed(seed)
    model = BagClassifier(embeddings.weight.detach().clone(), embeddings.padding_idx).eval()
    recipe = TrainingConfig(steps=steps, lr=lr, seed=seed)
    scaled = {TABLE_FACTORS: table_lr_scale} if table_lr_scale != 1.0 else {}  # 1: the optimizer of the runs before the option
    compact_recipe = dataclasses.replace(recipe, lr_scale=scaled)  # for the models with factors
    texts = len(task.example["input_ids"])

    def trained(fn: Any, *args: Any, **options: Any) -> nn.Module:
        task.train.generator.manual_seed(seed)  # every method sees the same batches in the same order
        return fn(*args, **options)

    def squeeze(trained_model: nn.Module, ratio: float) -> nn.Module:
        return compress(trained_model, task.example, ratio, calib=task.calibration, compress_embeddings=True)

    def joint(ratio: float, **options: Any) -> nn.Module:
        training = dataclasses.replace(compact_recipe, **{key: value for key, value in options.items() if key in TRAINING_OPTIONS})
        compression = {key: value for key, value in options.items() if key not in TRAINING_OPTIONS}
        return trained(
            compress, model, task.example, ratio, calib=task.calibration, data=task.train, training=training, progress=True,
            **{"compress_embeddings": True, **compression},
        )  # fmt: skip

    models = {"ft": trained(finetune, copy.deepcopy(model), task.train, recipe, desc="ft")}
    half = dataclasses.replace(recipe, steps=steps // 2)
    compact_half = dataclasses.replace(compact_recipe, steps=half.steps)
    task.train.generator.manual_seed(seed)
    second_half = ContinuedData(task.train, start=half.steps)  # not the first half's batches again
    ft_half = trained(finetune, copy.deepcopy(model), task.train, half, desc="ft S/2")
    for ratio in ratios:
        models[f"joint@{ratio}"] = joint(ratio)
        for name in ablations:
            models[f"joint[{name}]@{ratio}"] = joint(ratio, **ABLATIONS[name])
        models[f"c_ft@{ratio}"] = trained(finetune, squeeze(model, ratio), task.train, compact_recipe, desc=f"c_ft {ratio}")
        models[f"ft_c_ft@{ratio}"] = trained(finetune, squeeze(ft_half, ratio), second_half, compact_half, desc=f"ft_c_ft {ratio}")
        models[f"ft_svd@{ratio}"] = squeeze(models["ft"], ratio)
    rows = {}
    for label, trained_model in models.items():
        rows[label] = {
            "accuracy": evaluate(trained_model, task.test), "params": count_parameters(trained_model),
            "macs": count_macs(trained_model, task.example) // texts,
        }  # fmt: skip
        print(json.dumps({"seed": seed, "model": label, **rows[label]}), flush=True)
    return rows, models, {"input_ids": task.example["input_ids"]}  # the model reads the ids alone


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    parser.add_argument("--steps", type=int, default=480)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--ablations", nargs="*", default=[], choices=list(ABLATIONS), help="extra joint runs, one option changed each")
    parser.add_argument(
        "--table-lr-scale", type=float, default=1.0, help="the table factors' learning rate over --lr in every method that trains them"
    )
    parser.add_argument("-o", "--output", default="benchmarks/results/embedding_bags")
    args = parser.parse_args(argv)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    by_seed, latency = {}, {}
    for seed in args.seeds:
        rows, models, example = run_seed(seed, args.ratios, args.steps, args.lr, args.ablations, args.table_lr_scale)
        by_seed[seed] = rows
        if not latency:
            timed = {label: model for label, model in models.items() if label == "ft" or label.startswith("joint@")}
            timed[ONNXSCRIPT_FT] = models["ft"]
            with tempfile.TemporaryDirectory() as folder:  # the ONNX files are not results
                latency = onnx_latency(timed, example, folder, baseline="ft", repeats=args.repeats, translations={ONNXSCRIPT_FT: ONNXSCRIPT_BAGS})
        (output / "embedding_bags.json").write_text(json.dumps({"args": vars(args), "seeds": by_seed, "latency": latency}, indent=2) + "\n")
    seeds = list(by_seed)

    def accuracies(label: str) -> list[float]:
        return [100 * by_seed[seed][label]["accuracy"] for seed in seeds]

    command = f"python benchmarks/embedding_bags.py --seeds {' '.join(map(str, seeds))} --ratios {' '.join(map(str, args.ratios))} --steps {args.steps} --lr {args.lr}"
    if args.ablations:
        command += " --ablations " + " ".join(args.ablations)
    if args.table_lr_scale != 1.0:
        command += f" --table-lr-scale {args.table_lr_scale:g}"
    first = by_seed[seeds[0]]
    lines = [
        f"# compress_embeddings on a bag-of-words model (MiniLM's word table in an nn.EmbeddingBag; Rotten Tomatoes, {args.steps} steps)", "",
        f"`{command}`", "",
        f"| method | ratio | test accuracy (seeds {', '.join(map(str, seeds))}) | mean | joint minus it (paired) | params | MACs/text |",
        "|---|---|---|---|---|---|---|",
        f"| ft | | {seed_cells(accuracies('ft'))} | | "
        f"{first['ft']['params'] / 1e6:.2f}M | {first['ft']['macs'] / 1e3:.0f}K |",
    ]  # fmt: skip
    for ratio in args.ratios:
        joint = accuracies(f"joint@{ratio}")
        for method in ("joint", *(m for m in METHODS if m != "joint"), *(f"joint[{name}]" for name in args.ablations)):
            label = f"{method}@{ratio}"
            values = accuracies(label)
            difference = mean_and_error([a - b for a, b in zip(joint, values)]) if method != "joint" else ""
            lines.append(
                f"| {method} | {ratio} | {seed_cells(values)} | {difference} "
                f"| {first[label]['params'] / 1e6:.2f}M | {first[label]['macs'] / 1e3:.0f}K |"
            )
    lines += ["", f"ONNX Runtime (1 thread, interleaved, seed {seeds[0]}'s models), joint's compact models against ft (both with tunecomp's embedding_bag translation):", ""]
    lines += ["| model | b1 ms | b1 speedup | b32 ms | b32 speedup |", "|---|---|---|---|---|"]
    for label, timing in latency.items():
        lines.append(
            f"| {label} | {timing['batch1_ms']:.3f} | x{timing['batch1_speedup']:.2f} | {timing['batch32_ms']:.3f} | x{timing['batch32_speedup']:.2f} |"
        )
    (output / "embedding_bags.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
