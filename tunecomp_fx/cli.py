"""The tunecomp-fx command line: compress, inspect, export, demo.

Every failure prints one line naming what is wrong and exits non-zero; --debug shows the traceback."""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from tunecomp_fx.config import ALLOCATIONS, INITS, METHODS, CompressionConfig
from tunecomp_fx.errors import CalibrationError, InputError, TunecompError
from tunecomp_fx.model_spec import SPEC_HELP, LoadedModel, load_model, parse_shape

PROG = "tunecomp-fx"


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
        help="compression method (default tunecomp); union needs labelled calibration data, which only the "
        "Python API takes (tunecomp_fx.compress(..., method='union', calib=[(inputs, targets), ...]))",
    )
    group.add_argument("--init", choices=INITS, default="whitened", help="student initialization (default whitened)")
    group.add_argument(
        "--allocation", choices=ALLOCATIONS, default="uniform", help="how ranks are spread over sites (default uniform)"
    )
    group.add_argument(
        "--exclude", action="append", default=[], metavar="PATTERN", help="leave sites matching this glob dense (repeatable)"
    )
    group.add_argument("--rank-multiple", type=int, default=8, help="round ranks to a multiple of this (default 8)")


def _config(args: argparse.Namespace) -> CompressionConfig:
    if args.method == "union":
        raise CalibrationError(
            "--method union calibrates on the loss's gradients and needs labelled batches, which the command "
            "line does not take (it compresses on random example inputs); use the Python API: "
            "tunecomp_fx.compress(model, inputs, ratio, method='union', calib=[(inputs, targets), ...]) or data=loader"
        )
    return CompressionConfig(
        ratio=args.ratio,
        method=args.method,
        init=args.init,
        allocation=args.allocation,
        exclude=tuple(args.exclude),
        rank_multiple=args.rank_multiple,
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
    config = _config(args)  # check the options before the slow imports and model load
    from tunecomp_fx.api import compress, get_report
    from tunecomp_fx.export.artifacts import save_compact
    from tunecomp_fx.plots import plot_rank_allocation

    loaded = _load(args)
    compact = compress(loaded.model, loaded.example_inputs, config=config, progress=True)
    report = get_report(compact)
    output = Path(args.output)
    print(f"saving to {output}: torch.export program, safetensors weights, then a reload check")
    saved = save_compact(compact, output, loaded.example_inputs)
    plot = plot_rank_allocation(report, output / "rank_allocation.png")
    print()
    print(report)
    print(f"\nsaved (reload checked, max abs error {saved.max_abs_error:.2g}):")
    for path in (*saved.files, plot):
        print(f"  {path}")
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    config = _config(args)
    from tunecomp_fx.api import finalize, get_report, prepare
    from tunecomp_fx.capture import capture
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
    captured = capture(copy.deepcopy(loaded.model), loaded.example_inputs)
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
    print(describe_export(export.to_onnx(model, inputs, output, verify=not args.no_verify)))
    if args.latency > 0:
        latency = export.ort_latency(output, inputs, repeats=args.latency)
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
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    compress = commands.add_parser(
        "compress",
        help="compress a model and save it with its report",
        description="Compress a model (training-free: calibrate, initialize the low-rank students, allocate "
        "ranks, finalize) and save the compact model (program.pt2 + model.safetensors), its example inputs, "
        "config, report (JSON, markdown) and a rank-allocation plot.",
    )
    _add_model_arguments(compress)
    _add_config_arguments(compress)
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
