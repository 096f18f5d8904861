"""The last check before a model is handed back: the onnx checker and one onnxruntime run on
real data must both accept it, with finite outputs."""

from __future__ import annotations

import numpy as np
import onnx

from onnxq.errors import OnnxqError, float_model_overflows
from onnxq.io import run, session


def validate(
    model: onnx.ModelProto,
    sample: dict[str, np.ndarray],
    *,
    check: bool = True,
    reference: onnx.ModelProto | None = None,
) -> None:
    """The onnx checker (`check`: unless the input model already failed it) and one onnxruntime
    run on real data must both accept the model. `reference`, the float model, is run only where
    the outputs are not finite, to tell the float model's own overflow from onnxq's fault."""
    error = checker_error(model) if check else None
    if error:
        raise OnnxqError(f"internal error: the quantized model is invalid ({error})")
    names = [o.name for o in model.graph.output]
    if first_not_finite(names, run(session(model), sample)) is None:
        return
    if reference is None:
        raise OnnxqError("internal error: the quantized model produces NaN or infinite values")
    expected = run(session(reference), sample)
    overflowing = first_not_finite(names, expected)
    if overflowing is not None:
        raise float_model_overflows(overflowing)
    peak = max(float(np.abs(o).max(initial=0.0)) for o in expected if o.dtype.kind == "f")
    raise OnnxqError(
        "internal error: the quantized model produces NaN or infinite values where the float model's "
        f"outputs stay finite (up to {peak:.3g} on the same samples)"
    )


def first_not_finite(names: list[str], outputs: list[np.ndarray]) -> str | None:
    """The first float output holding a NaN or an infinity, or None."""
    return next(
        (n for n, o in zip(names, outputs, strict=False) if o.dtype.kind == "f" and not np.isfinite(o).all()),
        None,
    )


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
