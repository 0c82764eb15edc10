"""ONNX Runtime latency: one model, or several interleaved so that their ratios are fair."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from os import PathLike

import numpy as np
import onnxruntime as ort

from tunecomp_fx.errors import ConfigError
from tunecomp_fx.progress import progress_bar

from ._ort import Inputs, cpu_session, make_feed


@dataclass(frozen=True)
class LatencyResult:
    """Latency of one ONNX model over `repeats` timed runs, in milliseconds."""

    median_ms: float
    p90_ms: float
    min_ms: float
    repeats: int


@dataclass(frozen=True)
class LatencyComparison:
    """Interleaved latencies per label, and each label's speedup (baseline median / its median)."""

    results: dict[str, LatencyResult]
    baseline: str
    speedups: dict[str, float]


def ort_latency(
    path: str | PathLike[str],
    inputs: Inputs,
    *,
    warmup: int = 5,
    repeats: int = 30,
    threads: int | None = None,
    progress: bool = False,
) -> LatencyResult:
    """Time ONNX Runtime on `inputs` (keyed by ONNX input name, or positional) after `warmup` untimed runs."""
    return compare_latency(
        {"model": path}, inputs, baseline="model", warmup=warmup, repeats=repeats, threads=threads, progress=progress
    ).results["model"]


def compare_latency(
    paths_by_label: Mapping[str, str | PathLike[str] | ort.InferenceSession],
    inputs: Inputs,
    *,
    baseline: str,
    warmup: int = 5,
    repeats: int = 30,
    threads: int | None = None,
    progress: bool = False,
) -> LatencyComparison:
    """Time several ONNX models on the same inputs, round-robin, so that load spikes hit all of them alike.

    A value is an ONNX file (opened with `cpu_session`, `threads` intra-op threads) or a session
    opened by the caller (to compare session options). Every session is built once before any timing;
    the order within a round rotates so that no model always runs right after the same neighbour.
    `progress` shows a bar over the rounds (warm-up and timed).
    """
    if baseline not in paths_by_label:
        raise ConfigError(f"baseline {baseline!r} is not one of the labels {list(paths_by_label)}")
    if warmup < 0 or repeats < 1:
        raise ConfigError(f"need warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
    runs: dict[str, Callable[[], object]] = {}
    for label, path in paths_by_label.items():
        session = path if isinstance(path, ort.InferenceSession) else cpu_session(path, threads)
        feed = make_feed(session, inputs)
        runs[label] = lambda session=session, feed=feed: session.run(None, feed)

    labels = list(runs)
    samples_ms: dict[str, list[float]] = {label: [] for label in labels}
    with progress_bar(total=warmup + repeats, desc="latency (warm-up)", leave=False, enabled=progress) as bar:
        for _ in range(warmup):
            for label in labels:
                runs[label]()
            bar.update()
        bar.set_description("latency")
        for round_index in range(repeats):
            shift = round_index % len(labels)
            for label in labels[shift:] + labels[:shift]:
                start = time.perf_counter()
                runs[label]()
                samples_ms[label].append((time.perf_counter() - start) * 1e3)
            bar.update()  # between rounds, outside the timed calls

    results = {label: _summarize(samples) for label, samples in samples_ms.items()}
    base_median = results[baseline].median_ms
    speedups = {label: base_median / result.median_ms for label, result in results.items()}
    return LatencyComparison(results=results, baseline=baseline, speedups=speedups)


def _summarize(samples_ms: list[float]) -> LatencyResult:
    samples = np.asarray(samples_ms)
    return LatencyResult(
        median_ms=float(np.median(samples)),
        p90_ms=float(np.percentile(samples, 90)),
        min_ms=float(samples.min()),
        repeats=len(samples),
    )
