"""chita-onnx: prune ONNX models with CHITA, combinatorial optimisation over the empirical Fisher.

Python API (the command-line tool is a thin layer over these)::

    from chita_onnx import CompressConfig, compress
    report = compress("in.onnx", "out.onnx", "calib.npz", CompressConfig(sparsity=0.7))
    print(report.evaluation.pruned_accuracy, report.sizes.pruned_raw)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

from .config import CompressConfig
from .data import ArraySource, open_source
from .data_types import Batch, CalibrationSource, InputSpec
from .errors import (
    ChitaError,
    ConfigError,
    DataError,
    FixedBatchError,
    GradientError,
    ModelError,
    OutputError,
    ResourceError,
    SolverError,
    UnsupportedOpError,
)
from .layout import Layout, Slot

# Everything that imports onnx or onnxruntime is loaded on first use, so that importing the pure
# NumPy layers (``chita_onnx.solver``, ``chita_onnx.layout``) never pulls in onnx or onnxruntime.
_LAZY = {
    "compress": "pipeline",
    "evaluate_model": "pipeline",
    "inspect_model": "pipeline",
    "per_sample_gradients": "gradients",
    "PrunableTensor": "graph",
    "find_prunable": "graph",
    "load_model": "graph",
    "Report": "report",
    "format_report": "report",
    "check_pattern": "patterns",
    "check_model_support": "support",
    "SupportReport": "support",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'chita_onnx' has no attribute {name!r}")


if TYPE_CHECKING:
    from .gradients import per_sample_gradients
    from .graph import PrunableTensor, find_prunable, load_model
    from .patterns import check_pattern
    from .pipeline import compress, evaluate_model, inspect_model
    from .report import Report, format_report
    from .support import SupportReport, check_model_support

__all__ = [
    "ArraySource",
    "Batch",
    "CalibrationSource",
    "ChitaError",
    "CompressConfig",
    "ConfigError",
    "DataError",
    "FixedBatchError",
    "GradientError",
    "InputSpec",
    "Layout",
    "ModelError",
    "OutputError",
    "PrunableTensor",
    "Report",
    "ResourceError",
    "Slot",
    "SolverError",
    "SupportReport",
    "UnsupportedOpError",
    "__version__",
    "check_model_support",
    "check_pattern",
    "compress",
    "evaluate_model",
    "find_prunable",
    "format_report",
    "inspect_model",
    "load_model",
    "open_source",
    "per_sample_gradients",
]
