"""Refine every unit of the mirror in order: each learns from the already-refined model's
tensors at its cut (so it corrects what came before it), then passes its outputs on.

A unit reads the quantized model's tensors at its cut and the float model's, the float ones
corrected towards BatchNorm's statistics first where asked (block_correction.py); what it
learns, and how, is unit_learning.py's.
"""

from __future__ import annotations

import time

import torch

from onnxq.correct import CORRECTION_SHARE
from onnxq.memory import heap_allocations, release_free_memory
from onnxq.progress import Progress
from onnxq.refine.block_correction import BlockCorrection, corrected_inputs, unit_statistics
from onnxq.refine.blocks import Unit
from onnxq.refine.mirror import Env, Mirror
from onnxq.refine.unit_learning import (
    RUN_BATCH,
    Batches,
    Draws,
    RefineSettings,
    UnitJob,
    UnitReport,
    has_batch_axis,
)

# Ops whose outputs are integers or booleans, with no gradient to learn from: a unit ending in
# one (a segmentation head's ArgMax) learns towards the float tensors it reads instead.
GRADIENT_FREE_OPS = frozenset(
    {"ArgMax", "ArgMin", "Equal", "Greater", "GreaterOrEqual", "Less", "LessOrEqual", "Not", "And", "Or"}
    | {"Xor", "NonZero", "IsNaN", "IsInf", "Shape", "Size"}
)


def reconstruct(
    mirror: Mirror,
    units: list[Unit],
    data: Env,
    settings: RefineSettings,
    progress: Progress,
    correction: BlockCorrection | None = None,
) -> list[UnitReport]:
    """Refine every unit in order; returns what happened to each. With `correction`, each
    unit learns from float inputs corrected towards BatchNorm's statistics (block_correction.py)."""
    deadline = time.monotonic() + settings.time_budget if settings.time_budget else None
    torch.manual_seed(settings.seed)
    mirror.requires_grad_(False)  # each unit turns on its own parameters while it learns
    random = Draws.seeded(settings.seed)
    count = len(next(iter(data.values())))
    with torch.no_grad():
        floating = Batches(mirror.quantize_inputs(data, False), count)
        quantized = Batches(mirror.quantize_inputs(data, True), count)
        logits = _float_logits(mirror, floating, count) if settings.loss == "pd" else None
    reports = []
    for position, unit in enumerate(units):
        remaining = None if deadline is None else (deadline - time.monotonic()) / (len(units) - position)
        learning, corrected, following = floating, None, None
        if correction is not None and unit_statistics(mirror, unit, correction.statistics):
            with torch.no_grad():  # the next unit's float inputs, from the uncorrected ones
                following = _run_all(mirror, unit, floating, quantized=False)
            share = None if remaining is None else CORRECTION_SHARE * remaining  # as for the images
            # After the first unit the float inputs are the unit before's outputs, needed no more:
            # corrected where they lie. The first unit's are the caller's calibration data.
            values, corrected = corrected_inputs(
                mirror, unit, floating.values, count, correction, share, overwrite=position > 0
            )
            learning = Batches(values, count)
            remaining = None if remaining is None else remaining - corrected.seconds
        with torch.no_grad():
            targets = _run_all(mirror, unit, learning, quantized=False, names=learned_tensors(mirror, unit))
        following = targets if following is None else following
        segments = [(later.begin, later.end) for later in units[position + 1 :]]
        job = UnitJob(mirror, unit, settings, random, quantized, learning, targets, logits, segments)
        progress.stage(
            f"refine {position + 1}/{len(units)}: {unit.describe(mirror)}", total=settings.iterations
        )
        with heap_allocations():  # an iteration's activations reused, not faulted in afresh
            reports.append(job.run(remaining, progress))
        if corrected is not None and corrected.tensors:
            reports[-1].corrected = (corrected.before, corrected.after, corrected.change)
        # The unit's float inputs and its job are not needed for the next unit's inputs: freed
        # first, and the allocator's free pages handed back, so units do not stack their peaks.
        del job, learning, targets
        floating = following
        if position + 1 < len(units):  # the next unit's quantized inputs; the last has none
            with torch.no_grad():
                quantized = _run_all(mirror, unit, quantized, quantized=True)
        release_free_memory()
    return reports


def learned_tensors(mirror: Mirror, unit: Unit) -> list[str]:
    """What the unit learns towards: its outputs and, for each one a gradient-free op makes
    inside the unit (ArgMax, a comparison), the tensors that op reads there. Without them a
    segmentation model ending in ArgMax had no float output in its last unit, and no loss."""
    nodes = mirror.nodes[unit.begin : unit.end]
    made = {name for node in nodes for name in node.outputs}
    learned = list(unit.outputs)
    for node in nodes:
        if node.op_type in GRADIENT_FREE_OPS and set(node.outputs) & set(unit.outputs):
            learned += [name for name in node.inputs if name in made and name not in learned]
    return learned


def _run_all(
    mirror: Mirror, unit: Unit, batches: Batches, *, quantized: bool, names: list[str] | None = None
) -> Batches:
    """The unit's outputs (or `names` it makes) for every sample, run RUN_BATCH samples at a time
    into tensors allocated once (joining the parts afterwards would hold every output twice)."""
    names = unit.outputs if names is None else names
    joined: Env = {}
    batched: set[str] = set()  # outputs with the batch axis, decided on the first run
    for start in range(0, batches.count, RUN_BATCH):
        env = batches.take(slice(start, start + RUN_BATCH))
        env = mirror.run(
            {k: env[k] for k in unit.inputs}, unit.begin, unit.end, quantized=quantized, keep=names
        )
        for name in names:
            part = env.pop(name)
            if start == 0 and has_batch_axis(part, min(RUN_BATCH, batches.count)):
                batched.add(name)
                joined[name] = part.new_empty((batches.count, *part.shape[1:]))
            elif start == 0:
                joined[name] = part  # a shape or a constant: the same for every run
            if name in batched:
                joined[name][start : start + len(part)] = part
    return Batches(joined, batches.count)


def _float_logits(mirror: Mirror, floating: Batches, count: int) -> torch.Tensor | None:
    """The float model's first output for every sample, when it looks like class scores."""
    parts = []
    for start in range(0, count, RUN_BATCH):
        env = mirror.run(
            floating.take(slice(start, start + RUN_BATCH)), 0, len(mirror.nodes), quantized=False
        )
        parts.append(env[mirror.graph_outputs[0]])
    logits = torch.cat(parts)
    return logits if logits.dim() == 2 and logits.shape[0] == count and logits.shape[1] > 1 else None
