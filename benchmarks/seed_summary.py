"""Accuracy over seeds: runs of benchmarks/minilm_sentiment.py made with different --seed values (the
batch order and dropout), same profile, summarized per method and ratio, with each method's paired
difference against a reference method (same seed, same batches).

    python benchmarks/seed_summary.py OUTPUT.md RUN_FOLDER [RUN_FOLDER ...] [--reference ft_c_ft ...]

Each --reference (a row label; give it again for another column) adds a column of paired differences.
Runs of different recipes (max_length, batch_size, steps or lr) are refused, unless --across-recipes
is given: then every row label ends with the recipe values its run does not share with all the others
(`joint[rank_slack=0.5] @ lr=0.0002`), and methods pair across recipes on the same seed.
A row label that two runs give for one seed (the uncompressed model, run beside several methods) must
have one accuracy in both; two different ones stop the summary, which would otherwise keep either.

A run folder holds a results.json; a run without a "seed" in its recipe is seed 0. Labels name a
joint run by what differs from one fixed configuration, the convex blend mix with rank_slack=0.25,
so that runs made under different defaults line up: the default joint run is joint[blend_mix=convex]
under those defaults, joint[blend_mix=power] before the mix changed (a recipe without blend_mix
predates the option and ran "power"), joint[rank_slack=0.5] after the slack changed (a run without
default_rank_slack predates that and ran 0.25); an ablation made under another default gets that
default added to its label (joint[T=0.25,blend_mix=power]), so that it is not taken for the same
ablation under the fixed configuration. The fixed configuration's learning rate follows a cosine
after the warm-up: a run made where lr_decay defaults to "cosine_after_blend" (today's default since
2026-12-07, and the quick runs of summary_quick_lr_decay.md) labels its default joint run
joint[lr_decay=cosine_after_blend,...], as the ablation of that name is labelled under the cosine,
and its ablation lr_decay=cosine as the cosine's default run.
The fixed configuration blends over half the run; a run whose recipe leaves blend_steps to the
ratio (None: min(ratio, 0.5)) is labelled T=0.3 at ratio 0.3, the same label as that ablation under
the fixed blend. The ft_c_ft rows of a run made before its second fine-tune continued the data (no
"ft_c_ft_second_half" in results.json: it saw the first half's batches again) are labelled
ft_c_ft[repeated batches].
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

RECIPE_KEYS = ("max_length", "batch_size", "steps", "lr")  # what makes runs comparable
FIXED_RANK_SLACK = 0.25  # the rank_slack of the configuration labels are relative to
FIXED_BLEND_STEPS = 0.5  # and its blend length, as a fraction of the run
FIXED_LR_DECAY = "cosine"  # and its learning rate schedule
LEVEL = 1e-6  # accuracies in percent: one text of a test set is far more than this


def label(method: str, run: dict[str, Any], ratio: float) -> str:
    """The row label of `method` in `run` at `ratio`: joint runs named by what differs from the fixed
    configuration, ft_c_ft runs that repeated their first half's batches marked so."""
    if method.startswith("ft_c_ft") and "ft_c_ft_second_half" not in run:
        return f"{method[:-1]},repeated batches]" if method.endswith("]") else f"{method}[repeated batches]"
    if not method.startswith("joint"):
        return method
    mix = run["recipe"].get("blend_mix", "power")
    slack = run.get("default_rank_slack", FIXED_RANK_SLACK)
    blend = run["recipe"].get("blend_steps", FIXED_BLEND_STEPS)
    blend = min(ratio, FIXED_BLEND_STEPS) if blend is None else blend  # TrainingConfig.for_ratio's rule
    decay = run["recipe"].get("lr_decay", FIXED_LR_DECAY)
    # lr_decay first: a default joint run under another schedule reads as that lr_decay ablation does
    defaults = [f"lr_decay={decay}"] if decay != FIXED_LR_DECAY else []
    defaults += [f"T={blend:g}"] if blend != FIXED_BLEND_STEPS else []
    defaults += [f"blend_mix={mix}"] if mix == "power" else []
    defaults += [f"rank_slack={slack:g}"] if slack != FIXED_RANK_SLACK else []
    changed = method[len("joint[") : -1].split(",") if method != "joint" else []
    own = {option.partition("=")[0] for option in changed}
    inherited = [d for d in defaults if d.partition("=")[0] not in own]  # an ablation's own option wins
    # an ablation back to the fixed configuration's schedule reads as the runs made under it
    named = [option for option in changed if option != f"lr_decay={FIXED_LR_DECAY}"] + inherited
    return f"joint[{','.join(named) or 'blend_mix=convex'}]"


def seed_cells(values: list[float]) -> str:
    """Two markdown cells: each seed's value, then their mean."""
    return f"{' / '.join(f'{value:.2f}' for value in values)} | {statistics.mean(values):.2f}"


def mean_and_error(differences: list[float]) -> str:
    """Mean of paired differences (a row minus its reference), and with two or more their standard
    error and how many are above zero (ahead) and at zero (level: as many texts right)."""
    if len(differences) < 2:
        return f"{statistics.mean(differences):+.2f}" if differences else ""
    ahead = sum(difference > LEVEL for difference in differences)
    level = sum(abs(difference) <= LEVEL for difference in differences)
    count = f"{ahead} of {len(differences)} ahead" + (f", {level} level" if level else "")
    return f"{statistics.mean(differences):+.2f} ± {statistics.stdev(differences) / len(differences) ** 0.5:.2f} ({count})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", type=Path)
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument(
        "--reference",
        action="append",
        help="a method (row label) to take paired differences against, one column each; repeatable (default: ft_c_ft)",
    )
    parser.add_argument("--methods", nargs="+", help="the rows to show, by label (default: all)")
    parser.add_argument("--note", help="a paragraph appended to the summary (how the runs were made)")
    parser.add_argument(
        "--across-recipes", action="store_true", help="take runs of different recipes, each row labelled with its recipe's own values"
    )
    args = parser.parse_args()
    references: list[str] = args.reference or ["ft_c_ft"]
    runs = [json.loads((folder / "results.json").read_text()) for folder in args.runs]
    differing = [key for key in RECIPE_KEYS if len({run["profile"][key] for run in runs}) > 1]
    if differing and not args.across_recipes:
        recipes = sorted({tuple(run["profile"][key] for key in RECIPE_KEYS) for run in runs})
        raise SystemExit(
            f"the runs differ in {RECIPE_KEYS}: {recipes}; their accuracies are not comparable "
            "(--across-recipes labels each row with its recipe)"
        )
    accuracy: dict[tuple[str, float], dict[int, float]] = defaultdict(dict)
    source: dict[tuple[str, float, int], str] = {}  # the command behind each cell
    for run in runs:
        seed = run["recipe"].get("seed", 0)
        recipe = ", ".join(f"{key}={run['profile'][key]:g}" for key in differing)
        for row in run["rows"]:
            key = (label(row["method"], run, row["ratio"]) + (f" @ {recipe}" if recipe else ""), row["ratio"])
            value = 100 * row["accuracy"]
            # one configuration run twice on a seed (the uncompressed model in several runs) must agree
            if accuracy[key].get(seed, value) != value:
                raise SystemExit(
                    f"{key[0]} at {key[1]}, seed {seed}, differs between two runs ({source[(*key, seed)]}; {run['command']}): "
                    "they are not the same configuration; give one of them"
                )
            source[(*key, seed)] = run["command"]
            accuracy[key][seed] = value
    seeds = sorted({seed for by_seed in accuracy.values() for seed in by_seed})
    lines = [
        f"Command: `python {shlex.join(sys.argv)}`",
        "",
        f"Runs: {', '.join(run['command'] for run in runs)}",
        "",
        f"Test accuracy (%) per seed; mean over the seeds; paired difference against {' and '.join(references)} at "
        "the same ratio (or uncompressed) and seed: mean ± standard error over the seeds both have (how many "
        "of them ahead, and level).",
        "",
        f"| method | ratio | {' | '.join(f'seed {s}' for s in seeds)} | mean | "
        + " | ".join(f"minus {reference}" for reference in references)
        + " |",
        "|---|---|" + "---|" * (len(seeds) + 1 + len(references)),
    ]
    for (method, ratio), by_seed in sorted(accuracy.items(), key=lambda item: (item[0][1], item[0][0])):
        if args.methods and method not in args.methods:
            continue
        cells = [f"{by_seed[s]:.2f}" if s in by_seed else "" for s in seeds]
        cells.append(f"{statistics.mean(by_seed.values()):.2f}")
        for name in references:
            # an uncompressed reference (ft, ratio 0) is the reference at every ratio
            reference = accuracy.get((name, ratio)) or accuracy.get((name, 0.0), {})
            paired = [by_seed[s] - reference[s] for s in seeds if s in by_seed and s in reference]
            cells.append(mean_and_error(paired) if by_seed is not reference else "")
        lines.append(f"| {method} | {ratio} | {' | '.join(cells)} |")
    if args.note:
        lines += ["", args.note]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
