"""The tensors that cross a cut of the simulation, cached for every calibration sample.

A search holds the float and the quantized frontier on both sides of the current cut; this
module sizes that cache to a memory budget and fills it batch by batch. Float32 tensors may be
kept in float16 (half the memory; values beyond float16's range stay float32).

Tensors without a batch axis (a scalar or a shape computed from the input's shape, which
detector heads carry across layers) cannot be cut into samples: they are kept once per batch
(`PerBatch`) and handed back whole with the batch they came from.
"""

from __future__ import annotations

import numpy as np

from onnxq.calib.simulate import Arrays, Segment, Simulation

HALF_LIMIT = 6.0e4  # float16's largest finite value is 65504
BATCH_BYTES = 64 << 20  # largest float32 tensor of one batch: bounds onnxruntime's transient memory


class PerBatch(list):
    """One value per batch of `size` samples, for a tensor with no batch axis, and how many
    samples the batches held (a frontier of such tensors alone must still say its count: a
    recurrent model's [samples × steps, features] after its first Reshape)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self.samples = 0

    def add(self, value: np.ndarray, samples: int) -> None:
        self.append(value)
        self.samples += samples


def count(data: Arrays) -> int:
    batched = [v for v in data.values() if not isinstance(v, PerBatch)]
    if batched:
        return len(batched[0])
    return max((v.samples for v in data.values()), default=0)


def batches(data: Arrays, size: int):
    for batch, _ in sized_batches(data, size):
        yield batch


def sized_batches(data: Arrays, size: int):
    """(batch, its sample count): a batch's own arrays cannot tell which ones have a batch axis."""
    total = count(data)
    for index, start in enumerate(range(0, total, size)):
        yield {k: _batch_of(v, index, start, size) for k, v in data.items()}, min(size, total - start)


def paired_batches(quantized, floating, size: int, limit: int | None = None):
    """(quantized, float) batches of one cached tensor, up to `limit` samples: slices of its
    arrays, or the values kept per batch where it has no batch axis (a transformer's
    [tokens, batch, features] between its reshapes)."""
    if isinstance(quantized, PerBatch):
        for index, pair in enumerate(zip(quantized, floating, strict=True)):
            if limit is not None and index * quantized.size >= limit:
                return
            yield pair
        return
    total = len(quantized) if limit is None else min(limit, len(quantized))
    for start in range(0, total, size):
        yield quantized[start : start + size], floating[start : start + size]


def flat_values(values) -> np.ndarray:
    """Every value of a cached tensor in one flat array, whether or not it has a batch axis."""
    if isinstance(values, PerBatch):
        return np.concatenate([np.asarray(v).reshape(-1) for v in values]) if values else np.empty(0)
    return values.reshape(-1)


def _batch_of(values, index: int, start: int, size: int):
    if isinstance(values, PerBatch):
        if values.size != size:
            raise ValueError(f"a tensor kept per batch of {values.size} was read in batches of {size}")
        return values[index]
    return values[start : start + size]


def has_batch_axis(value: np.ndarray, samples: int) -> bool:
    return value.ndim > 0 and value.shape[0] == samples


def fit_memory(sim: Simulation, data: Arrays, budget: float, half: bool, unit: int = 1) -> tuple[Arrays, int]:
    """(the samples whose cached frontiers fit `budget` bytes, the largest batch size whose
    biggest tensor stays under BATCH_BYTES: onnxruntime holds a run's intermediates).

    At a cut the search holds the float and the quantized frontier before it and after it.
    `unit`: the smallest batch the graph runs (its fixed batch size); sizes are per sample.
    """
    one = {k: v[:unit] for k, v in data.items()}
    before = cached_bytes(one, half) // unit
    peak, largest = 0, 1
    for segment in sim.segments:
        after = sim.run([segment], one, sim.float_params)
        after_bytes = cached_bytes(after, half) // unit
        peak = max(peak, before + after_bytes)
        largest = max(largest, *(v.size * 4 // unit for v in after.values()))
        one, before = after, after_bytes
    fits = max(16, int(budget // max(1, 2 * peak)))
    return {k: v[:fits] for k, v in data.items()}, max(1, BATCH_BYTES // largest)


def cached_bytes(frontier: Arrays, half: bool) -> int:
    return sum(v.size * cache_dtype(v, half).itemsize for v in frontier.values())


def cache_dtype(values: np.ndarray, half: bool) -> np.dtype:
    """float16 for float32 tensors when the cache is halved (while their values fit)."""
    if half and values.dtype == np.float32 and fits_half(values):
        return np.dtype(np.float16)
    return values.dtype


def fits_half(values: np.ndarray) -> bool:
    return not values.size or max(float(values.max()), -float(values.min())) < HALF_LIMIT


def advance(
    sim: Simulation, segment: Segment, frontier: Arrays, params: Arrays, batch_size: int, half: bool
) -> Arrays:
    """The frontier after `segment`, written batch by batch into the cache (no concatenation:
    it would hold every tensor twice). Carried tensors are shared, not copied."""
    total = count(frontier)
    after: Arrays = {name: frontier[name] for name in segment.carried}
    start = 0
    for batch, samples in sized_batches(frontier, batch_size):
        values = sim.run([segment], batch, params)
        for name in segment.outputs:
            value = values[name]
            if not has_batch_axis(value, samples) or isinstance(after.get(name), PerBatch):
                after.setdefault(name, PerBatch(batch_size)).add(value, samples)
                continue
            if name not in after:
                after[name] = np.empty((total, *value.shape[1:]), cache_dtype(value, half))
            elif after[name].dtype == np.float16 and not fits_half(value):
                after[name] = after[name].astype(np.float32)  # a later batch outgrew float16
            after[name][start : start + len(value)] = value
        start += samples
    return after
