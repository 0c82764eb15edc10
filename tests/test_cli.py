"""The tunecomp-fx console script, run in subprocesses: each subcommand end to end on small models,
and bad arguments as one-line errors with a non-zero exit."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tunecomp_fx
from tests.cli_models import two_layer
from tunecomp_fx.cli import build_parser, main
from tunecomp_fx.export.artifacts import load_compact

TESTS = Path(__file__).parent
SCRIPT = Path(sys.executable).parent / "tunecomp-fx"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Needs the ONNX exporter from the export branch; until it is merged, these tests skip.


def _env() -> dict[str, str]:
    # One BLAS thread: the test machine has two busy cores (see test_artifacts.one_thread);
    # offline hub: --pretrained must fail at once rather than retry for a minute.
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _start(*args: str, cwd: Path = TESTS) -> subprocess.Popen:
    assert SCRIPT.is_file(), f"{SCRIPT} missing: install the package (pip install -e .) to get the console script"
    return subprocess.Popen([str(SCRIPT), *args], cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(process: subprocess.Popen, timeout: float = 300) -> subprocess.CompletedProcess:
    stdout, stderr = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _run(*args: str, cwd: Path = TESTS) -> subprocess.CompletedProcess:
    return _finish(_start(*args, cwd=cwd))


@pytest.fixture(scope="module")
def compressed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    # Run from tests/ so that `cli_models` is found on the working directory, as a user's module would be.
    output = tmp_path_factory.mktemp("compress") / "out"
    return output, _run("compress", "cli_models:two_layer", "--ratio", "0.5", "-o", str(output))


def test_compress_writes_the_compact_model_report_and_plot(compressed) -> None:
    output, done = compressed
    assert done.returncode == 0, done.stderr
    assert {p.name for p in output.iterdir()} == {
        "program.pt2", "model.safetensors", "inputs.safetensors", "config.json", "report.json", "report.md",
        "rank_allocation.png",
    }  # fmt: skip
    report = json.loads((output / "report.json").read_text())
    assert report["ratio"] == 0.5
    assert [(s["name"], s["rank"], s["macs_before"], s["macs_after"]) for s in report["sites"]] == [
        ("fc1", 16, 64 * 96, 16 * (64 + 96)),
        ("fc2", 8, 96 * 10, 8 * (96 + 10)),
    ]
    assert report["model_params_after"] == (64 * 16 + 16 * 96 + 96) + (96 * 8 + 8 * 10 + 10)
    assert report["totals"]["kept_fraction"] == pytest.approx(report["model_params_after"] / (64 * 96 + 96 + 96 * 10 + 10))
    assert [p["name"] for p in report["pass_log"]][0] == "capture"
    assert json.loads((output / "config.json").read_text())["ratio"] == 0.5
    markdown = (output / "report.md").read_text()
    assert re.search(r"\| fc1 \| 96x64 \| 16 \| 0\.426 \| 6,240 \| 2,656 \| 6\.14k \| 2\.56k \| [\d.e+-]+ \| break-even rank 39 \|", markdown)
    assert "| insert_teacher_student |" in markdown
    assert (output / "rank_allocation.png").read_bytes()[:8] == PNG_SIGNATURE
    assert "fc1   96x64    16  0.426" in done.stdout and "saved (reload checked" in done.stdout
    # The saved model is what the API makes from the same model.
    model, inputs = two_layer()
    expected = tunecomp_fx.compress(model, inputs, ratio=0.5)
    x = torch.randn(9, 64)
    torch.testing.assert_close(load_compact(output)(x), expected(x), rtol=1e-6, atol=1e-6)


def test_inspect_prints_sites_passes_graphs_and_writes_graph_files(tmp_path: Path) -> None:
    done = _run("inspect", "cli_models:two_layer", "--ratio", "0.5", "--site", "fc1", "--names", "2", "--graphs", str(tmp_path))
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "fc2   10x96     8  0.885" in out
    pass_row = next(line.split() for line in out.splitlines() if line.startswith("insert_teacher_student "))  # the table's row, then the names
    assert pass_row[1].startswith("0.0") and pass_row[2:] == ["+10", "-0"]
    assert "fold_blends - fc1, fc2 ... and 2 more" in out
    assert [line.split() for line in out.splitlines() if line.startswith(("nodes ", "linear maps"))] == [
        ["nodes", "5", "15", "7"],
        ["linear", "maps", "2", "6", "4"],
    ]
    assert "site fc1: call_module 64 -> 96, rank 16 (prepared model)" in out
    assert "site fc1: call_module 64 -> 96, rank 16 (compact model)" in out
    assert "[blend]  Blend alpha=1 beta=0" in out
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == sorted(f"{g}.{ext}" for g in ("captured", "prepared", "compact") for ext in ("graphml", "dot"))
    import networkx as nx

    assert nx.read_graphml(tmp_path / "compact.graphml").number_of_nodes() == 7


def _save_tiny_bert(folder: Path, heads: int) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=heads, intermediate_size=64,
        max_position_embeddings=32, num_labels=2,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(config).save_pretrained(folder)


def test_compress_from_a_hugging_face_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _save_tiny_bert(tmp_path / "bert", heads=2)
    assert main(["compress", str(tmp_path / "bert"), "--input-shape", "2,16", "-o", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "model: Hugging Face folder" in out and "(BertForSequenceClassification)" in out
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["capture_path"] == "torch.export"
    assert {s["name"] for s in report["sites"]} >= {"bert.encoder.layer.0.attention.self.query", "classifier"}


def test_compress_prunes_the_heads_and_neurons_of_a_hugging_face_bert(tmp_path: Path) -> None:
    _save_tiny_bert(tmp_path / "bert", heads=4)
    args = ["compress", str(tmp_path / "bert"), "--input-shape", "2,16", "--ratio", "0.6", "--prune-heads", "0.5", "--prune-neurons", "0.5"]
    assert main([*args, "-o", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    sites = {s["name"]: s for s in report["sites"]}
    for name in ("query", "key", "value"):
        assert sites[f"bert.encoder.layer.0.attention.self.{name}"]["reason"].startswith("16 of 32 output neurons kept (2 of 4 heads)")
    assert sites["bert.encoder.layer.0.attention.output.dense"]["reason"].startswith("16 of 32 input neurons kept")
    assert sites["bert.encoder.layer.0.intermediate.dense"]["reason"].startswith("32 of 64 output neurons kept")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["prune_heads"] == 0.5
    compact = load_compact(tmp_path / "out")
    attention = [n for n in compact.graph.nodes if "scaled_dot_product_attention" in str(n.target)]
    assert len(attention) == 1  # the student's, over two of the four heads; the teacher's is gone


def test_compress_embeddings_factorizes_a_hugging_face_berts_vocabulary(tmp_path: Path) -> None:
    _save_tiny_bert(tmp_path / "bert", heads=2)
    args = ["compress", str(tmp_path / "bert"), "--input-shape", "2,16", "--compress-embeddings", "-o", str(tmp_path / "out")]
    assert main(args) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["compress_embeddings"] is True
    sites = {s["name"]: s for s in json.loads((tmp_path / "out" / "report.json").read_text())["sites"]}
    words = sites["bert.embeddings.word_embeddings"]  # 100 x 32; the position (32 x 32) and token type tables are no sites
    assert (words["form"], words["decision"], words["params_before"]) == ("embedding", "rank", 100 * 32)
    assert words["reason"].startswith("table: its embedding lookup reads the student's factors")
    assert "bert.embeddings.position_embeddings" not in sites
    compact = load_compact(tmp_path / "out")
    assert "bert.embeddings.word_embeddings.weight" not in dict(compact.named_parameters())
    (lookup,) = [node for node in compact.graph.nodes if node.target is torch.ops.aten.embedding.default and "lowrank" in node.args[0].name]
    assert lookup.args[2:] == (0,)  # the student's lookup keeps BERT's padding row ([PAD], 0) out of the gradient


def test_export_writes_an_onnx_model_that_matches(compressed, tmp_path: Path) -> None:
    output, done = compressed
    assert done.returncode == 0, done.stderr
    onnx_path = tmp_path / "compact.onnx"
    exported = _run("export", str(output), "-o", str(onnx_path), "--latency", "5")
    assert exported.returncode == 0, exported.stderr
    assert f"wrote {onnx_path}" in exported.stdout and "ONNX Runtime latency: median" in exported.stdout
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 64)
    (actual,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(actual), load_compact(output)(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("options", "kept_params"), [((), (0.75, 0.85)), (("--compress-embeddings",), (0.55, 0.65))], ids=["linear", "tables"])
def test_demo_quick(tmp_path: Path, options: tuple[str, ...], kept_params: tuple[float, float]) -> None:
    done = _run("demo", "--quick", "--repeats", "2", "-o", str(tmp_path), *options)
    assert done.returncode == 0, done.stderr
    for name in ("model.onnx", "original.onnx", "config.json", "report.json", "report.md"):
        assert (tmp_path / name).is_file(), name
    result = json.loads((tmp_path / "report.json").read_text())
    rows = result["before_after"]
    low, high = kept_params  # MiniLM's tables hold about half its parameters
    assert low * rows["original"]["params"] < rows["compressed"]["params"] < high * rows["original"]["params"]
    assert rows["compressed"]["macs"] < 0.8 * rows["original"]["macs"]  # ratio 0.4 of the linear layers
    config = json.loads((tmp_path / "config.json").read_text())["compression"]
    assert (config["ratio"], config["compress_embeddings"]) == (0.4, bool(options))
    forms = {site["name"]: (site["form"], site["decision"]) for site in result["compression"]["sites"]}
    assert (forms.get("bert.embeddings.word_embeddings") == ("embedding", "rank")) == bool(options), forms
    assert "ORT b32 ms" in done.stdout and "compressed" in done.stdout


# (arguments, exit code, the one line expected on stderr)
BAD_ARGUMENTS = {
    "no command": ([], 2, "tunecomp-fx: error: the following arguments are required: COMMAND (see tunecomp-fx --help)"),
    "unknown command": (["frobnicate"], 2, "tunecomp-fx: error: argument COMMAND: invalid choice: 'frobnicate'"),
    "no model": (["compress"], 2, "tunecomp-fx compress: error: the following arguments are required: MODEL"),
    "ratio not a number": (["compress", "timm:resnet18", "--ratio", "half"], 2, "argument --ratio: invalid float value: 'half'"),
    "ratio out of range": (["compress", "cli_models:two_layer", "--ratio", "1.5"], 1, "ratio=1.5 is outside (0, 1)"),
    "unknown timm model": (["compress", "timm:vit_tiny_patch16_22"], 1, "timm has no model 'vit_tiny_patch16_22'; did you mean vit_tiny_patch16_224"),
    "unknown torchvision model": (["compress", "torchvision:resnet1"], 1, "torchvision has no model 'resnet1'; did you mean resnet18"),
    "pretrained offline": (["compress", "timm:resnet18", "--pretrained"], 1, "could not load pretrained weights for timm:resnet18"),
    "pretrained factory": (["compress", "cli_models:two_layer", "--pretrained"], 1, "--pretrained applies to timm: and torchvision: models"),
    "bad spec": (["inspect", "no_such_folder"], 1, "model spec 'no_such_folder' is not timm:NAME, torchvision:NAME"),
    "factory without inputs": (["inspect", "cli_models:two_layer_without_inputs"], 1, "returned no example inputs; give --input-shape"),
    "bad input shape": (["inspect", "cli_models:two_layer", "--input-shape", "1,x"], 1, "input shape '1,x' is not a comma-separated list"),
    "bad model kwargs": (["inspect", "timm:resnet18", "--model-kwargs", "{depth: 2}"], 1, "--model-kwargs is not valid JSON"),
    "unknown site": (["inspect", "cli_models:two_layer", "--site", "fc3"], 1, "no site named 'fc3'; sites include fc1, fc2"),
    "no heads to prune": (["compress", "cli_models:two_layer", "--prune-heads", "0.5"], 1, "prune_heads=0.5 found no attention heads to prune"),
    "export of a non-folder": (["export", "no_such_folder"], 1, "no_such_folder is not a saved compact model"),
}
# These also run as real processes (all at once: each is mostly interpreter start-up).
IN_SUBPROCESS = ["no model", "ratio out of range", "pretrained offline"]


@pytest.fixture(scope="module")
def bad_runs() -> dict[str, subprocess.CompletedProcess]:
    started = {case: _start(*BAD_ARGUMENTS[case][0]) for case in IN_SUBPROCESS}
    return {case: _finish(process) for case, process in started.items()}


def _assert_one_line_error(code: int, stderr: str, case: str) -> None:
    expected_code, expected = BAD_ARGUMENTS[case][1:]
    assert code == expected_code, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert expected in lines[0]


@pytest.mark.parametrize("case", IN_SUBPROCESS)
def test_bad_arguments_give_one_line_and_a_non_zero_exit(bad_runs, case: str) -> None:
    _assert_one_line_error(bad_runs[case].returncode, bad_runs[case].stderr, case)


@pytest.mark.parametrize("case", [case for case in BAD_ARGUMENTS if case not in ("pretrained offline",)])
def test_bad_arguments_in_process(case: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    # "pretrained offline" only as a process: the hub reads HF_HUB_OFFLINE when first imported.
    monkeypatch.chdir(TESTS)
    try:
        code = main(BAD_ARGUMENTS[case][0])
    except SystemExit as exit:  # argparse's own exit
        code = exit.code
    _assert_one_line_error(code, capsys.readouterr().err, case)


def test_debug_shows_the_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(TESTS)
    with pytest.raises(tunecomp_fx.ConfigError, match=r"ratio=1.5 is outside \(0, 1\)"):
        main(["--debug", "compress", "cli_models:two_layer", "--ratio", "1.5"])
    with pytest.raises(tunecomp_fx.ConfigError):
        main(["compress", "cli_models:two_layer", "--ratio", "1.5", "--debug"])


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_help_of_each_subcommand_describes_every_option() -> None:
    subcommands = _subcommands(build_parser())
    assert set(subcommands) == {"compress", "inspect", "export", "demo"}
    for name, parser in subcommands.items():
        text = parser.format_help()
        assert parser.description, name
        for action in parser._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
            assert (action.option_strings or [action.metavar or action.dest])[-1] in text


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"tunecomp-fx {tunecomp_fx.__version__}"
    assert tunecomp_fx.__version__ == importlib.metadata.version("tunecomp-fx")  # one source: pyproject reads it


def test_python_dash_m_runs_the_command_line() -> None:
    done = subprocess.run([sys.executable, "-m", "tunecomp_fx", "--version"], env=_env(), capture_output=True, text=True, timeout=300)
    assert (done.returncode, done.stdout.strip()) == (0, f"tunecomp-fx {tunecomp_fx.__version__}"), done.stderr


def test_the_command_line_starts_without_loading_torch_dynamo() -> None:
    # torch._dynamo (torch.compile's and torch.export's machinery) takes about two seconds to import:
    # only a capture through torch.export, or a compiled model, should pay for it
    check = "import sys, tunecomp_fx.cli; print(sorted(m for m in sys.modules if m.startswith('torch._dynamo')))"
    done = subprocess.run([sys.executable, "-c", check], env=_env(), capture_output=True, text=True, timeout=300)
    assert (done.returncode, done.stdout.strip()) == (0, "[]"), done.stderr
