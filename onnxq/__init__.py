"""onnxq: post-training quantization of ONNX models into QDQ models for onnxruntime.

>>> import onnxq
>>> result = onnxq.quantize("model.onnx", "calib.npz", onnxq.QuantConfig())  # doctest: +SKIP
>>> onnxq.save_model(result.model, "model.int8.onnx")  # doctest: +SKIP
"""

__version__ = "0.1.0"

from onnxq.config import (
    CalibrationMethod,
    Granularity,
    LayerOverride,
    Preprocess,
    QuantConfig,
    RangeRule,
    WeightRange,
    load_overrides,
)
from onnxq.errors import OnnxqError
from onnxq.io import load_model, save_model
from onnxq.pipeline import QuantResult, quantize, quantize_file
from onnxq.prepare import FuseResult, fuse, fuse_file

__all__ = [
    "CalibrationMethod",
    "FuseResult",
    "Granularity",
    "LayerOverride",
    "OnnxqError",
    "Preprocess",
    "QuantConfig",
    "QuantResult",
    "RangeRule",
    "WeightRange",
    "fuse",
    "fuse_file",
    "load_model",
    "load_overrides",
    "quantize",
    "quantize_file",
    "save_model",
]
