"""Channel pruning (``compress --structure channel``): dependency groups, selection, surgery, timing.

Entry point: :func:`chita_onnx.structured.run.compress_channels`, called by the pipeline.
"""
