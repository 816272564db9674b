"""ONNX writers and their verification against onnxruntime."""
from .onnx_qdq import export_onnx, layer_summary
from .verify import VerifyReport, verify_onnx

__all__ = ["export_onnx", "verify_onnx", "VerifyReport", "layer_summary"]
