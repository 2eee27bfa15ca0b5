"""Checkpoint → verified, self-describing ONNX model (fp32, int8, fp16), model card, Triton.

Needs the ``train`` extra (torch, onnx). The entry point is
:func:`export.pipeline.export_model`; ``xrwatch export`` is its command line.
"""

from __future__ import annotations
