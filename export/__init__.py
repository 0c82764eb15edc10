"""ONNX export, ONNX Runtime verification and latency (installed as tunecomp_fx.export)."""
