"""Run the float model in onnxruntime and stream every observed tensor into an observer.

The observed tensors are added as extra graph outputs of one session; each batch's values go
into the observers and are dropped, so memory is one batch of activations at most.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import onnx

from onnxq.calib.data import Batch
from onnxq.calib.observers import Observer
from onnxq.io import run, session
from onnxq.progress import Progress


def collect_ranges(
    model: onnx.ModelProto,
    tensors: list[str],
    stream: Iterable[Batch],
    make_observer: Callable[[], Observer],
    progress: Progress,
) -> tuple[dict[str, tuple[float, float]], int]:
    """Float range of each tensor over all batches, and the number of samples seen."""
    probe = with_outputs(model, tensors)
    runner = session(probe, optimize=True)
    observers = {name: make_observer() for name in tensors}
    samples = 0
    for batch in stream:
        values = run(runner, batch, tensors)
        for name, array in zip(tensors, values, strict=False):
            observers[name].update(np.asarray(array))
        samples += len(next(iter(batch.values())))
        progress.advance(samples)
    return {name: observer.range() for name, observer in observers.items()}, samples


def with_outputs(model: onnx.ModelProto, tensors: list[str]) -> onnx.ModelProto:
    """A copy of the model that also returns the given float tensors."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    present = {o.name for o in probe.graph.output}
    for name in tensors:
        if name not in present:
            probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return probe
