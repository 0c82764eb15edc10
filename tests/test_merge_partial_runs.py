"""benchmarks/merge_partial_runs.py on hand-made parts: the rows of parts of one run in one table, and
the refusal of parts whose rows are not comparable (another profile, seed or training recipe)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "merge_partial_runs.py"
PROFILE = {"max_length": 64, "batch_size": 32, "steps": 600, "lr": 1e-4, "ablations": ("T=0.25",)}
RECIPE = {"steps": 600, "lr": 1e-4, "lr_decay": "cosine_after_blend", "lr_hold": None, "seed": 0}


def write_part(folder: Path, rows: dict[str, float], latency: dict[str, float] | None = None, **recipe: Any) -> Path:
    """A part as benchmarks/minilm_sentiment.py writes it: rows of (method, 0.7) with these accuracies,
    latency entries of these batch-32 speedups."""
    part = {
        "command": f"python benchmarks/minilm_sentiment.py --methods {' '.join(rows)}",
        "profile": PROFILE,
        "recipe": {**RECIPE, **recipe},
        "default_rank_slack": 0.5,
        "ft_c_ft_second_half": "continued",
        "rows": [
            {"method": method, "ratio": 0.7, "accuracy": accuracy, "params": 100, "params_fraction": 0.5, "macs_fraction": 0.3}
            for method, accuracy in rows.items()
        ],
        "latency": {
            key: {"batch1_ms": 1.0, "batch1_speedup": speedup, "batch32_ms": 10.0, "batch32_speedup": speedup}
            for key, speedup in (latency or {}).items()
        },
    }
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(part))
    return folder


def merge(output: Path, *parts: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), str(output), *map(str, parts)], capture_output=True, text=True, timeout=120)


def test_the_parts_rows_and_latencies_make_one_table_and_a_later_part_s_row_wins(tmp_path: Path) -> None:
    first = write_part(tmp_path / "a", {"joint": 0.80, "c_ft": 0.78}, latency={"joint@0.7|0.7": 2.4})
    second = write_part(tmp_path / "b", {"c_ft": 0.79, "ft_c_ft": 0.77, "joint[T=0.25]": 0.81}, latency={"ft_c_ft@0.7|0.7": 2.5})
    result = merge(tmp_path / "merged", first, second)
    assert result.returncode == 0, result.stderr
    merged = json.loads((tmp_path / "merged" / "results.json").read_text())
    assert {row["method"]: row["accuracy"] for row in merged["rows"]} == {"joint": 0.80, "c_ft": 0.79, "ft_c_ft": 0.77, "joint[T=0.25]": 0.81}
    assert set(merged["latency"]) == {"joint@0.7|0.7", "ft_c_ft@0.7|0.7"}
    assert merged["command"].count("python benchmarks/minilm_sentiment.py") == 2
    table = (tmp_path / "merged" / "results.md").read_text()
    assert "| c_ft | 0.7 | 79.00 |" in table and "| joint[T=0.25] | 0.7 | 81.00 |" in table
    assert "| joint@0.7 | 1.00 | x2.40 |" in table and "| ft_c_ft@0.7 | 1.00 | x2.50 |" in table
    assert (tmp_path / "merged" / "accuracy_vs_params.png").stat().st_size > 0


def test_parts_of_different_seeds_or_schedules_are_refused_by_name(tmp_path: Path) -> None:
    base = write_part(tmp_path / "a", {"joint": 0.80})
    for name, recipe, message in [
        ("seed1", {"seed": 1}, "seed: 0, 1"),
        ("held", {"lr_hold": 0.5}, "lr_hold: None, 0.5"),
    ]:
        other = write_part(tmp_path / name, {"c_ft": 0.78}, **recipe)
        result = merge(tmp_path / f"merged_{name}", base, other)
        assert result.returncode != 0
        assert f"the parts differ in {message} (in the order given); their rows are not comparable" in result.stderr
        assert not (tmp_path / f"merged_{name}").exists()  # nothing written
