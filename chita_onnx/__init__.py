"""chita-onnx: prune ONNX models with CHITA, combinatorial optimisation over the empirical Fisher.

Python API (the command-line tool is a thin layer over these)::

    from chita_onnx import CompressConfig, compress
    report = compress("in.onnx", "out.onnx", "calib.npz", CompressConfig(sparsity=0.7))
    print(report.evaluation.pruned_accuracy, report.sizes.pruned_raw)
"""

from __future__ import annotations

__version__ = "0.1.0"

from .config import CompressConfig
from .data import ArraySource, open_source
from .data_types import Batch, CalibrationSource, InputSpec
from .errors import (
    ChitaError,
    ConfigError,
    DataError,
    GradientError,
    ModelError,
    OutputError,
    ResourceError,
    SolverError,
    UnsupportedOpError,
)
from .graph import PrunableTensor, find_prunable, load_model
from .layout import Layout, Slot
from .report import Report, format_report

_LAZY = {"compress", "evaluate_model", "inspect_model", "per_sample_gradients"}


def __getattr__(name: str) -> object:
    # The orchestrator and the gradient engine are imported on first use: importing the solver or
    # graph layers alone stays light.
    if name in _LAZY:
        if name == "per_sample_gradients":
            from .gradients import per_sample_gradients

            return per_sample_gradients
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'chita_onnx' has no attribute {name!r}")

__all__ = [
    "ArraySource",
    "Batch",
    "CalibrationSource",
    "ChitaError",
    "CompressConfig",
    "ConfigError",
    "DataError",
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
    "UnsupportedOpError",
    "__version__",
    "compress",
    "evaluate_model",
    "find_prunable",
    "format_report",
    "inspect_model",
    "load_model",
    "open_source",
    "per_sample_gradients",
]
