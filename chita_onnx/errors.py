"""The one error hierarchy of chita-onnx.

Every error the library raises on purpose derives from :class:`ChitaError`.  Its message is a single
line that names the file, tensor, node or option at fault and the bad value.  The command-line front
end prints that line and exits with :attr:`ChitaError.exit_code`: 2 for usage errors (a bad flag or
configuration value), 1 for everything else.
"""

from __future__ import annotations


class ChitaError(Exception):
    """Base class of all errors raised by chita-onnx on purpose."""

    exit_code: int = 1


class ConfigError(ChitaError, ValueError):
    """A configuration value or command-line flag is out of range or inconsistent (exit code 2)."""

    exit_code = 2


class ModelError(ChitaError):
    """The model file is missing, not ONNX, unsafe to load, or has nothing to prune."""


class UnsupportedOpError(ModelError):
    """An operator on the path from a prunable weight to the loss cannot be differentiated."""


class DataError(ChitaError):
    """Calibration or evaluation data is missing, malformed, or does not match the model's inputs."""


class GradientError(ChitaError):
    """onnxruntime-training failed to build or run the gradient graph."""


class SolverError(ChitaError, ValueError):
    """The arrays handed to a solver are inconsistent (shapes, dtypes, budget)."""


class ResourceError(ChitaError):
    """The requested run would not fit in the memory or time available."""


class OutputError(ChitaError):
    """The output path is unusable (equal to the input, not writable, ...)."""
