"""method="union" against the default method and a sequential pipeline, on the digits shift task of
the driver tests (models "pretrained" on digits 0-4, adapted to digits 5-9), CPU.

Per model, ratio and seed, the same step budget and learning rate:
  tunecomp   - compress(..., data=) with the default method (rank slack, pruning, both factors train);
  union      - compress(..., method="union", allocation="global", data=): fixed bases, trained cores;
  union_lr3  - the same with 3x the learning rate (only the small cores train);
  union_lr3_densehead - union_lr3 with the classifier head left dense (exclude=), so the new
               classes are not confined to a fixed output basis;
  sequential - plain fine-tuning for half the steps, training-free compression (whitened SVD),
               fine-tuning of the compact model for the other half, on the batches that follow.
Then, on the transformer at ratio 0.5, the trainable parameter count of the prepared models and
their training step time during the blend, the two models' steps interleaved (order alternating
every round) in one process.

    python benchmarks/union_vs_default.py                      # writes benchmarks/results/union_vs_default.{json,md}
    python benchmarks/union_vs_default.py --steps 60 --seeds 0  # quicker
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.joint_task import accuracy, digits_task, endless, fresh  # noqa: E402

import tunecomp_fx  # noqa: E402
from tunecomp_fx import StepHook, TrainingConfig  # noqa: E402
from tunecomp_fx.batches import ContinuedData  # noqa: E402
from tunecomp_fx.finetune import finetune  # noqa: E402
from tunecomp_fx.sites import LOWRANK_ROOT  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("tunecomp", "union", "union_lr3", "union_lr3_densehead", "sequential")
HEADS = ("head", "4")  # the transformer's and the MLP's classifier


def run_method(method: str, kind: str, ratio: float, steps: int, lr: float, seed: int) -> tuple[float, float]:
    task = digits_task()
    start = time.perf_counter()
    if method == "sequential":
        recipe = TrainingConfig(steps=steps // 2, lr=lr, warmup=0, seed=seed)
        tuned = finetune(fresh(kind), task.loader(seed=seed), recipe, progress=False)
        compact = tunecomp_fx.compress(tuned, task.example_inputs(), ratio)
        rest = ContinuedData(task.loader(seed=seed), start=steps // 2)
        compact = finetune(compact, rest, dataclasses.replace(recipe, steps=steps - steps // 2), progress=False)
    else:
        options = {"method": "union", "allocation": "global"} if method.startswith("union") else {}
        lr = 3 * lr if method.startswith("union_lr3") else lr
        if method == "union_lr3_densehead":
            options["exclude"] = HEADS
        compact = tunecomp_fx.compress(
            fresh(kind), task.example_inputs(), ratio, data=task.loader(seed=seed), steps=steps, lr=lr,
            warmup=0, seed=seed, **options,
        )
    seconds = time.perf_counter() - start
    return accuracy(compact, task.test), seconds


def trainable(model: torch.nn.Module, sites_only: bool) -> int:
    return sum(
        p.numel() for n, p in model.named_parameters() if p.requires_grad and (not sites_only or n.startswith(LOWRANK_ROOT))
    )


def step_times(ratio: float, rounds: int, lr: float) -> dict[str, dict[str, float]]:
    task = digits_task()
    calib = [(task.train[0][i : i + 128], task.train[1][i : i + 128]) for i in range(0, 1024, 128)]
    prepared = {
        "tunecomp": tunecomp_fx.prepare(fresh("transformer"), task.example_inputs(), ratio, rank_slack=0.25),
        "union": tunecomp_fx.prepare(
            fresh("transformer"), task.example_inputs(), ratio, method="union", allocation="global", calib=calib
        ),
    }
    setups = {}
    for name, model in prepared.items():
        hook = StepHook(model, steps=10 * rounds)  # long run: every timed step is inside the blend
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
        model.train()
        setups[name] = (model, hook, optimizer, endless(task.loader(seed=0)), [])

    def step(name: str) -> None:
        model, hook, optimizer, data, times = setups[name]
        inputs, targets = next(data)
        start = time.perf_counter()
        loss = F.cross_entropy(model(inputs), targets) + hook.distill_loss()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        hook.step()
        times.append(time.perf_counter() - start)

    order = list(setups)
    for index in range(rounds + 5):
        for name in order if index % 2 == 0 else order[::-1]:
            step(name)
    result = {}
    for name, (model, _, _, _, times) in setups.items():
        result[name] = {
            "step_ms_median": 1e3 * statistics.median(times[5:]),  # the first 5 rounds warm up
            "trainable_params": trainable(model, sites_only=False),
            "trainable_site_params": trainable(model, sites_only=True),
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--models", nargs="+", default=["mlp", "transformer"])
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny models: one thread is fastest and steadiest
    rows = []
    for kind in args.models:
        for ratio in args.ratios:
            for seed in args.seeds:
                for method in METHODS:
                    acc, seconds = run_method(method, kind, ratio, args.steps, args.lr, seed)
                    rows.append({"model": kind, "ratio": ratio, "seed": seed, "method": method, "accuracy": acc, "seconds": seconds})
                    print(f"{kind:<11} ratio {ratio} seed {seed} {method:<10} accuracy {acc:.4f} ({seconds:.1f} s)", flush=True)
    timing = step_times(0.5, args.rounds, args.lr)
    print(json.dumps(timing, indent=2))
    RESULTS.mkdir(exist_ok=True)
    payload = {"args": vars(args), "accuracy": rows, "step_time_transformer_ratio_0.5": timing, "torch": torch.__version__}
    (RESULTS / "union_vs_default.json").write_text(json.dumps(payload, indent=2))
    lines = [
        f"# union vs tunecomp vs sequential (digits 0-4 -> 5-9, {args.steps} steps, lr {args.lr}, seeds {args.seeds})",
        "",
        "| model | ratio | " + " | ".join(METHODS) + " |",
        "|---|---|" + "---|" * len(METHODS),
    ]
    for kind in args.models:
        for ratio in args.ratios:
            means = []
            for method in METHODS:
                values = [r["accuracy"] for r in rows if r["model"] == kind and r["ratio"] == ratio and r["method"] == method]
                means.append(f"{statistics.mean(values):.4f}")
            lines.append(f"| {kind} | {ratio} | " + " | ".join(means) + " |")
    lines += ["", "Transformer, ratio 0.5, during the blend (interleaved steps, median):", "",
              "| method | step ms | trainable params | trainable site params |", "|---|---|---|---|"]
    for name, t in timing.items():
        lines.append(f"| {name} | {t['step_ms_median']:.2f} | {t['trainable_params']:,} | {t['trainable_site_params']:,} |")
    (RESULTS / "union_vs_default.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
