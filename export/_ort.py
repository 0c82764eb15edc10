"""ONNX Runtime plumbing shared by verification and latency: one way to open a session and feed it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from os import PathLike

import numpy as np
import onnxruntime as ort
import torch

from tunecomp_fx.errors import InputError

ArrayLike = np.ndarray | torch.Tensor
Inputs = Mapping[str, ArrayLike] | Sequence[ArrayLike]


# ONNX Runtime graph fusions that make float32 models slower on its CPU provider. SkipLayerNormFusion
# (residual Add + LayerNormalization into one SkipLayerNormalization kernel): on all-MiniLM-L6-v2 at
# batch 32 x 32 tokens (ORT 1.32, 1 thread) the fused kernels took 28 ms where LayerNormalization
# takes 3, and every model ran in 6-16% less time without the fusion, the compressed ones most
# (benchmarks/results/minilm_sentiment/ort_fusions.md).
SLOW_CPU_FUSIONS = ("SkipLayerNormFusion",)


def cpu_session(
    path: str | PathLike[str], threads: int | None = None, options: ort.SessionOptions | None = None
) -> ort.InferenceSession:
    """An InferenceSession on the CPU provider without SLOW_CPU_FUSIONS; `threads` caps intra-op
    threads (None: ORT's default); `options` for anything else (profiling, say)."""
    options = options or ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(
        str(path), options, providers=["CPUExecutionProvider"], disabled_optimizers=list(SLOW_CPU_FUSIONS)
    )


def to_numpy(value: ArrayLike) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def make_feed(session: ort.InferenceSession, inputs: Inputs) -> dict[str, np.ndarray]:
    """Match `inputs` (keyed by ONNX input name, or positional in graph order) to the session's inputs."""
    names = [node.name for node in session.get_inputs()]
    if isinstance(inputs, Mapping):
        if set(inputs) != set(names):
            raise InputError(
                f"inputs are keyed {sorted(inputs)} but the ONNX model expects {names}; "
                "key them by these names or pass them positionally"
            )
        return {name: to_numpy(inputs[name]) for name in names}
    if len(inputs) != len(names):
        raise InputError(
            f"got {len(inputs)} positional inputs but the ONNX model expects {len(names)}: {names}"
        )
    return {name: to_numpy(value) for name, value in zip(names, inputs)}
