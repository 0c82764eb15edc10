"""Four probes of what ONNX Runtime's CPU graph could still give the compressed models (benchmarks/README.md,
"Latency"; the first led to export/linear.py, the others were dropped):

  bias     every bias Add fed by a MatMul removed (wrong outputs, for timing only): the most that
           fusing the biases into the matmuls (Gemm, which needs 2-D activations) could give; run it
           on exports without tunecomp's linear translation, which fuses them
  gelu     the exact GELU forms ONNX Runtime runs, and its tanh approximation, on one FFN activation
  fusions  onnxscript's ORT fusions (optimize_for_ort: MultiHeadAttention, SkipLayerNormalization, ...)
           and MultiHeadAttention alone, on exports made with onnxscript's attention translation
  bias_gelu  on exports with tunecomp's linear translation: the bias of each Gemm whose output feeds a
           GELU (the FFN's first layer) moved out into an Add before the GELU, which ONNX Runtime fuses
           into BiasGelu, as it did with onnxscript's MatMul + Add (the same function, so outputs are compared)

Everything runs on the CPU provider with 1 thread (cpu_session), timed interleaved (compare_latency).
bias, fusions and bias_gelu take MiniLM ONNX files, the first one the baseline, e.g. those export_translations.py
writes with `--exports onnxscript attention -o benchmarks/results/export_translations/...`:

    python benchmarks/ort_latency_probes.py bias benchmarks/results/export_translations/onnx/{original,lowrank}.attention.onnx
    python benchmarks/ort_latency_probes.py fusions benchmarks/results/export_translations/onnx/{original,lowrank}.onnxscript.onnx
    python benchmarks/ort_latency_probes.py gelu
    python benchmarks/ort_latency_probes.py bias_gelu out/demo/original.onnx out/demo/model.onnx  # after `make demo`
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from tunecomp_fx.export import compare_latency, cpu_session

TOKENS = 32
FFN_WIDTH = 1536  # MiniLM's intermediate size


def token_feeds(session: ort.InferenceSession, batch: int) -> dict[str, np.ndarray]:
    """Random token ids with the last 7 positions padded, for a text classifier's inputs by name."""
    rng = np.random.default_rng(0)
    mask = np.ones((batch, TOKENS), dtype=np.int64)
    mask[:, -7:] = 0
    by_name = {
        "input_ids": rng.integers(1000, 20000, size=(batch, TOKENS)),
        "attention_mask": mask,
        "token_type_ids": np.zeros((batch, TOKENS), dtype=np.int64),
    }
    return {i.name: by_name[i.name] for i in session.get_inputs()}


def time_models(paths: dict[str, Path], repeats: int, same_function_as: dict[str, str]) -> None:
    """Median ms at batch 1 and 32, speedup over the first model, and for a model named in
    `same_function_as` the max |output difference| against the model it should compute the same function as."""
    baseline = next(iter(paths))
    sessions = {label: cpu_session(path, threads=1) for label, path in paths.items()}
    for batch in (1, 32):
        feeds = token_feeds(sessions[baseline], batch)
        outputs = {label: session.run(None, feeds)[0] for label, session in sessions.items()}
        timing = compare_latency(sessions, feeds, baseline=baseline, repeats=repeats, threads=1, warmup=2)
        for label in paths:
            line = f"batch {batch:2d}  {label:45s} {timing.results[label].median_ms:8.2f} ms  x{timing.speedups[label]:.3f}"
            if label in same_function_as:
                reference = same_function_as[label]
                line += f"  max |diff| against {reference}: {np.abs(outputs[label] - outputs[reference]).max():.1e}"
            print(line, flush=True)


def without_bias_adds(path: Path, folder: Path) -> Path:
    model = onnx.load(path)
    vectors = {init.name for init in model.graph.initializer if len(init.dims) == 1}
    matmul_outputs = {out for node in model.graph.node if node.op_type == "MatMul" for out in node.output}
    renamed = {}
    for node in list(model.graph.node):
        if node.op_type == "Add" and len(node.input) == 2 and {*node.input} & vectors and {*node.input} & matmul_outputs:
            renamed[node.output[0]] = next(name for name in node.input if name in matmul_outputs)
            model.graph.node.remove(node)
    for node in model.graph.node:
        for index, name in enumerate(node.input):
            node.input[index] = renamed.get(name, name)
    print(f"{path.name}: {len(renamed)} bias adds removed")
    out = folder / f"{path.stem}.no_bias.onnx"
    onnx.save(model, out)
    return out


def with_bias_before_gelu(path: Path, folder: Path) -> Path:
    model = onnx.load(path)
    producers = {out: node for node in model.graph.node for out in node.output}
    nodes = []
    for node in model.graph.node:
        if node.op_type == "Gelu":
            source = producers.get(node.input[0])
            gemm = producers.get(source.input[0]) if source is not None and source.op_type == "Reshape" else source
            if gemm is not None and gemm.op_type == "Gemm" and len(gemm.input) == 3:
                bias = gemm.input.pop()
                biased = f"{node.input[0]}_plus_bias"
                nodes.append(helper.make_node("Add", [node.input[0], bias], [biased]))
                node.input[0] = biased
        nodes.append(node)
    print(f"{path.name}: {len(nodes) - len(model.graph.node)} Gemm biases moved before their GELU")
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    out = folder / f"{path.stem}.bias_gelu.onnx"
    onnx.save(model, out)
    return out


def with_ort_fusions(path: Path, folder: Path, mha_only: bool) -> Path:
    from onnxscript.optimizer import optimize
    from onnxscript.rewriter.ort_fusions import optimize_for_ort
    from onnxscript.rewriter.ort_fusions._core import _pre_optimize
    from onnxscript.rewriter.ort_fusions.mha import fuse_mha1, fuse_mha2
    from onnxscript.rewriter.ort_fusions.mha_bias import fuse_mha_bias
    from onnxscript.rewriter.ort_fusions.sdpa import fuse_sdpa

    model = ir.load(path)
    if mha_only:
        model = _pre_optimize(model)
        counts = {"sdpa": fuse_sdpa(model, apply_shape_inference=True), "mha": fuse_mha1(model) + fuse_mha2(model),
                  "mha_bias": fuse_mha_bias(model)}
        optimize(model)
    else:
        model, counts = optimize_for_ort(model)
    print(f"{path.name} ({'MultiHeadAttention only' if mha_only else 'optimize_for_ort'}): "
          f"{ {name: count for name, count in counts.items() if count} }")
    out = folder / f"{path.stem}.{'mha' if mha_only else 'ort_fusions'}.onnx"
    ir.save(model, out)
    return out


def gelu_sessions() -> dict[str, ort.InferenceSession]:
    bias = numpy_helper.from_array(np.random.default_rng(0).normal(0, 0.1, FFN_WIDTH).astype(np.float32), "b")
    constants = [numpy_helper.from_array(np.array(v, dtype=np.float32), n) for n, v in
                 (("sqrt_half", 0.5 ** 0.5), ("one", 1.0), ("half", 0.5))]

    def session(nodes: list[onnx.NodeProto], disabled: tuple[str, ...] = ()) -> ort.InferenceSession:
        graph = helper.make_graph(
            nodes, "gelu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, TOKENS, FFN_WIDTH])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [bias, *constants])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)])
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"],
                                    disabled_optimizers=list(disabled))

    add = helper.make_node("Add", ["x", "b"], ["xb"])
    return {
        "BiasGelu (what ORT fuses exact GELU into)": session([helper.make_node("BiasGelu", ["x", "b"], ["y"], domain="com.microsoft")]),
        "Add + Gelu (opset 20), unfused": session([add, helper.make_node("Gelu", ["xb"], ["y"])], ("BiasGeluFusion",)),
        "Add + com.microsoft.Gelu, unfused": session(
            [add, helper.make_node("Gelu", ["xb"], ["y"], domain="com.microsoft")], ("BiasGeluFusion",)),
        "Add, Mul, Erf, Add, Mul, Mul, unfused": session([
            add, helper.make_node("Mul", ["xb", "sqrt_half"], ["t"]), helper.make_node("Erf", ["t"], ["e"]),
            helper.make_node("Add", ["e", "one"], ["e1"]), helper.make_node("Mul", ["xb", "e1"], ["m"]),
            helper.make_node("Mul", ["m", "half"], ["y"])], ("GeluFusion", "BiasGeluFusion")),
        "FastGelu (tanh approximation)": session([helper.make_node("FastGelu", ["x", "b"], ["y"], domain="com.microsoft")]),
        "Add alone": session([add, helper.make_node("Identity", ["xb"], ["y"])]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("probe", choices=("bias", "gelu", "fusions", "bias_gelu"))
    parser.add_argument("models", type=Path, nargs="*", help="ONNX files (bias, fusions, bias_gelu); the first is the baseline")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if args.probe != "gelu" and not args.models:
        parser.error(f"{args.probe} needs ONNX files")
    folder = Path(tempfile.mkdtemp(prefix=f"ort_{args.probe}_"))
    if args.probe == "gelu":
        sessions = gelu_sessions()
        exact = next(iter(sessions))
        for batch in (1, 32):
            x = np.random.default_rng(1).normal(0, 1, (batch, TOKENS, FFN_WIDTH)).astype(np.float32)
            timing = compare_latency(sessions, {"x": x}, baseline=exact, repeats=10 * args.repeats, threads=1, warmup=5)
            reference = sessions[exact].run(None, {"x": x})[0]
            for label, session in sessions.items():
                difference = np.abs(session.run(None, {"x": x})[0] - reference).max()
                print(f"batch {batch:2d}  {label:42s} {1000 * timing.results[label].median_ms:8.1f} us  "
                      f"max |diff| against BiasGelu: {difference:.1e}", flush=True)
        return 0
    paths = {path.stem: path for path in args.models}
    same_function_as = {}
    for path in args.models:
        if args.probe == "bias":
            variants = {"no bias adds": without_bias_adds(path, folder)}
        elif args.probe == "bias_gelu":
            variants = {"bias before GELU": with_bias_before_gelu(path, folder)}
        else:
            variants = {"ort fusions": with_ort_fusions(path, folder, mha_only=False),
                        "MultiHeadAttention only": with_ort_fusions(path, folder, mha_only=True)}
        for name, variant in variants.items():
            paths[f"{path.stem}, {name}"] = variant
            if args.probe != "bias":  # the bias probe's variants compute something else
                same_function_as[f"{path.stem}, {name}"] = path.stem
    time_models(paths, args.repeats, same_function_as)
    return 0


if __name__ == "__main__":
    sys.exit(main())
