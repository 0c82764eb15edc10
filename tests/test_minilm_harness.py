"""benchmarks/minilm_sentiment.py without a model: the labels its rows get, and a bad option refused
in one line before the model loads."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "minilm_sentiment.py"


@pytest.fixture(scope="module")
def harness() -> ModuleType:
    spec = importlib.util.spec_from_file_location("minilm_sentiment", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("method", "ablation", "form", "lr_hold", "label"),
    [
        ("joint", None, None, None, "joint"),
        ("c_ft", None, None, 0.5, "c_ft[lr_hold=0.5]"),
        ("ft", None, "prune_heads=0.5", None, "ft"),  # the form compresses, ft compresses nothing
        ("ft_c_ft", None, "prune_heads=0.5", None, "ft_c_ft[prune_heads=0.5]"),
        ("ft_joint", None, "prune_heads=0.5", 0.5, "ft_joint[prune_heads=0.5,lr_hold=0.5]"),
        ("joint", "T=0.25", None, None, "joint[T=0.25]"),
        # the form applies to an ablation's run too, so its label says so
        ("joint", "allocation=global", "compress_embeddings", None, "joint[compress_embeddings,allocation=global]"),
        ("joint", "prune_heads=0.5", "prune_heads=0.5", 0.3, "joint[prune_heads=0.5,lr_hold=0.3]"),
    ],
)
def test_a_row_is_labelled_with_all_the_run_changes(
    harness: ModuleType, method: str, ablation: str | None, form: str | None, lr_hold: float | None, label: str
) -> None:
    assert harness.row_label(method, ablation, form=form, lr_hold=lr_hold) == label


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--lr-hold", "1.5"], "lr_hold=1.5 as a float is a fraction of the run and must be <= 1"),
        (["--steps", "0"], "steps must be a positive int; got 0"),
        (["--ablations", "T=9"], "argument --ablations: invalid choice: 'T=9'"),
    ],
)
def test_a_bad_option_is_one_error_line_before_the_model_loads(arguments: list[str], message: str) -> None:
    result = subprocess.run([sys.executable, str(SCRIPT), *arguments], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stdout == ""
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("minilm_sentiment.py: error: ") and message in last
    assert "Traceback" not in result.stderr
