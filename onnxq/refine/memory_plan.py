"""How much refinement holds at once, planned from one-sample runs, so large inputs fit.

Refinement holds every sample's tensors at the cut a unit starts from (float and quantized) and
at the cut it ends at (the float targets), and one learning pass keeps a batch's activations for
its backward pass. Both grow with the input: a layout detector at 800×608 kept 0.8 GB per
sample in one pass and peaked at 18.5 GB with 16 samples. `--refine-memory` bounds each: the
samples held are the first ones that fit, and a batch whose pass would not fit learns in chunks
(unit_learning.py), planned from what one sample and two keep.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TypeVar

import torch

from onnxq.refine.blocks import Unit
from onnxq.refine.mirror import Env, Mirror

T = TypeVar("T")


def saved_bytes(compute: Callable[[], T]) -> tuple[int, T]:
    """Bytes the autograd graph of `compute()` keeps for its backward pass (each storage once:
    a tensor saved by two ops, a view of another) and its result."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = compute()  # held while counting: a freed storage's address may come back
    return sum(storages.values()), result


def chunk_within(one: float, two: float, step: int, batch: int, budget: float) -> int:
    """Samples per learning pass: the batch where `budget` holds it, else as many as fit, in
    whole runs of `step` (a model's fixed batch) and at least one run. `one` and `two` are the
    bytes a pass keeps on `step` and `2·step` samples: their difference is what each run of
    samples adds, the rest (soft weights) is kept once."""
    if not math.isfinite(two):  # nothing measured fits any budget: one run at a time
        return step
    each, once = max(two - one, 1.0), max(2 * one - two, 0.0)
    if once + each * batch / step <= budget:
        return batch
    return min(batch, max(step, int((budget - once) // each) * step))


def samples_within(
    mirror: Mirror, units: list[Unit], data: Env, learned: dict[int, list[str]], budget: float
) -> int:
    """How many of `data`'s samples refinement can hold within `budget` bytes: the data itself,
    and at the unit whose cuts hold the most per sample its inputs and what it learns towards
    (`learned`, by unit index), each twice: float and quantized inputs while it learns, then its
    quantized inputs and outputs while the next unit's inputs are run. From one float run of
    the mirror on one sample (one fixed batch) that keeps only sizes."""
    step = mirror.fixed_batch or 1
    count = min((len(v) for v in data.values() if v.dim() > 0), default=0)
    if count <= step:
        return count
    first = {name: value[:step] if value.dim() > 0 else value for name, value in data.items()}
    sizes = {name: _per_sample(value, step) for name, value in first.items()}
    with torch.no_grad():
        mirror.run(
            first,
            0,
            len(mirror.nodes),
            quantized=False,
            observe=lambda name, value: sizes.__setitem__(name, _per_sample(value, step)),
        )
    given = sum(sizes.get(name, 0.0) for name in mirror.graph_inputs)  # the data, held throughout
    held = given + max(
        2 * sum(sizes.get(name, 0.0) for name in unit.inputs)
        + 2 * sum(sizes.get(name, 0.0) for name in learned[index])
        for index, unit in enumerate(units)
    )
    if held * count <= budget:
        return count
    return min(count, max(step, int(budget // max(held, 1.0)) // step * step))


def _per_sample(value: torch.Tensor, step: int) -> float:
    """A tensor's bytes per sample where it holds the samples along its first axis, else 0
    (a shape, a constant grid: held once)."""
    if value.dim() == 0 or value.shape[0] != step:
        return 0.0
    return value.numel() * value.element_size() / step
