"""What a deployment target can read, said once: notes the report adds about storage and N:M models."""

from __future__ import annotations

#: Why an N:M model is always written with dense initializers.
PATTERN_STORAGE_NOTE = (
    "N:M models are written with dense initializers: TensorRT, the runtime that has sparse kernels for "
    "them, parses only dense graph.initializer entries, and at N:M sparsity a sparse_initializer "
    "(12 bytes per fp32 nonzero) is no smaller than the dense tensor anyway"
)


def zstd_size(payload: bytes, level: int = 9) -> int:
    """Bytes of ``payload`` compressed with zstd at ``level`` (the level of the report's file sizes)."""
    import zstandard

    return len(zstandard.ZstdCompressor(level=level).compress(payload))


def _kb(b: int) -> str:
    return f"{b / 1024:.1f} KB"


def sparse_storage_note(count: int, sparse_raw: int, sparse_zstd: int, dense_zstd: int) -> str:
    """The report's warning when some tensors were written as ``sparse_initializer``.

    ``sparse_raw``/``sparse_zstd``: the written file; ``dense_zstd``: the same weights stored dense
    with zeros, compressed the same way.
    """
    return (
        f"{count} tensor(s) written as sparse_initializer ({_kb(sparse_raw)}; zstd {_kb(sparse_zstd)}). "
        "onnxruntime densifies them at load; TensorRT's ONNX parser and OpenVINO read only dense "
        "graph.initializer, and onnxruntime builds without sparse-tensor support (minimal and web builds) "
        "cannot load them either: this file runs in full onnxruntime builds only. Stored dense with zeros "
        f"(--storage dense, the default), the same model compresses to {_kb(dense_zstd)} with zstd"
    )


def dense_storage_note(count: int, saving: int) -> str:
    """The report's note when a dense-with-zeros file could have been smaller raw.

    ``count`` tensors are past the break-even of sparse storage; ``saving``: bytes they would save.
    """
    return (
        f"stored dense with zeros, which every runtime reads (onnxruntime of any build, TensorRT, OpenVINO) "
        f"and which compresses best; --storage auto would write {count} tensor(s) as sparse_initializer, "
        f"about {_kb(saving)} smaller raw, for full onnxruntime builds only"
    )
