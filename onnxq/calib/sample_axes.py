"""Which axis of each model input carries samples, and how data is fitted where it is not the first.

onnxq cuts data into batches along every input's first axis. An input exported without one
([3, H, W] images), a scalar (a sample rate) or one whose batch sits inside ([2, batch, 128], a
recurrent state) takes its data stacked per sample instead, fed one sample per run on a leading
axis lent to the model while it is quantized (onnxq.passes.batch_axis); a scalar may also be
given one 0-d value for every sample. Data laid out as such an input takes it is refused with
the layout to use.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from onnxq.errors import OnnxqError

if TYPE_CHECKING:
    from onnxq.calib.inputs import Batch, InputSpec


def repeat_scalars(chunk: Batch, inputs: list[InputSpec]) -> Batch:
    """A scalar input given one 0-d value (a sample rate) takes it for every sample of the chunk."""
    given = one_value_scalars(chunk, inputs)
    others = [value for name, value in chunk.items() if name not in given and np.ndim(value)]
    if not given or not others:
        return chunk
    count = len(others[0])
    return {name: np.repeat(value[None], count) if name in given else value for name, value in chunk.items()}


def one_value_scalars(arrays: dict, inputs: list[InputSpec]) -> set[str]:
    """The scalar inputs `arrays` gives one 0-d value for all samples."""
    return {
        spec.name
        for spec in inputs
        if spec.scalar and spec.name in arrays and np.ndim(arrays[spec.name]) == 0
    }


def lend_batch_axes(
    chunks: Iterator[Batch], inputs: list[InputSpec], lent: list[str]
) -> tuple[Iterator[Batch], list[InputSpec]]:
    """The chunks (the first put back) and the inputs as batches must match them, with a batch
    axis of 1 for each input whose first chunk stacks samples it takes one at a time (`lent`)."""
    first = next(chunks, None)
    if first is None:
        return iter(()), inputs
    lent += [spec.name for spec in inputs if one_sample_per_run(first.get(spec.name), spec)]
    _refuse_a_batch_axis_inside(inputs, lent)
    specs = [
        replace(spec, shape=(1, *spec.shape), scalar=False) if spec.name in lent else spec for spec in inputs
    ]
    return itertools.chain([first], chunks), specs


def one_sample_per_run(array: np.ndarray | None, spec: InputSpec) -> bool:
    """Data with one axis more than the input, the rest matching its fixed sizes: samples stacked
    for a model that takes one at a time (torchvision detectors' [3, H, W] images, a scalar, a
    state whose batch axis is not its first)."""
    return (
        array is not None
        and (bool(spec.shape) or spec.scalar)
        and np.ndim(array) == len(spec.shape) + 1
        and all(
            size is None or size == given for size, given in zip(spec.shape, array.shape[1:], strict=True)
        )
    )


def _refuse_a_batch_axis_inside(inputs: list[InputSpec], lent: list[str]) -> None:
    """An input whose first axis is fixed above 1 and a later one free, beside inputs whose first
    axis is free, has its batch inside ([2, batch, 128]): data laid out as the model takes it
    cannot be cut into samples along that first axis, so ask for it stacked per sample."""
    free_first = [spec.name for spec in inputs if spec.shape and spec.shape[0] is None]
    for spec in batch_inside(inputs):
        if free_first and spec.name not in lent:
            raise OnnxqError(stacked_layout(spec, f" while {free_first[0]!r} has its batch first"))


def batch_inside(inputs: list[InputSpec]) -> list[InputSpec]:
    """Inputs whose first axis is fixed above 1 and a later one free ([2, batch, 128], a recurrent
    state), but for a first input whose second axis is free (time steps first, sequence_first)."""
    sequential = sequence_first(inputs)
    return [
        spec
        for spec in inputs
        if spec is not sequential and spec.shape and (spec.shape[0] or 0) > 1 and None in spec.shape[1:]
    ]


def stacked_layout(spec: InputSpec, beside: str = "") -> str:
    """How to lay out data for an input whose batch axis is not its first."""
    shape = "[" + ", ".join("batch" if size is None else str(size) for size in spec.shape) + "]"
    one = "×".join("1" if size is None else str(size) for size in spec.shape)
    return (
        f"model input {spec.name!r} is {shape}{beside}: its batch axis is not its first, so give its "
        f"data one sample at a time stacked along a new first axis (N×{one})"
    )


def refuse_scalar_inputs(inputs: list[InputSpec]) -> None:
    """Data is cut into batches along every input's first axis; a scalar input has none."""
    scalars = [spec.name for spec in inputs if spec.scalar]
    if scalars:
        names = ", ".join(map(repr, scalars))
        raise OnnxqError(
            f"model input {names} is a scalar, with no batch axis to cut calibration data along: "
            "onnxq needs every input to start with one; make it a constant of the model (an "
            "initializer) or give it a leading axis"
        )


def sequence_first(inputs: list[InputSpec]) -> InputSpec | None:
    """The first input when its first axis is fixed and its second free: the batch is not on the
    first axis (LSTM exports put time steps there). A fixed batch before free spatial axes
    ([1, 3, H, W]) is not taken for one."""
    leading = inputs[0].shape if inputs else ()
    if len(leading) > 1 and leading[0] and leading[1] is None:
        return inputs[0]
    return None


def describe_count(inputs: list[InputSpec], samples: int) -> str:
    """'N samples', or 'N runs' where the first axis is fixed and the second free (a fixed
    sequence length before a free batch axis, as LSTM exports have): there the first axis
    counts time steps, not samples."""
    leading = sequence_first(inputs)
    if leading is not None:
        runs = samples // leading.shape[0]
        fixed = f"first axis fixed at {leading.shape[0]}"
        return f"{runs} run{'s' * (runs != 1)} of input {leading.name!r} ({fixed})"
    return f"{samples} samples"
