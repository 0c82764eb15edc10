"""ONNX export, ONNX Runtime verification and latency (installed as tunecomp_fx.export)."""

from .latency import LatencyComparison, LatencyResult, compare_latency, ort_latency
from .onnx import ExportResult, to_onnx

__all__ = ["ExportResult", "LatencyComparison", "LatencyResult", "compare_latency", "ort_latency", "to_onnx"]
