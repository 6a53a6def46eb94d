"""Per-sample loss gradients of ONNX models with onnxruntime-training (no PyTorch).

See :func:`per_sample_gradients` for the one-call API and :class:`GradientEngine` for the reusable
engine (build once, update weights, compute many times).
"""

from __future__ import annotations

from .engine import GradientEngine, GradientMatrix, per_sample_gradients
from .prepare import GRADIENT_OPS

__all__ = ["GRADIENT_OPS", "GradientEngine", "GradientMatrix", "per_sample_gradients"]
