"""The tunecomp-fx command line: compress, inspect, export, demo.

Every failure prints one line naming what is wrong and exits non-zero; --debug shows the traceback."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from tunecomp_fx import __version__
from tunecomp_fx.config import ALLOCATIONS, INITS, METHODS, CompressionConfig
from tunecomp_fx.data_spec import DATA_HELP, named_dataset
from tunecomp_fx.errors import CalibrationError, ConfigError, InputError, TunecompError
from tunecomp_fx.inputs import Inputs
from tunecomp_fx.loss_spec import LOSS_HELP, METRICS, Objective, objective
from tunecomp_fx.model_spec import SPEC_HELP, LoadedModel, load_model, parse_shape
from tunecomp_fx.schedules import BLENDS, LR_DECAYS, MIXES
from tunecomp_fx.train import DEFAULT_RANK_SLACK, TRAINING_KEY, TrainingConfig

PROG = "tunecomp-fx"
CALIBRATION_BATCHES = 8  # training batches a trained compress calibrates on
BATCH_SIZE = 32  # of a named data set
EVALUATIONS = 10  # evaluations per run when --eval-data is given without --eval-every
# The training options, all None unless given, so that any of them without --data is an error.
TRAINING_OPTIONS = (
    "steps", "epochs", "lr", "lr_scale", "lr_decay", "blend", "blend_mix", "blend_steps", "distill_weight", "train_teachers", "rank_slack",
    "width_slack", "batch_size", "eval_data", "eval_every", "loss", "metric",
)  # fmt: skip
_NOT_IN_TRAINING_CONFIG = ("rank_slack", "width_slack", "batch_size", "eval_data", "eval_every", "loss", "metric")


class _Parser(argparse.ArgumentParser):
    """Bad arguments: one line and exit code 2, instead of argparse's usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_debug(parser: argparse.ArgumentParser, default: Any) -> None:
    # SUPPRESS on subcommands so that `tunecomp-fx --debug compress ...` is not reset by the subparser.
    parser.add_argument("--debug", action="store_true", default=default, help="show full tracebacks on errors")


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("model", metavar="MODEL", help=f"the model: {SPEC_HELP}")
    group.add_argument(
        "--input-shape",
        metavar="SHAPE",
        help="shape of the random example input, e.g. 1,3,224,224 (images) or 1,128 (text: batch,sequence); "
        "default: the model's own input size, batch 1",
    )
    group.add_argument(
        "--model-kwargs",
        metavar="JSON",
        default="{}",
        help='keyword arguments for the model constructor or factory, as JSON, e.g. \'{"num_classes": 10}\'',
    )
    group.add_argument(
        "--pretrained", action="store_true", help="load pretrained timm/torchvision weights (from the local cache when offline)"
    )
    group.add_argument("--seed", type=int, default=0, help="seed for random init and random example inputs (default 0)")


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("compression")
    group.add_argument(
        "--ratio", type=float, default=0.4, help="fraction of the compressed layers' parameters to remove (default 0.4)"
    )
    group.add_argument(
        "--method",
        choices=METHODS,
        default="tunecomp",
        help="compression method (default tunecomp); union calibrates on the loss's gradients and needs "
        "labelled data: compress --data",
    )
    group.add_argument("--init", choices=INITS, default="whitened", help="student initialization (default whitened)")
    group.add_argument(
        "--allocation", choices=ALLOCATIONS, default="uniform", help="how ranks are spread over sites (default uniform)"
    )
    group.add_argument(
        "--exclude", action="append", default=[], metavar="PATTERN", help="leave sites matching this glob dense (repeatable)"
    )
    group.add_argument(
        "--rank-multiple", type=int, default=8,
        help="round ranks to a multiple of this (default 8; 16 matches ONNX Runtime's CPU matmul panels: 1-3%% faster, "
        "about a third of a point less accurate at ratio 0.7 on MiniLM)",
    )
    group.add_argument(
        "--prune-neurons", type=float, default=0.0, metavar="FRACTION",
        help="remove this fraction of the neurons of every hidden width up -> activation -> down (an FFN; the channels "
        "of an inverted residual, batch norms, depthwise convolution and squeeze-excitation included; the groups of a "
        "grouped convolution, as in RegNet and ResNeXt), the rest of the ratio by rank (default 0: off)",
    )
    group.add_argument(
        "--prune-heads", type=float, default=0.0, metavar="FRACTION",
        help="remove this fraction of the heads of every attention block (query, key, value or a fused qkv -> "
        "scaled_dot_product_attention or softmax(q @ k^T) @ v -> output), the rest of the ratio by rank (default 0: off)",
    )
    group.add_argument(
        "--compress-embeddings", action="store_true",
        help="also factorize each embedding table that plain lookups (or sum and mean bags) alone read and that has more rows than features "
        "(a vocabulary), counted in the ratio: less memory, a little more compute per token (default off)",
    )


def _steps_or_fraction(text: str) -> int | float:
    """'200' -> 200 steps, '0.5' -> half the run."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    raise argparse.ArgumentTypeError(f"{text!r} is neither a step count (e.g. 200) nor a fraction of the run (e.g. 0.5)")


def _lr_scale(text: str) -> tuple[str, float]:
    """'lowrank.words.*=0.1' -> ("lowrank.words.*", 0.1); TrainingConfig checks the factor."""
    pattern, equals, factor = text.rpartition("=")
    try:
        if equals and pattern:
            return pattern, float(factor)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"{text!r} is not PATTERN=FACTOR (e.g. 'lowrank.words.*=0.1')")


def _add_training_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = TrainingConfig()
    group = parser.add_argument_group("joint training (with --data; without it, compress is training-free)")
    group.add_argument(
        "--data",
        metavar="SPEC",
        help=f"labelled training batches, trained on with --loss: {DATA_HELP}. A named set is shaped to "
        "the model's example inputs (images resized or flattened; texts tokenized by a Hugging Face folder's "
        "tokenizer to the --input-shape sequence length); calibration uses its first batches",
    )
    group.add_argument(
        "--eval-data", metavar="SPEC", help="evaluation batches, same kinds (a named set gives its validation split): --metric during the run"
    )
    group.add_argument("--loss", metavar="SPEC", help=f"what training minimizes: {LOSS_HELP}")
    group.add_argument(
        "--metric", metavar="SPEC",
        help=f"what --eval-data is scored by: {', '.join(METRICS)}, or module.path:function returning the batch's mean "
        "(default: accuracy with cross-entropy, else the loss itself)",
    )  # fmt: skip
    group.add_argument("--steps", type=int, metavar="N", help="optimizer steps (or --epochs)")
    group.add_argument("--epochs", type=float, metavar="E", help="passes over the training data (or --steps)")
    group.add_argument("--batch-size", type=int, help=f"batch size of a named data set (default {BATCH_SIZE})")
    group.add_argument("--lr", type=float, help=f"peak AdamW learning rate (default {defaults.lr:g})")
    group.add_argument(
        "--lr-scale", type=_lr_scale, action="append", metavar="PATTERN=FACTOR",
        help="train the parameters whose names match the fnmatch PATTERN at FACTOR x --lr (repeatable; the first match "
        "wins), e.g. 'lowrank.words.*=0.1' for an embedding table's factors",
    )  # fmt: skip
    group.add_argument(
        "--lr-decay", choices=LR_DECAYS,
        help=f"after the warm-up (default {defaults.lr_decay}); cosine_after_blend holds the peak through the blend, "
        "then decays over the steps the students train alone",
    )  # fmt: skip
    group.add_argument("--blend", choices=BLENDS, help=f"schedule of the teacher-to-student blend (default {defaults.blend})")
    group.add_argument(
        "--blend-mix", choices=MIXES, help=f"the student's blend weight: 1 - alpha or sqrt(1 - alpha^2) (default {defaults.blend_mix})"
    )
    group.add_argument(
        "--blend-steps",
        type=_steps_or_fraction,
        metavar="T",
        help="steps (int) or fraction of the run (float) until the teachers are gone (default: the --ratio, at most 0.5)",
    )
    group.add_argument(
        "--distill-weight",
        type=float,
        metavar="W",
        help=f"initial weight of the layer-wise feature loss, decaying with the blend (default {defaults.distill_weight:g})",
    )
    group.add_argument(
        "--train-teachers",
        action="store_true",
        default=None,
        help="train the teachers' weights too until they leave (default: the pretrained teachers stay frozen)",
    )
    group.add_argument(
        "--rank-slack",
        type=float,
        metavar="S",
        help=f"extra rank a student starts with, as a fraction of its budget, pruned away by the end of the blend "
        f"(default {DEFAULT_RANK_SLACK:g}; 0 with --method union, which trains fixed-rank cores)",
    )
    group.add_argument(
        "--width-slack",
        type=float,
        metavar="S",
        help="with --prune-neurons/--prune-heads: extra neurons (heads) of each pruned width the students start with, "
        "as a fraction of what is kept, pruned away by the end of the blend (default 0: the width is cut at once)",
    )
    group.add_argument(
        "--eval-every", type=int, metavar="N", help=f"evaluate every N steps (default: {EVALUATIONS} times per run)"
    )


def _training(args: argparse.Namespace) -> TrainingConfig | None:
    """The run's TrainingConfig with --data, None without (then no training option may be given)."""
    given = {name: getattr(args, name) for name in TRAINING_OPTIONS if getattr(args, name) is not None}
    if args.data is None:
        if given:
            options = ", ".join(f"--{name.replace('_', '-')}" for name in given)
            verb = "applies" if len(given) == 1 else "apply"
            raise ConfigError(f"{options} {verb} to joint training: give the training data with --data (e.g. --data digits)")
        return None
    named_dataset(args.data)  # a misspelt name fails before the model loads
    if args.steps is None and args.epochs is None:
        raise ConfigError("give the length of the joint run: --steps N or --epochs E")
    for option in ("eval_every", "metric"):
        if getattr(args, option) is not None and args.eval_data is None:
            raise ConfigError(f"--{option.replace('_', '-')} needs evaluation batches: give --eval-data")
    fields = {name: value for name, value in given.items() if name not in _NOT_IN_TRAINING_CONFIG}
    return TrainingConfig(**fields, seed=args.seed)


def _config(args: argparse.Namespace, trains: bool) -> CompressionConfig:
    if args.method == "union" and not trains:
        where = "give them with --data SPEC --steps N" if args.command == "compress" else "inspect takes none; use compress --data SPEC --steps N"
        raise CalibrationError(f"--method union calibrates on the loss's gradients and needs labelled batches: {where}")
    return CompressionConfig(
        ratio=args.ratio,
        method=args.method,
        init=args.init,
        allocation=args.allocation,
        exclude=tuple(args.exclude),
        rank_multiple=args.rank_multiple,
        rank_slack=getattr(args, "rank_slack", None),  # None: the run's default (inspect has no training options)
        prune_neurons=args.prune_neurons,
        prune_heads=args.prune_heads,
        compress_embeddings=args.compress_embeddings,
        width_slack=getattr(args, "width_slack", None) or 0.0,  # inspect has no training options
    )


def _load(args: argparse.Namespace) -> LoadedModel:
    try:
        kwargs = json.loads(args.model_kwargs)
    except json.JSONDecodeError as error:
        raise InputError(f"--model-kwargs is not valid JSON ({error}); e.g. '{{\"num_classes\": 10}}'") from None
    if not isinstance(kwargs, dict):
        raise InputError("--model-kwargs must be a JSON object, e.g. '{\"num_classes\": 10}'")
    shape = parse_shape(args.input_shape) if args.input_shape else None
    loaded = load_model(args.model, input_shape=shape, pretrained=args.pretrained, model_kwargs=kwargs, seed=args.seed)
    print(f"model: {loaded.source}")
    return loaded


def run_compress(args: argparse.Namespace) -> int:
    training = _training(args)  # check the options before the slow imports and model load
    goal = objective(args.loss, args.metric) if training is not None else None
    config = _config(args, trains=training is not None)
    from tunecomp_fx.api import compress, get_report
    from tunecomp_fx.export.artifacts import save_compact
    from tunecomp_fx.plots import plot_joint_training, plot_rank_allocation
    from tunecomp_fx.report import training_summary

    loaded = _load(args)
    if training is None:
        compact, example = compress(loaded.model, loaded.example_inputs, config=config, progress=True), loaded.example_inputs
    else:
        compact, example = _train(args, loaded, config, training, goal)
    report = get_report(compact)
    output = Path(args.output)
    print(f"saving to {output}: torch.export program, safetensors weights, then a reload check")
    saved = save_compact(compact, output, example)
    plots = [plot_rank_allocation(report, output / "rank_allocation.png")]
    trained = compact.meta.get(TRAINING_KEY)
    if trained is not None:
        plots += plot_joint_training(trained, output)
    print()
    print(report)
    if trained is not None:
        print("\n".join(training_summary(trained)))
    print(f"\nsaved (reload checked, max abs error {saved.max_abs_error:.2g}):")
    for path in (*saved.files, *plots):
        print(f"  {path}")
    return 0


def _train(
    args: argparse.Namespace, loaded: LoadedModel, config: CompressionConfig, training: TrainingConfig, goal: Objective
) -> tuple[Any, Inputs]:
    """Joint fine-tuning and compression on --data, minimizing goal's loss; returns the compact model and
    its example inputs (two rows of the first training batch: real data, and a batch torch.export keeps
    dynamic)."""
    from tunecomp_fx.api import compress
    from tunecomp_fx.data_spec import calibration_batches, check_model_fits, first_rows, load_batches

    shaping = {
        "model_spec": args.model, "example_inputs": loaded.example_inputs, "batch_size": args.batch_size or BATCH_SIZE,
        "seed": args.seed,
    }  # fmt: skip
    data = load_batches(args.data, split="train", **shaping)
    print(f"data: {data.source}")
    check_model_fits(loaded.model, data, f"--data {args.data}", goal)
    evaluation = None
    if args.eval_data is not None:
        evaluation = load_batches(args.eval_data, split="validation", **shaping)
        print(f"eval data: {evaluation.source}")
        check_model_fits(loaded.model, evaluation, f"--eval-data {args.eval_data}", goal)
    example = first_rows(data.first[0], 2)
    calib = calibration_batches(data, CALIBRATION_BATCHES, labelled=config.method == "union")
    compact = compress(
        loaded.model, example, config=config, calib=calib, data=data.data,
        eval_data=evaluation.data if evaluation else None, training=training,
        eval_every=_eval_every(args, training, data.data) if evaluation else None, progress=True,
        loss_fn=goal.loss_fn, metric_fn=goal.metric_fn,
    )  # fmt: skip
    compact.meta[TRAINING_KEY].update(data=data.source, eval_data=evaluation.source if evaluation else None, loss=goal.loss)
    return compact, example


def _eval_every(args: argparse.Namespace, training: TrainingConfig, data: Any) -> int | None:
    if args.eval_every is not None:
        return args.eval_every
    if training.steps is not None:
        total = training.steps
    elif hasattr(data, "__len__"):
        total = round(training.epochs * len(data))
    else:
        return None  # the driver asks for --steps on data without a length
    return max(1, total // EVALUATIONS)


def run_inspect(args: argparse.Namespace) -> int:
    config = _config(args, trains=False)
    from tunecomp_fx.api import finalize, get_report, prepare
    from tunecomp_fx.capture import capture, working_copy
    from tunecomp_fx.inspect import (
        format_graph_summaries,
        format_pass_log,
        graph_summary,
        pass_log,
        site_subgraph,
        write_dot,
        write_graphml,
    )
    from tunecomp_fx.sites import set_blend

    loaded = _load(args)
    captured = capture(working_copy(loaded.model), loaded.example_inputs)
    prepared = prepare(loaded.model, loaded.example_inputs, config=config, progress=True)
    subgraphs = [site_subgraph(prepared, name) for name in args.site]  # before the blends move
    set_blend(prepared, 0.0)
    compact = finalize(prepared)
    graphs = {"captured": captured.graph_module, "prepared": prepared, "compact": compact}

    print("\nSites and what compress does to each:\n")
    print(get_report(compact))
    print("\nPasses:\n")
    print(format_pass_log(pass_log(compact), names=args.names))
    print("\nGraphs:\n")
    print(format_graph_summaries({label: graph_summary(gm) for label, gm in graphs.items()}))
    for name, prepared_text in zip(args.site, subgraphs):
        print(f"\n{prepared_text}\n\n{site_subgraph(compact, name)}")
    if args.graphs:
        folder = Path(args.graphs)
        folder.mkdir(parents=True, exist_ok=True)
        print(f"\ngraphs written to {folder}:")
        for label, gm in graphs.items():
            for path in (write_graphml(gm, folder / f"{label}.graphml"), write_dot(gm, folder / f"{label}.dot")):
                print(f"  {path}")
    return 0


def describe_export(result: Any) -> str:
    """One line for a tunecomp_fx.export.ExportResult: the file, the exporter, the verification."""
    errors = "; ".join(f"{shapes}: {error:.1e}" for shapes, error in result.max_errors.items()) or "not verified"
    return f"wrote {result.path} ({result.exporter} exporter); ONNX Runtime vs PyTorch max abs error {errors}"


def run_export(args: argparse.Namespace) -> int:
    from tunecomp_fx import export
    from tunecomp_fx.export.artifacts import load_compact, load_inputs

    folder = Path(args.folder)
    model = load_compact(folder)
    inputs = load_inputs(folder)
    output = Path(args.output) if args.output else folder / "model.onnx"
    if not hasattr(export, "to_onnx"):
        raise TunecompError("this build of tunecomp_fx has no ONNX exporter (tunecomp_fx.export.to_onnx)")
    print(describe_export(export.to_onnx(model, inputs, output, verify=not args.no_verify, progress=True)))
    if args.latency > 0:
        latency = export.ort_latency(output, inputs, repeats=args.latency, progress=True)
        print(f"ONNX Runtime latency: median {latency.median_ms:.3f} ms over {args.latency} runs")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from tunecomp_fx import demo

    return demo.run(args)


def build_parser() -> argparse.ArgumentParser:
    from tunecomp_fx import demo

    parser = _Parser(
        prog=PROG,
        description="Compress pretrained models by replacing linear layers with low-rank students, "
        "as a torch.fx pass pipeline.",
        epilog=f"Run '{PROG} COMMAND --help' for each command's options.",
    )
    _add_debug(parser, False)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    compress = commands.add_parser(
        "compress",
        help="compress a model and save it with its report",
        description="Compress a model and save the compact model (program.pt2 + model.safetensors), its example "
        "inputs, config, report (JSON, markdown) and a rank-allocation plot. Without --data it is training-free "
        "(calibrate on the example inputs, initialize the low-rank students, allocate ranks, finalize); with "
        "--data it fine-tunes and compresses jointly, and also saves the training history in the report and "
        "plots of the blend/distillation schedules (schedules.png) and of the loss and accuracy (training.png).",
    )
    _add_model_arguments(compress)
    _add_config_arguments(compress)
    _add_training_arguments(compress)
    compress.add_argument("-o", "--output", default="tunecomp-out", help="output folder (default ./tunecomp-out)")
    compress.set_defaults(handler=run_compress)

    inspect = commands.add_parser(
        "inspect",
        help="show the sites, what would happen to each, the passes and the graphs",
        description="Dry run: capture the model, list every linear site with its shape and what compress "
        "would do to it, the log of what each pass added and removed, and node counts of the captured, "
        "prepared and compact graphs. Nothing is saved unless --graphs is given.",
    )
    _add_model_arguments(inspect)
    _add_config_arguments(inspect)
    inspect.add_argument("--site", action="append", default=[], metavar="NAME", help="print this site's subgraph (repeatable)")
    inspect.add_argument("--names", type=int, default=0, metavar="N", help="list up to N node names each pass added/removed")
    inspect.add_argument(
        "--graphs", metavar="DIR", help="write the captured, prepared and compact graphs as GraphML and DOT files to DIR"
    )
    inspect.set_defaults(handler=run_inspect)

    export = commands.add_parser(
        "export",
        help="export a saved compact model to ONNX",
        description="Export a folder written by 'compress' to ONNX (dynamic batch), checked against "
        "PyTorch in ONNX Runtime, optionally timing it.",
    )
    export.add_argument("folder", metavar="FOLDER", help="a folder written by 'tunecomp-fx compress'")
    export.add_argument("-o", "--output", help="the ONNX file (default FOLDER/model.onnx)")
    export.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime check against PyTorch")
    export.add_argument("--latency", type=int, default=0, metavar="N", help="time N ONNX Runtime runs (default 0: no timing)")
    export.set_defaults(handler=run_export)

    demo_parser = commands.add_parser("demo", help=demo.SUMMARY, description=demo.DESCRIPTION)
    demo.add_arguments(demo_parser)
    demo_parser.set_defaults(handler=run_demo)

    for subparser in (compress, inspect, export, demo_parser):
        _add_debug(subparser, argparse.SUPPRESS)
    return parser


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    if isinstance(error, TunecompError):
        return text
    return f"{type(error).__name__}: {text} (run with --debug for the traceback)"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not sys.stderr.isatty():  # the Hugging Face libraries' bars too stay out of logs (read when first imported)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if args.debug:
            raise
        print(f"{PROG} {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
