"""Run packed models: native sparse kernels hosted in onnxruntime (docs/RUNTIME.md)."""

from onnxsparse.runtime.session import InferenceSession, plan_model

__all__ = ["InferenceSession", "plan_model"]
