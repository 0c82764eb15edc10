"""ONNX export, ONNX Runtime verification and latency (installed as tunecomp_fx.export)."""

from ._ort import SLOW_CPU_FUSIONS, cpu_session
from .latency import LatencyComparison, LatencyResult, compare_latency, ort_latency
from .onnx import ExportResult, to_onnx

__all__ = ["SLOW_CPU_FUSIONS", "cpu_session", "ExportResult", "LatencyComparison", "LatencyResult", "compare_latency", "ort_latency", "to_onnx"]
