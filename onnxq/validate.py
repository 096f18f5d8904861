"""The last check before a model is handed back: the onnx checker and one onnxruntime run on
real data must both accept it, with finite outputs."""

from __future__ import annotations

import numpy as np
import onnx

from onnxq.errors import OnnxqError
from onnxq.io import run, session


def validate(model: onnx.ModelProto, sample: dict[str, np.ndarray], *, check: bool = True) -> None:
    """The onnx checker (`check`: unless the input model already failed it) and one onnxruntime
    run on real data must both accept the model."""
    error = checker_error(model) if check else None
    if error:
        raise OnnxqError(f"internal error: the quantized model is invalid ({error})")
    outputs = run(session(model), sample)
    if not all(np.isfinite(o).all() for o in outputs if o.dtype.kind == "f"):
        raise OnnxqError("internal error: the quantized model produces NaN or infinite values")


def checker_error(model: onnx.ModelProto) -> str | None:
    """The onnx checker's first line about `model`, or None when it passes. Exporters write
    models onnxruntime runs but the checker refuses (a graph input declared without a shape)."""
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as err:
        return str(err).splitlines()[0]
    except ValueError:  # over protobuf's 2 GB: the checker cannot take it, onnxruntime can
        return None
    return None
