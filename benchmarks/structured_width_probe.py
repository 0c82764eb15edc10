"""Would pruning widths (FFN neurons, attention heads) meet the latency line at ratio 0.7?

A planning probe, not a tunecomp feature: it prunes MiniLM's FFN neurons and attention heads by hand
(Hugging Face module surgery), then compresses what is left with tunecomp's low-rank form, and
measures what issue 4 asks at ratio 0.7 (30% of the MACs kept):
  lowrank            tunecomp's form on every linear site (= the benchmark's compressed models)
  ffn30+lowrank_attn 30% of the FFN neurons kept (dense), attention sites low-rank at 0.7
  ffn50+lowrank      50% of the FFN neurons kept, then every site low-rank at 0.55
  ffn30+heads4       30% of the FFN neurons and 4 of the 12 heads per layer kept, all dense
and, for latency, tunecomp's own width pruning (prune_neurons, prune_heads, which this probe led
to) and rank rounding, each at ratio 0.7 with the ranks taking what pruning leaves, named by its
options, e.g.
  prune_neurons=0.5                    half of every FFN's neurons pruned
  prune_neurons=0.7,prune_heads=0.67   70% of the neurons and 8 of the 12 heads pruned
  rank_multiple=16                     the low-rank form with ranks rounded to multiples of 16
Neurons are ranked by E|GELU(h_j)| * ||W_down[:, j]|| and heads by E||context_h|| * ||W_out[:, h]||
on the calibration batches.

    python benchmarks/structured_width_probe.py latency          # ORT speedups against the MAC bound
    python benchmarks/structured_width_probe.py latency --forms lowrank ffn30+heads4   # a subset
    python benchmarks/structured_width_probe.py train --seed N   # compress -> fine-tune, and joint

`train` runs the quick profile's recipe until 2026-12-07 (240 steps, batch 16, 32 tokens, lr 2e-4, the
cosine over the whole run), with which its results were made, on the benchmark's
batches for seed N: compress -> fine-tune for every form, and tunecomp's joint run on the FFN-pruned
model (`ffn50+joint`: the teachers are the pruned FFN's layers). The default joint run and compress
-> fine-tune of `minilm_sentiment.py --quick --seed N` at 0.7, as run until 2026-12-07 (today
`--quick --lr 2e-4` with the ablation `lr_decay=cosine`), are the references (same batches).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from tunecomp_fx import TrainingConfig, compress
from tunecomp_fx.finetune import evaluate, finetune
from tunecomp_fx.forms import rebuilt
from tunecomp_fx.metrics import count_macs
from tunecomp_fx.sentiment import SentimentTask, onnx_latency, sentiment_task

FFN_SITES = ("*intermediate.dense", "*layer.?.output.dense")
OUTPUT = Path("benchmarks/results/structured_width_probe")
# tunecomp's options per form; their joint runs are minilm_sentiment.py's ablations of the same names
TUNECOMP_FORMS = {
    "prune_neurons=0.5": {"prune_neurons": 0.5},
    "prune_neurons=0.3": {"prune_neurons": 0.3},
    "prune_neurons=0.7,prune_heads=0.67": {"prune_neurons": 0.7, "prune_heads": 0.67},
    "prune_neurons=0.71,prune_heads=0.67": {"prune_neurons": 0.71, "prune_heads": 0.67},
    "prune_neurons=0.5,prune_heads=0.5": {"prune_neurons": 0.5, "prune_heads": 0.5},
    "prune_heads=0.5": {"prune_heads": 0.5},
    "prune_heads=0.67": {"prune_heads": 0.67},
    "prune_neurons=0.3,prune_heads=0.5": {"prune_neurons": 0.3, "prune_heads": 0.5},
    "rank_multiple=8": {"rank_multiple": 8},
    "rank_multiple=16": {"rank_multiple": 16},
    "prune_heads=0.5,rank_multiple=8": {"prune_heads": 0.5, "rank_multiple": 8},
    "prune_heads=0.5,rank_multiple=16": {"prune_heads": 0.5, "rank_multiple": 16},
}


def sliced(linear: nn.Linear, rows: torch.Tensor | None = None, columns: torch.Tensor | None = None) -> nn.Linear:
    weight = linear.weight if rows is None else linear.weight[rows]
    weight = weight if columns is None else weight[:, columns]
    return rebuilt(linear, weight, linear.bias if rows is None else linear.bias[rows])


def importances(model: nn.Module, calibration: list[dict[str, torch.Tensor]]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer: a score per FFN neuron and per attention head (larger = keep)."""
    layers, heads = model.bert.encoder.layer, model.config.num_attention_heads
    activation: dict[int, torch.Tensor] = {}
    context: dict[int, torch.Tensor] = {}

    def summed(store: dict[int, torch.Tensor], index: int, value: torch.Tensor) -> None:
        store[index] = store.get(index, 0) + value

    hooks = []
    for i, layer in enumerate(layers):
        hooks.append(layer.output.dense.register_forward_pre_hook(
            lambda m, a, i=i: summed(activation, i, a[0].abs().flatten(0, -2).sum(0))))
        hooks.append(layer.attention.output.dense.register_forward_pre_hook(
            lambda m, a, i=i: summed(context, i, a[0].flatten(0, -2).unflatten(-1, (heads, -1)).norm(dim=-1).sum(0))))
    with torch.no_grad():
        for batch in calibration:
            model(**batch)
    for hook in hooks:
        hook.remove()
    neurons = [activation[i] * layer.output.dense.weight.norm(dim=0) for i, layer in enumerate(layers)]
    head_scores = [
        context[i] * layer.attention.output.dense.weight.unflatten(1, (heads, -1)).norm(dim=(0, 2))
        for i, layer in enumerate(layers)
    ]
    return neurons, head_scores


def pruned_widths(model: nn.Module, calibration: list[dict[str, torch.Tensor]], ffn_kept: float, heads_kept: int | None = None) -> nn.Module:
    """A copy of `model` keeping the top `ffn_kept` of each layer's FFN neurons (a multiple of 8) and,
    if given, its top `heads_kept` attention heads."""
    model = copy.deepcopy(model)
    neurons, heads = importances(model, calibration)
    for i, layer in enumerate(model.bert.encoder.layer):
        width = layer.intermediate.dense.out_features
        kept = neurons[i].topk(int(round(ffn_kept * width / 8)) * 8).indices.sort().values
        layer.intermediate.dense = sliced(layer.intermediate.dense, rows=kept)
        layer.output.dense = sliced(layer.output.dense, columns=kept)
        if heads_kept:
            attention = layer.attention.self
            size = attention.attention_head_size
            top = heads[i].topk(heads_kept).indices.sort().values
            columns = (top[:, None] * size + torch.arange(size)).flatten()
            attention.query, attention.key, attention.value = (
                sliced(linear, rows=columns) for linear in (attention.query, attention.key, attention.value)
            )
            attention.num_attention_heads, attention.all_head_size = heads_kept, len(columns)
            layer.attention.output.dense = sliced(layer.attention.output.dense, columns=columns)
    return model


def forms(task: SentimentTask) -> dict[str, Callable[..., nn.Module]]:
    """Each form at 0.7, built from the pretrained model; keyword options (data=, training=) make a joint run."""
    base, example, calibration = task.model, task.example, task.calibration
    return {
        "lowrank": lambda **o: compress(base, example, 0.7, calib=calibration, **o),
        "ffn30+lowrank_attn": lambda **o: compress(pruned_widths(base, calibration, 0.3), example, 0.7, calib=calibration, exclude=FFN_SITES, **o),
        "ffn50+lowrank": lambda **o: compress(pruned_widths(base, calibration, 0.5), example, 0.55, calib=calibration, **o),
        "ffn30+heads4": lambda: pruned_widths(base, calibration, 0.3, heads_kept=4),
        **{name: (lambda p=p, **o: compress(base, example, 0.7, calib=calibration, **p, **o)) for name, p in TUNECOMP_FORMS.items()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("latency", "train"))
    parser.add_argument("--seed", type=int, default=0, help="of the batch order and the runs (train)")
    parser.add_argument("--repeats", type=int, default=10, help="interleaved ORT timing rounds (latency)")
    parser.add_argument("--json", default="latency.json", help="file name of the latency results, in the results folder")
    parser.add_argument("--forms", nargs="*", help="time only these forms (latency; default: all)")
    args = parser.parse_args()
    OUTPUT.mkdir(parents=True, exist_ok=True)
    task = sentiment_task(max_length=32, batch_size=16)  # minilm_sentiment.py's quick profile and head
    built = forms(task)
    macs_before = count_macs(task.model, task.example)
    if args.what == "latency":
        unknown = set(args.forms or ()) - set(built)
        if unknown:
            parser.error(f"unknown forms {sorted(unknown)}; choose from {list(built)}")
        models = {"original": task.model, **{name: make() for name, make in built.items() if name in (args.forms or built)}}
        latency = onnx_latency(models, task.example, OUTPUT / "onnx", baseline="original", repeats=args.repeats)
        rows = {}
        for name, model in models.items():
            bound = macs_before / count_macs(model, task.example)
            rows[name] = {"mac_bound": bound, **latency[name], **{
                f"batch{b}_of_bound": latency[name][f"batch{b}_speedup"] / bound for b in (1, 32)}}
            print(name, json.dumps(rows[name]), flush=True)
        (OUTPUT / args.json).write_text(json.dumps(rows, indent=2) + "\n")
        return 0
    recipe = TrainingConfig(steps=240, lr=2e-4, lr_decay="cosine", seed=args.seed)  # the quick profile's until 2026-12-07
    runs: dict[str, Callable[[], nn.Module]] = {
        **{f"{name}/c_ft": (lambda make=make: finetune(make(), task.train, recipe, progress=False))
           for name, make in built.items() if name not in TUNECOMP_FORMS},
        "ffn50+joint": lambda: built["ffn50+lowrank"](data=task.train, training=recipe),
    }
    rows = []
    for name, run in runs.items():
        task.train.generator.manual_seed(args.seed)  # every run sees the same batches in the same order
        start = time.perf_counter()
        model = run()
        row = {"seed": args.seed, "run": name, "accuracy": evaluate(model, task.test),
               "macs_fraction": count_macs(model, task.example) / macs_before, "seconds": time.perf_counter() - start}
        rows.append(row)
        print(json.dumps(row), flush=True)
        (OUTPUT / f"train_seed{args.seed}.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
