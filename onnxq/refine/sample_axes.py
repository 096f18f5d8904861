"""Which tensors hold one sample per row of their first axis, as refinement's units need.

Refinement draws a unit's samples along the first axis of the tensors alive at its cuts, and
hands tensors without that axis (shapes, constants) over whole. A tensor that folds several
samples into its rows, holds them on another axis, or is a shape read from the batch cannot be
cut there: blocks.partition keeps every cut off them.
"""

from __future__ import annotations

import functools

import torch

from onnxq.refine.mirror import Env, Mirror


def mixed_sample_tensors(mirror: Mirror, data: Env) -> set[str]:
    """Tensors whose samples do not lie one per row of the first axis: [samples·steps, features]
    after a recurrent tagger's Reshape, a sequence-first [steps, samples, features], and a shape
    read at run time ([samples, 4, 8, 1024] for a later Reshape). A unit's samples are drawn
    along the first axis and tensors without that axis are handed over whole, so no unit may
    start or end where one of these is alive (blocks.partition).

    Found by two runs of the float mirror: on one sample and on two, a tensor whose shape or
    (without a sample axis) values change otherwise than by its first axis; where the input
    fixes the batch at N, on two different runs of N samples, a tensor whose first axis is not
    N and whose values change with the data (a constant grid or shape stays the same). Each
    run keeps only every tensor's shape and a fingerprint of its values (a 640×640 detector's
    tensors of two samples would otherwise be held at once)."""
    batched = {k: v for k, v in data.items() if v.dim() > 0}
    unit = mirror.fixed_batch or 1
    if not batched or min(len(v) for v in batched.values()) < 2 * unit:
        return set()
    parts = [slice(0, unit), slice(unit, 2 * unit)] if mirror.fixed_batch else [slice(0, 1), slice(0, 2)]
    one: dict[str, tuple] = {}
    two: dict[str, tuple] = {}
    with torch.no_grad():
        for part, seen in zip(parts, (one, two), strict=True):
            feeds = {k: v[part] if k in batched else v for k, v in data.items()}
            mirror.run(
                feeds, 0, len(mirror.nodes), quantized=False, observe=functools.partial(_fingerprint, seen)
            )
    return {
        name for name, first in one.items() if name in two and _mixed(first, two[name], mirror.fixed_batch)
    }


def _mixed(first: tuple, second: tuple, fixed: int | None) -> bool:
    """Whether a tensor's (shape, fingerprint) in the two runs says its samples are not one per
    row of its first axis (mixed_sample_tensors)."""
    (shape, values), (other_shape, other_values) = first, second
    if fixed:
        return shape[:1] != (fixed,) and first != second
    if shape == other_shape:
        return values != other_values  # no sample axis, yet its values follow the sample count
    return not (shape[:1] == (1,) and other_shape == (2, *shape[1:]))


def _fingerprint(seen: dict[str, tuple], name: str, value: torch.Tensor) -> None:
    """A tensor's shape and the sums of its values and their squares: equal for the same values
    computed the same way, different for different values but by a coincidence."""
    if not isinstance(value, torch.Tensor):
        return
    wide = value.detach().double()
    seen[name] = (tuple(value.shape), (float(wide.sum()), float((wide * wide).sum())))
