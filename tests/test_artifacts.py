"""Saving and loading a compact model: the files, the reload check, and loading in a process where
tunecomp_fx (and timm, transformers) cannot be imported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import tunecomp_fx
from tunecomp_fx.export.artifacts import load_compact, load_inputs, save_compact
from tunecomp_fx.inputs import call_model, flatten_outputs

# The loader users run without this package (module docstring of export/artifacts.py), plus a
# meta-path hook that makes tunecomp_fx, timm and transformers unimportable, whatever sys.path holds.
HIDDEN_LOAD = r"""
import importlib.abc, json, sys
HIDDEN = ("tunecomp_fx", "timm", "transformers")

class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"{name} is hidden in this process")
        return None

sys.meta_path.insert(0, Hide())
import torch
import torch.utils._pytree as pytree
from safetensors import safe_open
from safetensors.torch import load_file, save_file

folder, inputs_path, outputs_path = sys.argv[1:4]
model = torch.export.load(f"{folder}/program.pt2").module()
model.load_state_dict(load_file(f"{folder}/model.safetensors"), assign=True)
with safe_open(inputs_path, framework="pt") as handle:
    keyword = handle.metadata()["kind"] == "keyword"
inputs = load_file(inputs_path)
with torch.no_grad():
    outputs = model(**inputs) if keyword else model(*inputs.values())
save_file({f"out{i}": t.contiguous() for i, t in enumerate(pytree.tree_leaves(outputs))}, outputs_path)
leaked = sorted(m for m in sys.modules if m.partition(".")[0] in HIDDEN)
assert not leaked, leaked
print("loaded without", ", ".join(HIDDEN))
"""


@pytest.fixture(autouse=True)
def one_thread():
    """LAPACK's SVD with 2 threads on a busy 2-core machine was measured 60x slower than with one
    (1.4 s against 0.022 s for a 576x192 float64 matrix); these tests are not about speed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _load_in_clean_process(folder: Path, inputs: dict[str, torch.Tensor], keyword: bool, tmp_path: Path) -> list[torch.Tensor]:
    inputs_path, outputs_path = tmp_path / "check_inputs.safetensors", tmp_path / "check_outputs.safetensors"
    save_file(inputs, str(inputs_path), metadata={"kind": "keyword" if keyword else "positional"})
    # -I: no PYTHONPATH, no user site, not even the working directory on sys.path.
    done = subprocess.run(
        [sys.executable, "-I", "-c", HIDDEN_LOAD, str(folder), str(inputs_path), str(outputs_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "loaded without tunecomp_fx, timm, transformers" in done.stdout
    outputs = load_file(str(outputs_path))
    return [outputs[f"out{i}"] for i in range(len(outputs))]


def _assert_close(expected: list[torch.Tensor], actual: list[torch.Tensor]) -> None:
    assert [e.shape for e in expected] == [a.shape for a in actual]
    for e, a in zip(expected, actual):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def test_timm_vit_loads_without_the_package_and_matches(tmp_path: Path) -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1).eval()
    example = (torch.randn(1, 3, 32, 32),)
    compact = tunecomp_fx.compress(model, example, ratio=0.4)
    assert tunecomp_fx.get_report(compact).capture_path == "symbolic_trace"
    saved = save_compact(compact, tmp_path / "vit", example)

    names = {path.name for path in saved.files}
    assert names == {"program.pt2", "model.safetensors", "inputs.safetensors", "config.json", "report.json", "report.md"}
    assert saved.max_abs_error <= 1e-5
    weights = load_file(str(tmp_path / "vit" / "model.safetensors"))
    assert sum(t.numel() for t in weights.values()) == sum(p.numel() for p in compact.parameters())
    # The program carries no weights: it is far smaller than them.
    assert (tmp_path / "vit" / "program.pt2").stat().st_size < 0.2 * (tmp_path / "vit" / "model.safetensors").stat().st_size
    assert json.loads((tmp_path / "vit" / "config.json").read_text())["ratio"] == 0.4

    batch = torch.randn(3, 3, 32, 32)  # another batch size than the example's
    with torch.no_grad():
        expected = flatten_outputs(compact(batch))
    _assert_close(expected, _load_in_clean_process(tmp_path / "vit", {"x": batch}, False, tmp_path))


def test_exported_bert_loads_without_the_package_and_matches(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, num_labels=3,
    )
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).eval()
    example = {"input_ids": torch.randint(0, 100, (2, 16)), "attention_mask": torch.ones(2, 16, dtype=torch.long)}
    compact = tunecomp_fx.compress(model, example, ratio=0.4)
    assert tunecomp_fx.get_report(compact).capture_path == "torch.export"
    save_compact(compact, tmp_path / "bert", example)

    check = {"input_ids": torch.randint(0, 100, (5, 16)), "attention_mask": torch.ones(5, 16, dtype=torch.long)}
    check["attention_mask"][:, 12:] = 0
    with torch.no_grad():
        expected = flatten_outputs(call_model(compact, check))
    _assert_close(expected, _load_in_clean_process(tmp_path / "bert", check, True, tmp_path))
    # The saved example inputs come back as keyword tensors, equal to the given ones.
    loaded = load_inputs(tmp_path / "bert")
    assert set(loaded) == set(example) and all(torch.equal(loaded[k], example[k]) for k in example)


def test_load_compact_restores_report_and_config(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 16)).eval()
    example = (torch.randn(4, 64),)
    compact = tunecomp_fx.compress(model, example, ratio=0.5)
    save_compact(compact, tmp_path / "mlp", example)
    loaded = load_compact(tmp_path / "mlp")
    assert tunecomp_fx.get_report(loaded) == tunecomp_fx.get_report(compact)
    assert loaded.meta["tunecomp_config"] == compact.meta["tunecomp_config"]
    positional = load_inputs(tmp_path / "mlp")
    assert isinstance(positional, tuple) and torch.equal(positional[0], example[0])
    x = torch.randn(7, 64)
    torch.testing.assert_close(loaded(x), compact(x), rtol=0, atol=0)


def test_load_compact_names_missing_files(tmp_path: Path) -> None:
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "program.pt2").write_bytes(b"")
    with pytest.raises(tunecomp_fx.InputError, match="model.safetensors missing"):
        load_compact(tmp_path / "half")


def test_save_compact_needs_a_compact_model(tmp_path: Path) -> None:
    with pytest.raises(tunecomp_fx.InputError, match="no tunecomp report"):
        save_compact(torch.fx.symbolic_trace(torch.nn.Linear(4, 4)), tmp_path, (torch.randn(1, 4),))
