"""A model's inputs as data must match them (InputSpec, model_inputs), and random inputs of
their shape where no data is at hand yet (a sample to compare two graphs by)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

Batch = dict[str, np.ndarray]


@dataclass(frozen=True)
class InputSpec:
    """A model input as data must match it: name, numpy dtype and shape (None = any size)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...]
    scalar: bool = False  # rank 0 as declared (an input with no shape at all is not one)


def model_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    """The graph inputs that are not initializers."""
    initializers = {t.name for t in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        # a dimension written as -1 or 0 (paddle2onnx does) is as free as a named one
        dims = tuple(d.dim_value if d.dim_value > 0 else None for d in tensor_type.shape.dim)
        scalar = tensor_type.HasField("shape") and not dims
        specs.append(InputSpec(value.name, dtype, dims, scalar))
    return specs


DYNAMIC_SIZE = 224  # an unknown size past the first axis: an image side any stride-32 net takes
SMALL_DYNAMIC_SIZE = 32  # instead, where 224 on every unknown axis would exceed SAMPLE_ELEMENTS
SAMPLE_ELEMENTS = 1 << 22  # per input


def random_sample(
    inputs: list[InputSpec], batch: int = 2, seed: int = 0, size: int = DYNAMIC_SIZE
) -> dict[str, np.ndarray]:
    """Standard-normal inputs: enough to compare two graphs' outputs. An unknown first axis (the
    batch) takes `batch`; other unknown sizes (an image's height and width, a sequence's length)
    take `size`, by default DYNAMIC_SIZE, since a detector whose side is 2 pixels cannot run (its
    feature maps vanish before its Concats), or SMALL_DYNAMIC_SIZE where that would make the
    input too large."""
    rng = np.random.default_rng(seed)
    sample = {}
    for spec in inputs:
        shape = _sample_shape(spec.shape, batch, size)
        if np.prod(shape) > SAMPLE_ELEMENTS:
            shape = _sample_shape(spec.shape, batch, SMALL_DYNAMIC_SIZE)
        sample[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
    return sample


def _sample_shape(dims, batch: int, size: int) -> tuple[int, ...]:
    return tuple(
        d if d is not None and d > 0 else (batch if axis == 0 else size) for axis, d in enumerate(dims)
    )
