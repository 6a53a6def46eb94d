"""The one error hierarchy of chita-onnx.

Every error the library raises on purpose derives from :class:`ChitaError`.  Its message is a single
line that names the file, tensor, node or option at fault and the bad value.  The command-line front
end prints that line and exits with :attr:`ChitaError.exit_code`: 2 for usage errors (a bad flag or
configuration value), 1 for everything else.
"""

from __future__ import annotations

import unicodedata

#: Characters that would break a message over several lines or reorder what a terminal shows:
#: line and paragraph separators, and the bidirectional overrides and isolates.
_INVISIBLE = {"\u2028", "\u2029", "\u0085", *map(chr, range(0x202A, 0x202F)), *map(chr, range(0x2066, 0x206A))}


def one_line(text: str) -> str:
    """``text`` with every control character escaped (``\\n``, ``\\x1b``, ``\\u2028`` ...), so that a
    message naming a hostile file name still prints as exactly one line."""
    if text.isprintable() and not any(c in _INVISIBLE for c in text):
        return text
    out = []
    for c in text:
        if c in "\n\r\t":
            out.append({"\n": "\\n", "\r": "\\r", "\t": "\\t"}[c])
        elif c in _INVISIBLE or unicodedata.category(c) in ("Cc", "Zl", "Zp") or (c.isspace() and c != " "):
            out.append(f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return "".join(out)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type name when the message is empty."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


class ChitaError(Exception):
    """Base class of all errors raised by chita-onnx on purpose.

    The message is made one line on construction: control characters (a newline in a file name, an
    escape sequence in a tensor name) are escaped.
    """

    exit_code: int = 1
    #: True when onnxruntime failed while *running* a graph (not loading it): the data fed may be the
    #: cause (:func:`chita_onnx.pipeline.blame_data` then checks the calibration data)
    run_failed: bool = False

    def __init__(self, message: object = "", *args: object) -> None:
        super().__init__(one_line(str(message)), *args)


class ConfigError(ChitaError, ValueError):
    """A configuration value or command-line flag is out of range or inconsistent (exit code 2)."""

    exit_code = 2


class ModelError(ChitaError):
    """The model file is missing, not ONNX, unsafe to load, or has nothing to prune."""


class UnsupportedOpError(ModelError):
    """An operator on the path from a prunable weight to the loss cannot be differentiated."""


class WrongGradientError(UnsupportedOpError):
    """onnxruntime-training's gradient of the model disagrees with finite differences of its own loss
    (a kernel that computes a wrong gradient for some op of this model): per-sample gradients are
    not used."""


class DataError(ChitaError):
    """Calibration or evaluation data is missing, malformed, or does not match the model's inputs."""


class FixedBatchError(DataError):
    """The model fixes its batch to ``b > 1`` samples and its graph cannot be run one sample at a time
    (:func:`chita_onnx.activations.opened_alike` found the samples mixed or the batch baked into a
    shape), so there are no per-sample gradients: ``--mini-batch b`` gives one gradient row per
    ``b`` samples, and the default recipe allocates by magnitude instead."""


class GradientError(ChitaError):
    """onnxruntime-training failed to build or run the gradient graph."""


class SolverError(ChitaError, ValueError):
    """The arrays handed to a solver are inconsistent (shapes, dtypes, budget)."""


class ResourceError(ChitaError):
    """The requested run would not fit in the memory or time available."""


class OutputError(ChitaError):
    """The output path is unusable (equal to the input, not writable, ...)."""
