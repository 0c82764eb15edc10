"""README's first example runs as written, in a fresh interpreter (so that no other test's imports help it)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parents[1]


def usage_snippet() -> str:
    """The first Python block under README's "## Use"."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Use\n", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README's Use section has no python block"
    return match.group(1)


def test_readme_usage_runs_in_a_fresh_interpreter(tmp_path: Path) -> None:
    setup = "import torch\nfrom tests.models import MLP\nmodel, x = MLP().eval(), torch.randn(4, 64)\n"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", setup + usage_snippet()], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "fc1" in result.stdout  # the printed report names the sites
    exported = onnx.load(str(tmp_path / "model.onnx"))
    assert any("lowrank.fc1.down" in weight.name for weight in exported.graph.initializer)  # the compact model
