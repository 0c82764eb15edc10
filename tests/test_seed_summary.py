"""benchmarks/seed_summary.py on hand-made run folders: paired differences per reference column, the
labels of joint runs, and the refusal to mix runs of different recipes; and every summary stored under
benchmarks/results is what its own command writes today."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "seed_summary.py"
PROFILE = {"max_length": 64, "batch_size": 32, "steps": 600, "lr": 1e-4}


def write_run(
    folder: Path,
    seed: int,
    accuracies: dict[str, float],
    profile: dict[str, Any] = PROFILE,
    continued: bool = True,
    lr_decay: str = "cosine",
) -> Path:
    """A run folder as benchmarks/minilm_sentiment.py writes it, reduced to what the summary reads;
    `continued=False`: as it wrote them before ft_c_ft's second half continued the data; `lr_decay`:
    the default joint run's."""
    run = {
        "command": f"python benchmarks/minilm_sentiment.py --seed {seed}",
        "profile": profile,
        "recipe": {"seed": seed, "blend_mix": "convex", "blend_steps": 0.5, "lr_decay": lr_decay},
        **({"ft_c_ft_second_half": "continued"} if continued else {}),
        "rows": [{"method": method, "ratio": 0.5, "accuracy": accuracy} for method, accuracy in accuracies.items()],
    }
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(run))
    return folder


def summarize(*arguments: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, arguments)], capture_output=True, text=True, cwd=cwd)


def rows(markdown: str) -> dict[str, list[str]]:
    """The table's cells by method label, the header under "method"."""
    table = [line.strip("|").split("|") for line in markdown.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [cell.strip() for cell in cells[1:]] for cells in table}


def test_one_column_of_paired_differences_per_reference(tmp_path: Path) -> None:
    runs = [
        write_run(tmp_path / "s0", 0, {"c_ft": 0.80, "joint": 0.78, "joint[T=0.1]": 0.81}),
        write_run(tmp_path / "s1", 1, {"c_ft": 0.82, "joint": 0.79, "joint[T=0.1]": 0.83}),
    ]
    output = tmp_path / "summary.md"
    result = summarize(output, *runs, "--reference", "c_ft", "--reference", "joint[blend_mix=convex]")
    assert result.returncode == 0, result.stderr
    table = rows(output.read_text())
    assert table["method"][-2:] == ["minus c_ft", "minus joint[blend_mix=convex]"]
    # seeds 0 and 1, mean, then the differences: mean ± standard error of the per-seed differences
    assert table["joint[T=0.1]"] == ["0.5", "81.00", "83.00", "82.00", "+1.00 ± 0.00 (2 of 2 ahead)", "+3.50 ± 0.50 (2 of 2 ahead)"]
    assert table["joint[blend_mix=convex]"] == ["0.5", "78.00", "79.00", "78.50", "-2.50 ± 0.50 (0 of 2 ahead)", ""]
    assert table["c_ft"][-2:] == ["", "+2.50 ± 0.50 (2 of 2 ahead)"]


def test_the_reference_defaults_to_fine_tune_compress_fine_tune(tmp_path: Path) -> None:
    run = write_run(tmp_path / "s0", 0, {"ft_c_ft": 0.80, "c_ft": 0.81})
    output = tmp_path / "summary.md"
    assert summarize(output, run).returncode == 0
    table = rows(output.read_text())
    assert table["method"][-1] == "minus ft_c_ft"
    assert table["c_ft"][-1] == "+1.00"  # one seed: no standard error


def test_fine_tune_compress_fine_tune_runs_that_repeated_their_first_half_s_batches_get_rows_of_their_own(tmp_path: Path) -> None:
    runs = [
        write_run(tmp_path / "s0", 0, {"ft_c_ft": 0.80, "ft_c_ft[prune_heads=0.5]": 0.79, "c_ft": 0.81}, continued=False),
        write_run(tmp_path / "s0_continued", 0, {"ft_c_ft": 0.83, "ft_c_ft[prune_heads=0.5]": 0.82}),
    ]
    output = tmp_path / "summary.md"
    assert summarize(output, *runs, "--reference", "ft_c_ft", "--reference", "ft_c_ft[repeated batches]").returncode == 0
    table = rows(output.read_text())
    assert table["ft_c_ft"][1:3] == ["83.00", "83.00"]
    assert table["ft_c_ft[repeated batches]"][1:3] == ["80.00", "80.00"]
    assert table["ft_c_ft[prune_heads=0.5]"][1] == "82.00"
    assert table["ft_c_ft[prune_heads=0.5,repeated batches]"][1] == "79.00"
    assert table["c_ft"][-2:] == ["-2.00", "+1.00"]


def test_runs_of_different_recipes_are_refused(tmp_path: Path) -> None:
    runs = [
        write_run(tmp_path / "s0", 0, {"c_ft": 0.80}),
        write_run(tmp_path / "s1", 1, {"c_ft": 0.80}, profile={**PROFILE, "steps": 200}),
    ]
    result = summarize(tmp_path / "summary.md", *runs)
    assert result.returncode != 0
    assert "the runs differ in ('max_length', 'batch_size', 'steps', 'lr')" in result.stderr
    assert not (tmp_path / "summary.md").exists()


def test_runs_of_different_learning_rates_pair_by_seed_when_asked_with_the_recipe_in_the_labels(tmp_path: Path) -> None:
    runs = [
        write_run(tmp_path / f"{lr}_{seed}", seed, {"ft": accuracy}, profile={**PROFILE, "lr": lr})
        for lr, seed, accuracy in ((1e-4, 0, 0.80), (1e-4, 1, 0.81), (2e-4, 0, 0.79), (2e-4, 1, 0.79))
    ]
    output = tmp_path / "summary.md"
    result = summarize(output, *runs, "--across-recipes", "--reference", "ft @ lr=0.0002")
    assert result.returncode == 0, result.stderr
    table = rows(output.read_text())
    assert set(table) == {"method", "ft @ lr=0.0001", "ft @ lr=0.0002"}  # only what differs: lr
    assert table["ft @ lr=0.0001"][1:] == ["80.00", "81.00", "80.50", "+1.50 ± 0.50 (2 of 2 ahead)"]


def test_joint_runs_line_up_across_runs_made_under_different_default_learning_rate_schedules(tmp_path: Path) -> None:
    runs = [  # seed 0 where lr_decay defaults to the cosine, seed 1 where it defaults to cosine_after_blend
        write_run(tmp_path / "s0", 0, {"joint": 0.80, "joint[lr_decay=cosine_after_blend]": 0.82}),
        write_run(tmp_path / "s1", 1, {"joint": 0.83, "joint[lr_decay=cosine]": 0.81}, lr_decay="cosine_after_blend"),
    ]
    output = tmp_path / "summary.md"
    assert summarize(output, *runs, "--reference", "joint[blend_mix=convex]").returncode == 0
    table = rows(output.read_text())
    assert set(table) == {"method", "joint[blend_mix=convex]", "joint[lr_decay=cosine_after_blend]"}
    assert table["joint[blend_mix=convex]"][1:4] == ["80.00", "81.00", "80.50"]
    assert table["joint[lr_decay=cosine_after_blend]"][1:] == ["82.00", "83.00", "82.50", "+2.00 ± 0.00 (2 of 2 ahead)"]


def test_one_configuration_with_two_different_results_on_a_seed_is_refused(tmp_path: Path) -> None:
    same = [write_run(tmp_path / "a", 0, {"ft": 0.84, "c_ft": 0.80}), write_run(tmp_path / "b", 0, {"ft": 0.84, "ft_c_ft": 0.79})]
    assert summarize(tmp_path / "same.md", *same).returncode == 0  # the uncompressed model in two runs, agreeing
    # the default joint run with the cosine, and a run labelled alike that did not reproduce it
    differ = [
        write_run(tmp_path / "c", 0, {"joint": 0.80}),
        write_run(tmp_path / "d", 0, {"joint[lr_decay=cosine]": 0.81}, lr_decay="cosine_after_blend"),
    ]
    result = summarize(tmp_path / "differ.md", *differ)
    assert result.returncode != 0 and not (tmp_path / "differ.md").exists()
    assert "joint[blend_mix=convex] at 0.5, seed 0, differs between two runs" in result.stderr


def test_paired_differences_count_the_seeds_ahead_and_level(tmp_path: Path) -> None:
    # 1,275 test texts: accuracies as the harness writes them, k / 1275
    runs = [
        write_run(tmp_path / f"s{seed}", seed, {"c_ft": c_ft / 1275, "joint": joint / 1275})
        for seed, (c_ft, joint) in enumerate(((1070, 1074), (1070, 1070), (1075, 1071)))
    ]
    output = tmp_path / "summary.md"
    assert summarize(output, *runs, "--reference", "c_ft").returncode == 0
    difference = rows(output.read_text())["joint[blend_mix=convex]"][-1]
    assert difference.endswith("(1 of 3 ahead, 1 level)"), difference
    assert difference.startswith("+0.00 ± 0.")


REPOSITORY = SCRIPT.parent.parent
STORED_SUMMARIES = sorted(
    path
    for path in (REPOSITORY / "benchmarks" / "results").rglob("summary*.md")
    if path.read_text().startswith("Command: `python benchmarks/seed_summary.py ")
)


def test_stored_summaries_are_found() -> None:
    assert len(STORED_SUMMARIES) >= 50  # the glob below must not go silently empty


@pytest.mark.parametrize("stored", STORED_SUMMARIES, ids=lambda path: str(path.relative_to(REPOSITORY / "benchmarks" / "results")))
def test_each_stored_summary_is_what_its_own_command_writes_today(stored: Path, tmp_path: Path) -> None:
    # a summary whose command writes another table (a label or a rule changed since) cannot be reproduced
    first_line, _, body = stored.read_text().partition("\n")
    arguments = shlex.split(first_line.removeprefix("Command: `python ").removesuffix("`"))
    assert arguments[:2] == ["benchmarks/seed_summary.py", str(stored.relative_to(REPOSITORY))]
    output = tmp_path / "summary.md"
    result = summarize(output, *arguments[2:], cwd=REPOSITORY)  # the run folders are relative to the repository
    assert result.returncode == 0, result.stderr
    assert output.read_text().partition("\n")[2] == body
