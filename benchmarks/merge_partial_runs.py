"""Merge runs of benchmarks/minilm_sentiment.py split over processes (same profile, e.g. with
--methods or --ablations subsets) into one results.json / results.md / accuracy_vs_params.png.
A later part's row of the same method and ratio wins. Parts of different profiles, seeds or training
recipes are refused.

    python benchmarks/merge_partial_runs.py OUTPUT PART_FOLDER [PART_FOLDER ...] [--note TEXT]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from minilm_sentiment import write_table  # noqa: E402


RECIPE_KEYS = ("max_length", "batch_size", "steps", "lr")  # the profile's part of what makes rows comparable
HARNESS_KEYS = ("default_rank_slack", "ft_c_ft_second_half")  # fixed by the harness's version, not by its options


def run_conditions(part: dict[str, Any]) -> dict[str, Any]:
    """What two parts must share for their rows to sit in one table: the profile's recipe, the training
    recipe (the seed, the schedule, lr_hold) and what the harness's version fixed."""
    return {
        **{key: part["profile"][key] for key in RECIPE_KEYS},
        **part.get("recipe", {}),
        **{key: part.get(key) for key in HARNESS_KEYS},
    }


def merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    conditions = [run_conditions(p) for p in parts]
    differing = sorted(key for key in set().union(*conditions) if len({repr(c.get(key)) for c in conditions}) > 1)
    if differing:
        values = "; ".join(f"{key}: {', '.join(repr(c.get(key)) for c in conditions)}" for key in differing)
        raise SystemExit(f"the parts differ in {values} (in the order given); their rows are not comparable")
    merged = dict(parts[0])
    merged["profile"] = {key: parts[0]["profile"][key] for key in RECIPE_KEYS}  # the parts' run lists differ
    merged["command"] = " ; ".join(dict.fromkeys(c for p in parts for c in p["command"].split(" ; ")))
    rows = {(row["method"], row["ratio"]): row for p in parts for row in p["rows"]}
    merged["rows"] = list(rows.values())
    merged["latency"] = {key: value for p in parts for key, value in p.get("latency", {}).items()}
    return merged


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", type=Path)
    parser.add_argument("parts", type=Path, nargs="+", help="folders holding a results.json each")
    parser.add_argument("--note", help="a sentence appended to results.md (how the parts were run)")
    args = parser.parse_args()
    merged = merge([json.loads((part / "results.json").read_text()) for part in args.parts])
    if args.note:
        merged["note"] = args.note
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "results.json").write_text(json.dumps(merged, indent=2) + "\n")
    write_table(merged, args.output)
    if args.note:
        table = args.output / "results.md"
        table.write_text(table.read_text() + f"\nNote: {args.note}\n")
    print((args.output / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
