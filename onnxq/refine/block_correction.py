"""PD-Quant's distribution correction as the paper runs it: block by block, inside refinement.

Before a unit learns, its float inputs are nudged so that the per-channel mean and standard
deviation of the tensors inside it that BatchNorm described (the folded convs' outputs) move
towards BatchNorm's statistics of the whole training set, while staying close to what they
were. The unit's float targets and QDrop's float side then come from the corrected inputs;
its quantized inputs, the prediction the pd loss aims at, and the next unit's float inputs stay
those of the calibration data as it is (PD-Quant's `GetDcFpLayerInpOut`: the corrected input
only makes the block's float output). A unit without such tensors is left as it is.

Statistics are each batch's by default; `per_sample` matches each sample's own over its
positions, as the paper's code does. Differences from the paper, where the CPU sets them: Adam
takes `steps` steps on inputs divided by their RMS (lr 1e-3 for 500 steps in the paper, per
batch of 32); the closeness term is λ·the inputs' mean squared change over their mean square,
onnxq.correct.matching's form, and each tensor's gap is divided by BatchNorm's mean variance.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from onnxq.correct.matching import statistics_loss
from onnxq.passes.fold_bn import ChannelStatistics
from onnxq.refine.blocks import Unit
from onnxq.refine.mirror import Env, Mirror
from onnxq.refine.unit_learning import has_batch_axis


@dataclass(frozen=True)
class BlockCorrection:
    """How each unit's inputs are corrected."""

    statistics: dict[str, ChannelStatistics]
    closeness: float = 1.0  # λ of the term that keeps the inputs near the originals
    steps: int = 50  # Adam steps per batch
    lr: float = 0.01  # on inputs divided by their RMS
    batch: int = 32  # samples corrected together
    per_sample: bool = False  # each sample's own statistics (PD-Quant), not the batch's


@dataclass
class CorrectionReport:
    """A unit's statistics loss before and after, and how far its inputs moved (RMS share)."""

    tensors: int = 0
    before: float = 0.0
    after: float = 0.0
    change: float = 0.0
    seconds: float = 0.0


def unit_statistics(mirror: Mirror, unit: Unit, statistics: dict[str, ChannelStatistics]) -> dict:
    """The statistics of tensors the unit's nodes make."""
    made = {name for node in mirror.nodes[unit.begin : unit.end] for name in node.outputs}
    return {name: stats for name, stats in statistics.items() if name in made}


def corrected_inputs(
    mirror: Mirror,
    unit: Unit,
    values: Env,
    count: int,
    correction: BlockCorrection,
    seconds: float | None = None,
    overwrite: bool = False,
) -> tuple[Env, CorrectionReport]:
    """The unit's float inputs (`values`, `count` samples each) corrected towards the statistics
    of the tensors inside it, batch by batch; tensors without a sample axis are left alone.
    `overwrite`: written into `values`' own tensors (no copy of a unit's inputs at its peak)."""
    targets = unit_statistics(mirror, unit, correction.statistics)
    moved = [n for n in unit.inputs if _per_sample_float(values[n], count)]
    report = CorrectionReport(tensors=len(targets))
    if not targets or not moved:
        return values, report
    began = time.monotonic()
    corrected = values if overwrite else {**values, **{name: values[name].clone() for name in moved}}
    batches = [slice(s, min(s + correction.batch, count)) for s in range(0, count, correction.batch)]
    share = None if seconds is None else seconds / len(batches)
    for part in batches:
        inputs = {name: _batch_of(values[name], part, count, name in moved) for name in unit.inputs}
        first, last, change, result = _optimise(mirror, unit, inputs, moved, targets, correction, share)
        for name in moved:
            corrected[name][part] = result[name]
        weight = (part.stop - part.start) / count
        report.before += weight * first
        report.after += weight * last
        report.change += weight * change
    report.seconds = time.monotonic() - began
    return corrected, report


def _optimise(mirror, unit, inputs: Env, moved: list[str], targets: dict, correction, seconds):
    """Adam on the `moved` inputs of one batch; (loss before, loss after, RMS change, inputs)."""
    scales = {name: inputs[name].pow(2).mean().sqrt().clamp_min(1e-12) for name in moved}
    starts = {name: inputs[name] / scales[name] for name in moved}
    leaves = {name: start.clone().requires_grad_(True) for name, start in starts.items()}
    optimiser = torch.optim.Adam(list(leaves.values()), lr=correction.lr)
    deadline = None if seconds is None else time.monotonic() + seconds

    def loss_of(normalised: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        env = {**inputs, **{name: normalised[name] * scales[name] for name in moved}}
        made = mirror.run(env, unit.begin, unit.end, quantized=False, keep=targets)
        gap = statistics_loss(made, targets, correction.per_sample)
        change = sum((normalised[n] - starts[n]).pow(2).mean() for n in moved) / len(moved)
        return gap, change

    first = None  # the loss at the start: the first step's, before it moves anything
    for step in range(correction.steps):
        if deadline is not None and step and time.monotonic() > deadline:
            break
        optimiser.zero_grad(set_to_none=True)
        gap, change = loss_of(leaves)
        first = float(gap.detach()) if first is None else first
        (gap + correction.closeness * change).backward()
        optimiser.step()
    with torch.no_grad():
        gap, change = loss_of(leaves)
        result = {name: (leaves[name] * scales[name]).detach() for name in moved}
    first = float(gap) if first is None else first
    return first, float(gap), float(change.sqrt()), result


def _batch_of(value: torch.Tensor, part: slice, count: int, copied: bool) -> torch.Tensor:
    """The samples `part` of a tensor with a sample axis (a copy where it is to be moved); a
    tensor without one (a shape, a constant) as it is."""
    if not has_batch_axis(value, count):
        return value
    return value[part].clone() if copied else value[part]


def _per_sample_float(value: torch.Tensor, count: int) -> bool:
    return value.is_floating_point() and value.dim() > 1 and has_batch_axis(value, count)
