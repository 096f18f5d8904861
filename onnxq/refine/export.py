"""Refinement end to end, and its result in the form insert_qdq writes.

Hard rounding gives each weight integers base + [V ≥ 0] + z with its calibrated scales unchanged
(base: floor(w/s), or beside the GPTQ integer a weight was seeded with); each activation keeps
its zero point and takes its learned step. With QPRep, a layer's γ multiplies its weight's
per-channel scales and its bias becomes γ·b + β. Nothing is added to the graph: the refined
model is the same QDQ model with other integers and scales.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np
import onnx
import torch

from onnxq.calib.runner import fixed_batch
from onnxq.progress import Progress, Silent
from onnxq.quant.plan import QuantPlan
from onnxq.quant.weights import QuantizedWeight
from onnxq.refine import fused
from onnxq.refine.block_correction import BlockCorrection
from onnxq.refine.blocks import partition
from onnxq.refine.free_batch import freed_batch
from onnxq.refine.memory_plan import samples_within
from onnxq.refine.mirror import ActivationParams, Mirror
from onnxq.refine.reconstruct import learned_tensors, reconstruct
from onnxq.refine.sample_axes import mixed_sample_tensors
from onnxq.refine.unit_learning import RefineSettings, UnitReport


@dataclass
class Refinement:
    weights: dict[str, QuantizedWeight]
    activations: ActivationParams
    biases: dict[str, np.ndarray] = field(default_factory=dict)  # float biases QPRep changed
    units: list[UnitReport] = field(default_factory=list)
    seconds: float = 0.0
    mirror: Mirror | None = field(default=None, repr=False)  # in its refined, hard-rounding state
    compile_failure: str = ""  # why learning fell back to eager passes, if it did
    freed_batch: int | None = None  # the batch the export fixed, where learning ran with it free
    samples: tuple[int, int] = (0, 0)  # samples learned on, of those given (fewer over the memory)
    matched: str = ""  # whose statistics block correction matched: each batch's or each sample's

    def notes(self, loss: str) -> list[str]:
        refined = [u for u in self.units if not u.skipped]
        used = {u.loss for u in refined} or {loss}
        lines = [
            f"refined {len(refined)} of {len(self.units)} units ({', '.join(sorted(used))} loss) "
            f"in {self.seconds:.1f} s"
        ]
        held, given = self.samples
        if held < given:
            lines.append(
                f"  learned on the first {held} of {given} samples: their activations at the unit cuts "
                "fill --refine-memory"
            )
        if self.freed_batch:
            lines.append(
                f"  the export fixes the batch at {self.freed_batch}: learned on a copy whose batch is free "
                "(Reshape targets that read it; the same outputs in onnxruntime), many samples at a time"
            )
        chunked = [u for u in refined if u.chunk < u.batch]
        if chunked:
            sizes = sorted({u.chunk for u in chunked})
            span = f"{sizes[0]}" if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}"
            lines.append(
                f"  {len(chunked)} units learned each batch of {chunked[0].batch} in chunks of {span} "
                "samples, their activations over --refine-memory (the same gradients, slower)"
            )
        narrowed = [u for u in refined if u.pd_samples]
        if narrowed:
            lines.append(
                f"  {len(narrowed)} units took pd's prediction term on {narrowed[0].pd_samples} of each "
                f"batch's {narrowed[0].batch} samples: on all of them they would not have reached "
                "--refine-iters inside their share of --time-budget (--refine-pd-samples)"
            )
        if self.compile_failure:
            lines.append(
                "  learning ran without compiled kernels, slower on large images "
                f"({self.compile_failure}); --no-refine-compile skips the attempt"
            )
        lines += self._correction_lines()
        if loss == "pd" and "pd" not in used:
            lines.append(
                "  pd needs class scores, (samples, classes), as the first output; this model's is not: "
                "the units learned with mse"
            )
        for unit in self.units:
            if unit.skipped:
                lines.append(f"  not refined: {unit.name}: {unit.skipped}")
            elif unit.reverted:
                lines.append(
                    f"  {unit.name}: {unit.before:.4g}, no lower after {unit.iterations} iterations: kept"
                )
            else:
                lines.append(
                    f"  {unit.name}: {unit.before:.4g} → {unit.after:.4g} ({unit.iterations} iterations)"
                )
        return lines

    def _correction_lines(self) -> list[str]:
        """Block-wise distribution correction's loss over the units it corrected."""
        corrected = [u.corrected for u in self.units if u.corrected is not None]
        if not corrected:
            return []
        before, after, change = (float(np.mean(values)) for values in zip(*corrected, strict=True))
        return [
            f"  distribution correction (blocks, {self.matched} statistics): BatchNorm-statistics loss "
            f"{before:.4g} → {after:.4g} "
            f"(mean over {len(corrected)} units); their float inputs moved by {100 * change:.1f} % of "
            "their RMS"
        ]


def refine(
    model: onnx.ModelProto,
    plan: QuantPlan,
    activations: ActivationParams,
    weights: dict[str, QuantizedWeight],
    biases: dict[str, np.ndarray] | None,
    data: dict[str, np.ndarray],
    settings: RefineSettings,
    progress: Progress | None = None,
    affine_layers: set[str] | frozenset[str] = frozenset(),
    seeded: set[str] | frozenset[str] = frozenset(),
    correction: BlockCorrection | None = None,
) -> Refinement:
    """Learned integers and activation steps for `plan`, starting from the calibrated ones;
    `affine_layers` also learn QPRep's per-channel affine (merged re-parameterized convs);
    `seeded` weights start from their given integers (GPTQ's) instead of nearest rounding;
    `correction`: each unit's float inputs corrected towards BatchNorm's statistics first."""
    began = time.monotonic()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    device = torch.device(settings.device)
    freed = freed_batch(model, data)  # many samples at once where the export fixed one
    mirror = Mirror(freed or model, plan, activations, weights, biases, affine_layers, seeded)
    mirror.to_device(device)
    feeds = {name: torch.from_numpy(np.ascontiguousarray(value)).to(device) for name, value in data.items()}
    units = partition(mirror, set(plan.layers), settings.unit, mixed_sample_tensors(mirror, feeds))
    given = min((len(v) for v in feeds.values() if v.dim() > 0), default=0)
    learned = {index: learned_tensors(mirror, unit) for index, unit in enumerate(units)}
    held = samples_within(mirror, units, feeds, learned, settings.memory)
    feeds = {k: v[:held] if v.dim() > 0 else v for k, v in feeds.items()}
    if settings.time_budget:  # the budget counts from the start: the mirror and its units took part
        settings = replace(settings, time_budget=max(1.0, settings.time_budget - (time.monotonic() - began)))
    with fused.compiled_kernels(settings.compiled):
        reports = reconstruct(mirror, units, feeds, settings, progress or Silent(), correction)
    return Refinement(
        exported_weights(mirror, weights),
        exported_activations(mirror, activations),
        exported_biases(mirror),
        reports,
        time.monotonic() - began,
        mirror,
        fused.failure() if settings.compiled else "",
        fixed_batch(model) if freed is not None else None,
        (held, given),
        "" if correction is None else ("each sample's" if correction.per_sample else "each batch's"),
    )


def exported_weights(mirror: Mirror, weights: dict[str, QuantizedWeight]) -> dict[str, QuantizedWeight]:
    """Each weight with its learned integers and its scales as calibrated."""
    result = {}
    for name, quantized in weights.items():
        rounding = mirror.rounding[mirror.weight_index[name]]
        integers = rounding.integers().astype(quantized.target.dtype)
        result[name] = replace(quantized, integers=integers)
        gain = rounding.channel_gain()
        if gain is not None:
            scale = np.asarray(quantized.scale, np.float32) * _numpy(gain).reshape(np.shape(quantized.scale))
            result[name] = replace(result[name], scale=scale.astype(np.float32))
    return result


def exported_biases(mirror: Mirror) -> dict[str, np.ndarray]:
    """γ·b + β for the biases of layers that learned QPRep's affine (float; insert_qdq stores
    them as int32 at s_in·γ·s_w, as the mirror does)."""
    result = {}
    for bias, weight in mirror.bias_weights.items():
        rounding = mirror.rounding[mirror.weight_index[weight]]
        gain = rounding.channel_gain()
        if gain is not None:
            value = mirror.corrected_biases.get(bias, mirror.constants[bias])
            result[bias] = _numpy(value * gain + rounding.shift).astype(np.float32)
    return result


def _numpy(value: torch.Tensor) -> np.ndarray:
    return value.detach().cpu().numpy()


def exported_activations(mirror: Mirror, activations: ActivationParams) -> ActivationParams:
    """Each activation with its learned step, its zero point and integer range unchanged."""
    result = {}
    for root, (_, zero, target) in activations.items():
        result[root] = (mirror.activation[mirror.root_index[root]].learned_scale(), zero, target)
    return result
