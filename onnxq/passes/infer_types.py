"""Element types (and shapes where known) for every tensor, from ONNX shape inference.

The plan quantizes float32 tensors only; it must be able to tell them from the int64 shape
arithmetic detector heads compute (Shape → Gather → Concat → Reshape), so every value needs
its type. Inference is lenient: a node it cannot type leaves its outputs untyped, never fails.
"""

from __future__ import annotations

import onnx


def infer_types(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with value_info filled in by onnx shape inference (unchanged if that fails)."""
    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except (onnx.shape_inference.InferenceError, ValueError, RuntimeError):
        return model  # models past protobuf's 2 GB limit, or ops shape inference does not know
