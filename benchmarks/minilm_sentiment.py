"""Joint fine-tuning + compression against the sequential pipelines, on a real pretrained model.

all-MiniLM-L6-v2 (captured with torch.export) fine-tuned for Rotten Tomatoes sentiment. Every method
gets the same S optimizer steps on the same batches (same seed, same recipe: tunecomp_fx.finetune
uses the joint driver's optimizer and schedules):
  ft          fine-tune only, S steps (the uncompressed reference)
  ft_svd      fine-tune S, then training-free compression (activation-whitened SVD)
  ft_c_ft     fine-tune S/2, compress, fine-tune the compact model S/2 on the batches ft sees in its
              second half (the issue's "strongest sequential"; on MiniLM c_ft and ft_svd are as
              strong or stronger at 0.3 and 0.5)
  ft_joint    fine-tune S/2 (ft_c_ft's first half), then joint on that fine-tuned model for S/2 on the
              same second-half batches: its teachers, calibration and width importances are the
              fine-tuned model's
  c_ft        compress the pretrained model, fine-tune the compact model S
  joint       tunecomp_fx.compress(..., data=train, steps=S) with the default TrainingConfig
  union       tunecomp_fx.compress(..., method="union", data=train, steps=S): core-only training
              between fixed task-aware bases, calibrated on labelled training batches, at 3x the
              learning rate (only the small cores train; 3x won on the digits task, see
              benchmarks/results/union_vs_default.md)
  joint[...]  ablation variants (one option changed), at the ablation ratios
--form NAME compresses every method's model with that ablation's compression options (e.g. the width
pruning prune_neurons=0.5,prune_heads=0.5), so that the sequential pipelines get the same structure as
joint[NAME]; their rows are then labelled ft_c_ft[NAME] and so on, an ablation's joint[NAME,ABLATION].
Test accuracy on the full test split; parameters and MACs from the compression report (MACs for
one text of max_length tokens); ONNX Runtime latency (1 thread, interleaved) at batch 1 and 32.

    python benchmarks/minilm_sentiment.py --quick      # 2-core CPU profile
    python benchmarks/minilm_sentiment.py              # full profile (GPU)
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from tunecomp_fx import TrainingConfig, compress, get_report
from tunecomp_fx.batches import ContinuedData
from tunecomp_fx.errors import ConfigError
from tunecomp_fx.finetune import evaluate, finetune
from tunecomp_fx.metrics import count_macs, count_parameters
from tunecomp_fx.sentiment import onnx_latency, sentiment_task
from tunecomp_fx.train import DEFAULT_RANK_SLACK

# One option changed against the default joint run each.
ABLATIONS: dict[str, dict[str, Any]] = {
    "blend=linear": {"blend": "linear"},
    "blend_mix=power": {"blend_mix": "power"},
    "T=0.25": {"blend_steps": 0.25},
    "T=0.3": {"blend_steps": 0.3},
    "T=0.5": {"blend_steps": 0.5},
    "T=0.7": {"blend_steps": 0.7},
    "distill=0": {"distill_weight": 0.0},
    "logit_distill=1": {"logit_distill": 1.0},
    "init=svd": {"init": "svd"},
    "rank_selection=site": {"rank_selection": "site"},
    "allocation=global": {"allocation": "global"},
    "rank_slack=0": {"rank_slack": 0.0},
    "rank_slack=0.5": {"rank_slack": 0.5},
    "rank_slack=1": {"rank_slack": 1.0},
    "train_teachers": {"train_teachers": True},
    "T=0.25,train_teachers": {"blend_steps": 0.25, "train_teachers": True},
    "rank_slack=0,T=0.25": {"rank_slack": 0.0, "blend_steps": 0.25},
    "T=0.05": {"blend_steps": 0.05},
    "T=0.1": {"blend_steps": 0.1},
    "T=0.1,prune_steps=0.5": {"blend_steps": 0.1, "prune_steps": 0.5},
    "student_loss=1": {"student_loss": 1.0},
    "lr_decay=cosine": {"lr_decay": "cosine"},
    "distill=0,T=0.25": {"distill_weight": 0.0, "blend_steps": 0.25},
    "prune_neurons=0.3": {"prune_neurons": 0.3},
    "prune_neurons=0.5": {"prune_neurons": 0.5},
    "prune_neurons=0.7,prune_heads=0.67": {"prune_neurons": 0.7, "prune_heads": 0.67},
    "prune_neurons=0.71,prune_heads=0.67": {"prune_neurons": 0.71, "prune_heads": 0.67},
    "prune_neurons=0.5,prune_heads=0.5": {"prune_neurons": 0.5, "prune_heads": 0.5},
    "prune_neurons=0.5,prune_heads=0.5,T=0.7": {"prune_neurons": 0.5, "prune_heads": 0.5, "blend_steps": 0.7},
    "prune_neurons=0.5,prune_heads=0.5,width_slack=1": {"prune_neurons": 0.5, "prune_heads": 0.5, "width_slack": 1.0},
    "prune_neurons=0.5,prune_heads=0.5,distill=0": {"prune_neurons": 0.5, "prune_heads": 0.5, "distill_weight": 0.0},
    "prune_heads=0.5": {"prune_heads": 0.5},
    "prune_heads=0.5,distill=0": {"prune_heads": 0.5, "distill_weight": 0.0},
    "prune_heads=0.67": {"prune_heads": 0.67},
    "prune_neurons=0.3,prune_heads=0.5": {"prune_neurons": 0.3, "prune_heads": 0.5},
    "prune_neurons=0.7,prune_heads=0.67,width_slack=1": {"prune_neurons": 0.7, "prune_heads": 0.67, "width_slack": 1.0},
    "rank_multiple=16": {"rank_multiple": 16},
    "prune_heads=0.5,rank_multiple=16": {"prune_heads": 0.5, "rank_multiple": 16},
    "compress_embeddings": {"compress_embeddings": True},  # the word and position tables count in the ratio too
    "seed=1": {"seed": 1},  # the same run with another shuffle and dropout: the noise between runs
}
TRAINING_OPTIONS = {field.name for field in dataclasses.fields(TrainingConfig)}
STRUCTURE_OPTIONS = {"init", "allocation", "prune_neurons", "prune_heads", "rank_multiple", "compress_embeddings"}  # what --form may set
METHODS = ("ft", "joint", "ft_c_ft", "ft_joint", "ft_svd", "c_ft", "union")
UNION_LR_FACTOR = 3.0
PROFILES = {
    "quick": {
        "max_length": 32, "batch_size": 16, "steps": 240, "lr": 1e-4, "repeats": 5, "ablation_ratios": (0.5,),
        "ablations": ("blend_mix=power", "distill=0", "blend=linear", "init=svd", "lr_decay=cosine"),
    },
    "full": {
        "max_length": 64, "batch_size": 32, "steps": 600, "lr": 1e-4, "repeats": 10, "ablation_ratios": (0.7,),
        "ablations": tuple(ABLATIONS),
    },
}


def row_label(method: str, ablation: str | None = None, *, form: str | None, lr_hold: float | None) -> str:
    """`method` with what the run changes for it in brackets, in the order applied: the form (which
    does not change ft), the ablation, the held peak. Runs before 2026-12-07 left the form out of an
    ablation's label (seedN_ratio0.4_tables_allocation_global: joint[allocation=global])."""
    changed = [form] if form and method != "ft" else []
    changed += [ablation] if ablation and ablation != form else []
    changed += [f"lr_hold={lr_hold:g}"] if lr_hold is not None else []
    return f"{method}[{','.join(changed)}]" if changed else method


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the 2-core CPU profile")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.7, 0.3], help="in the order run")
    parser.add_argument(
        "--ablations", nargs="*", choices=list(ABLATIONS), metavar="NAME", help=f"subset of {list(ABLATIONS)} (default: the profile's)"
    )
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS, help="a subset, to split a run over processes")
    parser.add_argument("--steps", type=int, help="override the profile's S")
    parser.add_argument("--lr", type=float, help="override the profile's peak learning rate")
    parser.add_argument(
        "--lr-hold", type=float, metavar="F",
        help="hold the peak learning rate until this fraction of every method's run, fine-tunes included "
        "(TrainingConfig.lr_hold; default: through the blend, no hold in a fine-tune); rows are labelled [lr_hold=F]",
    )  # fmt: skip
    parser.add_argument("--ablation-ratios", type=float, nargs="*", help="override the profile's ablation ratios")
    parser.add_argument(
        "--form", choices=[name for name, options in ABLATIONS.items() if set(options) <= STRUCTURE_OPTIONS],
        help="compress every method's model with this ablation's (compression) options",
    )
    parser.add_argument("--seed", type=int, default=0, help="of the batch order and of every method's run (dropout)")
    parser.add_argument("--test-limit", type=int, help="evaluate on the first N test texts (smoke runs only)")
    parser.add_argument("--device", default="cpu", help="where to calibrate, train and evaluate (ONNX Runtime always runs on the CPU)")
    parser.add_argument("--output", default="benchmarks/results/minilm_sentiment")
    args = parser.parse_args()
    profile = dict(PROFILES["quick" if args.quick else "full"])
    if args.steps is not None:
        profile["steps"] = args.steps
    if args.lr is not None:
        profile["lr"] = args.lr
    if args.ablation_ratios is not None:
        profile["ablation_ratios"] = tuple(args.ablation_ratios)
    steps = profile["steps"]
    try:  # before the model loads: a bad option is one line, not a traceback minutes in
        recipe = TrainingConfig(steps=steps, lr=profile["lr"], lr_hold=args.lr_hold, seed=args.seed)
    except ConfigError as error:
        parser.error(str(error))
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(torch.get_num_threads())
    task = sentiment_task(max_length=profile["max_length"], batch_size=profile["batch_size"], test_limit=args.test_limit)
    task.model.to(args.device)
    task.example = {name: value.to(args.device) for name, value in task.example.items()}
    task.calibration = [{name: value.to(args.device) for name, value in batch.items()} for batch in task.calibration]
    half = dataclasses.replace(recipe, steps=steps // 2)
    results: dict[str, Any] = {
        "command": " ".join(["python", *sys.argv]),
        "profile": profile,
        "recipe": recipe.to_dict(),
        "test_texts": len(task.test.dataset),
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "default_rank_slack": DEFAULT_RANK_SLACK,  # a compression default, not in the recipe
        "ft_c_ft_second_half": "continued",  # its batches; runs without this key repeated the first half's
        "rows": [],
    }
    params_before = count_parameters(task.model)
    macs_before = count_macs(task.model, task.example)

    def record(method: str, ratio: float, model: torch.nn.Module, seconds: float, **extra: Any) -> None:
        params = count_parameters(model)
        macs = get_report(model).model_macs_after if ratio else macs_before
        row = {
            "method": method, "ratio": ratio, "accuracy": evaluate(model, task.test), "params": params,
            "params_fraction": params / params_before, "macs": macs, "macs_fraction": macs / macs_before,
            "train_seconds": seconds, **extra,
        }
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
        (output / "results.json").write_text(json.dumps(results, indent=2) + "\n")

    def timed(fn: Any, *a: Any, **k: Any) -> tuple[Any, float]:
        task.train.generator.manual_seed(args.seed)  # every method sees the same batches in the same order
        start = time.perf_counter()
        value = fn(*a, **k)
        return value, time.perf_counter() - start

    form = ABLATIONS[args.form] if args.form else {}
    named = functools.partial(row_label, form=args.form, lr_hold=args.lr_hold)

    def squeeze(model: torch.nn.Module, ratio: float) -> torch.nn.Module:
        return compress(model, task.example, ratio, calib=task.calibration, **form)

    def joint(
        ratio: float, start: torch.nn.Module = task.model, data: Any = task.train, schedule: TrainingConfig = recipe,
        **options: Any,
    ) -> torch.nn.Module:
        options = {**form, **options}
        training = {k: v for k, v in options.items() if k in TRAINING_OPTIONS}
        compression = {k: v for k, v in options.items() if k not in training}
        if compression.get("method") != "union":  # union calibrates on labelled training batches
            compression["calib"] = task.calibration
        return compress(
            start, task.example, ratio, data=data, progress=True, device=args.device,
            training=dataclasses.replace(schedule, **training), **compression,
        )

    methods = set(args.methods)
    if methods & {"ft", "ft_svd"}:
        ft, seconds = timed(finetune, copy.deepcopy(task.model), task.train, recipe, desc="ft")
        record(named("ft"), 0.0, ft, seconds)
    if methods & {"ft_c_ft", "ft_joint"}:
        task.train.generator.manual_seed(args.seed)
        second_half = ContinuedData(task.train, start=half.steps)  # not the first half's batches again
        ft_half, half_seconds = timed(finetune, copy.deepcopy(task.model), task.train, half, desc="ft S/2")
    for ratio in args.ratios:
        compact = {}
        if "joint" in methods:  # the headline comparison first: joint, then ft_c_ft
            compact[f"joint@{ratio}"], more = timed(joint, ratio)
            record(named("joint"), ratio, compact[f"joint@{ratio}"], more)
        if "ft_c_ft" in methods:
            compact[f"ft_c_ft@{ratio}"], more = timed(finetune, squeeze(ft_half, ratio), second_half, half, desc=f"ft_c_ft {ratio}")
            record(named("ft_c_ft"), ratio, compact[f"ft_c_ft@{ratio}"], half_seconds + more)
        if "ft_joint" in methods:
            compact[f"ft_joint@{ratio}"], more = timed(joint, ratio, start=ft_half, data=second_half, schedule=half)
            record(named("ft_joint"), ratio, compact[f"ft_joint@{ratio}"], half_seconds + more)
        if "ft" in methods:  # latency right after each ratio, so that a run cut short has it for the ratios done
            latency = onnx_latency({"ft": ft, **compact}, task.example, output / "onnx", baseline="ft", repeats=profile["repeats"])
            results.setdefault("latency", {}).update({f"{label}|{ratio}": t for label, t in latency.items()})
            write_table(results, output)
        if "ft_svd" in methods:
            record(named("ft_svd"), ratio, squeeze(ft, ratio), seconds)
        if "c_ft" in methods:
            trained, more = timed(finetune, squeeze(task.model, ratio), task.train, recipe, desc=f"c_ft {ratio}")
            record(named("c_ft"), ratio, trained, more)
        if "union" in methods:
            trained, more = timed(joint, ratio, method="union", lr=UNION_LR_FACTOR * recipe.lr)
            record(named("union"), ratio, trained, more)
        write_table(results, output)
    for ratio in profile["ablation_ratios"]:
        for name in args.ablations if args.ablations is not None else profile["ablations"]:
            model, more = timed(joint, ratio, **ABLATIONS[name])
            record(named("joint", name), ratio, model, more)
            write_table(results, output)
    write_table(results, output)
    return 0


def write_table(results: dict[str, Any], output: Path) -> None:
    """results.md (accuracy table, latency table) and accuracy_vs_params.png."""
    rows = results["rows"]
    lines = [f"Command: `{results['command']}`", "", f"Profile: {results['profile']}", ""]
    lines += ["| method | ratio | test acc | params | params kept | MACs kept |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['ratio']} | {100 * r['accuracy']:.2f} | {r['params']:,} | "
            f"{100 * r['params_fraction']:.1f}% | {100 * r['macs_fraction']:.1f}% |"
        )
    macs = {f"{r['method']}@{r['ratio']}": r["macs_fraction"] for r in rows}
    macs["ft"] = 1.0
    if not rows:
        return
    if results.get("latency"):
        lines += ["", "| model | b1 ms | b1 speedup | b32 ms | b32 speedup | MAC bound | b32 fraction of bound |", "|---|---|---|---|---|---|---|"]
        for key, t in results["latency"].items():
            label = key.split("|")[0]
            bound = 1.0 / macs[label]
            lines.append(
                f"| {label} | {t['batch1_ms']:.2f} | x{t['batch1_speedup']:.2f} | {t['batch32_ms']:.1f} | "
                f"x{t['batch32_speedup']:.2f} | x{bound:.2f} | {100 * t['batch32_speedup'] / bound:.0f}% |"
            )
    (output / "results.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(r["method"] for r in rows if r["ratio"]):
        points = sorted((r["params"], 100 * r["accuracy"]) for r in rows if r["method"] == method)
        axes.plot(*zip(*points), marker="o", label=method)
    for r in rows:
        if r["method"] == "ft":
            axes.axhline(100 * r["accuracy"], color="gray", linestyle="--", label="ft (uncompressed)")
    axes.set_xlabel("kept parameters")
    axes.set_ylabel("test accuracy (%)")
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(output / "accuracy_vs_params.png", dpi=120)


if __name__ == "__main__":
    sys.exit(main())
