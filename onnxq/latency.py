"""`onnxq bench`: latency and throughput of models side by side, at the batch sizes asked for.

The models run as deployed (onnxruntime's default optimization level) on the same input, timed
in interleaved blocks (onnxq.speed) so that load elsewhere on the machine hits them alike. The
input is the user's data where given, else random values in the shape the model declares (free
dimensions from --shape, the batch axis from --batch).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onnxq import speed
from onnxq.calib.data import DataSource, InputSpec, batches, first_batch, model_inputs
from onnxq.errors import OnnxqError
from onnxq.evaluate import check_same_inputs, display_names, file_size, kernel_summary
from onnxq.io import load_model, session
from onnxq.preprocess import Preprocess

ROUNDS = 8  # more than the never-slower check's: this is the measurement the user asked for
SECONDS = 4.0


@dataclass(frozen=True)
class Latency:
    name: str
    batch: int
    milliseconds: float
    size_bytes: int
    kernels: str

    @property
    def samples_per_second(self) -> float:
        return 1e3 * self.batch / self.milliseconds if self.milliseconds > 0 else float("inf")


def bench(
    models: list[str | os.PathLike],
    *,
    batch_sizes: tuple[int, ...] = (1,),
    data: DataSource | None = None,
    shapes: dict[str, tuple[int, ...]] | None = None,
    preprocess: Preprocess | None = None,
    threads: int = 0,
) -> list[Latency]:
    """Latency of every model at every batch size (onnxq.speed), side by side, one batch size at a time."""
    paths = [Path(p) for p in models]
    protos = [load_model(p) for p in paths]
    inputs = model_inputs(protos[0])
    for path, proto in zip(paths[1:], protos[1:], strict=True):
        check_same_inputs(inputs, model_inputs(proto), path, paths[0])
    if any(size < 1 for size in batch_sizes):
        raise OnnxqError("batch sizes must be at least 1")
    sessions = [session(p, threads=threads, spin=True) for p in protos]
    names = display_names([p.resolve() for p in paths])
    kernels = [kernel_summary(p) for p in protos]
    rows = []
    for size in batch_sizes:
        feed = _feed(inputs, size, data, shapes or {}, preprocess)
        times = speed.compare_sessions(sessions, feed, ROUNDS, SECONDS)
        for name, path, summary, milliseconds in zip(names, paths, kernels, times, strict=True):
            rows.append(Latency(name, size, milliseconds, file_size(path), summary))
    return rows


def _feed(
    inputs: list[InputSpec],
    size: int,
    data: DataSource | None,
    shapes: dict[str, tuple[int, ...]],
    preprocess: Preprocess | None,
) -> dict[str, np.ndarray]:
    unknown = set(shapes) - {spec.name for spec in inputs}
    if unknown:
        raise OnnxqError(f"--shape names no input of the model: {', '.join(sorted(unknown))}")
    if data is not None:
        return _from_data(inputs, size, data, preprocess)
    return {spec.name: _random(spec, size, shapes.get(spec.name)) for spec in inputs}


def _from_data(inputs, size: int, data: DataSource, preprocess) -> dict[str, np.ndarray]:
    lent: list[str] = []  # inputs exported without a batch axis ([3, H, W]): one sample a run
    stream = batches(data, inputs, preprocess=preprocess, batch_size=size, max_samples=size, unbatched=lent)
    first, stream = first_batch(stream)
    if lent:
        if size != 1:
            raise OnnxqError(
                "the model takes one sample per run (an input without a batch axis): --batch must be 1"
            )
        return {name: array[0] if name in lent else array for name, array in first.items()}
    fixed = {spec.shape[0] for spec in inputs if spec.shape and spec.shape[0]}
    if fixed and size not in fixed:
        raise OnnxqError(f"the model's batch size is fixed at {fixed.pop()}: --batch must be that")
    taken: dict[str, list[np.ndarray]] = {}
    for chunk in stream:
        for name, array in chunk.items():
            taken.setdefault(name, []).append(array)
    feed = {name: np.concatenate(parts)[:size] for name, parts in taken.items()}
    count = len(next(iter(feed.values())))
    if count < size:
        raise OnnxqError(f"the data holds {count} samples, fewer than the batch of {size}")
    return feed


def _random(spec: InputSpec, size: int, given: tuple[int, ...] | None) -> np.ndarray:
    """Random values in the declared shape; integer inputs (token ids, masks) are zeros, which
    every embedding table and mask accepts."""
    if given is not None:
        fits = len(given) == len(spec.shape) and all(
            d is None or d == g for d, g in zip(spec.shape, given, strict=False)
        )
        if spec.shape and not fits:
            dims = "×".join("?" if d is None else str(d) for d in spec.shape)
            shown = "x".join(map(str, given))
            raise OnnxqError(f"--shape {spec.name}={shown} does not fit the model's {dims}")
        shape = (size, *given[1:]) if spec.shape and spec.shape[0] is None else given
    else:
        free = [i for i, d in enumerate(spec.shape) if d is None and i > 0]
        shapeless = not spec.shape and not spec.scalar
        if free or shapeless:
            dims = "×".join("?" if d is None else str(d) for d in spec.shape) or "no shape"
            raise OnnxqError(
                f"input {spec.name!r} has free dimensions ({dims}): give its shape with "
                f"--shape {spec.name}=1x3x224x224 (the batch axis follows --batch) or give --data"
            )
        shape = tuple(size if d is None else d for d in spec.shape)
    if spec.dtype.kind in "biu":
        return np.zeros(shape, spec.dtype)
    return np.random.default_rng(0).standard_normal(shape).astype(spec.dtype)


def parse_shapes(texts: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    """--shape name=1x3x224x224, as many as the model has inputs with free dimensions."""
    shapes = {}
    for text in texts:
        name, _, dims = text.rpartition("=")
        try:
            shape = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError:
            shape = ()
        if not name or not shape or min(shape) < 1:
            raise OnnxqError(f"--shape takes name=1x3x224x224, got {text!r}")
        shapes[name] = shape
    return shapes
