"""Run the float model in onnxruntime and stream every observed tensor into an observer.

The observed tensors are added as extra graph outputs of one session; each batch's values go
into the observers and are dropped, so memory is one batch of activations at most.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

import numpy as np
import onnx

from onnxq.calib import scratch
from onnxq.calib.data import Batch
from onnxq.calib.frontier import batches
from onnxq.calib.observers import Observer
from onnxq.hollow import add_float_outputs
from onnxq.io import run, session
from onnxq.progress import Progress


class Tap(Protocol):
    """Anything that reads a tensor's values batch by batch."""

    def update(self, values: np.ndarray) -> None: ...


def collect_observers(
    model: onnx.ModelProto,
    tensors: list[str],
    stream: Iterable[Batch],
    make_observer: Callable[[str], Observer],
    progress: Progress,
    taps: Mapping[str, list[Tap]] | None = None,
) -> tuple[dict[str, Observer], int]:
    """Each tensor's observer after all batches, and the number of samples seen;
    `make_observer(tensor)` gives each tensor its observer. `taps` are fed the values of the
    tensors they name too (GPTQ's input correlations), in the same runs."""
    taps = taps or {}
    fetched = [*tensors, *(name for name in taps if name not in tensors)]
    runner = session(model, outputs=fetched, optimize=True, arena=False)
    observers = {name: make_observer(name) for name in tensors}
    samples, chunk = 0, None
    for batch in stream:
        count = len(next(iter(batch.values())))
        for part in batches(batch, count if fixed_batch(model) else chunk or 1):
            values = run(runner, part, fetched)
            if chunk is None:  # sized on the first sample: every observed tensor of a run is held
                chunk = max(1, OBSERVED_BYTES // max(1, sum(v.nbytes for v in values)))
            for name, array in zip(fetched, values, strict=False):
                array = np.asarray(array)
                if name in observers:
                    observers[name].update(array)
                for tap in taps.get(name, ()):
                    tap.update(array)
            del values
        samples += count
        progress.advance(samples)
    scratch.release()  # the observers' and taps' working arrays: as large as a batch's tensors
    return observers, samples


OBSERVED_BYTES = 256 << 20  # one run's observed tensors at most (a 640×640 detector: 1-2 samples)


def fixed_batch(model: onnx.ModelProto) -> int | None:
    """The batch size the model's first input fixes (batches cannot be cut then), or None."""
    return leading_size(model.graph.input[0]) if model.graph.input else None


def leading_size(info: onnx.ValueInfoProto) -> int | None:
    """The size a tensor's declared type fixes for its first axis, or None."""
    dims = info.type.tensor_type.shape.dim
    return dims[0].dim_value if dims and dims[0].dim_value > 0 else None


def with_outputs(model: onnx.ModelProto, tensors: list[str]) -> onnx.ModelProto:
    """A copy of the model that also returns the given float tensors (a copy of its weights too:
    for a session, `onnxq.io.session(model, outputs=...)` adds them without one)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    add_float_outputs(probe, tensors)
    return probe
