"""Calibrate a plan: the activation ranges, and where asked or needed the scales chosen by error,
GPTQ's weight integers and learned rounding, from the calibration data.

Three paths, chosen by the config:
- observation only (8-bit weights, auto/minmax/percentile/scaleclip ranges): one pass over the
  streamed data observes every activation's range; with 8-bit weights GPTQ's input correlations
  are measured in the same pass on the float model's inputs (onnxq.calib.streamed_gptq);
- the calibration sweep (mse/mae/pd, bias correction, GPTQ on quantized inputs below 8 bits):
  the data is gathered in memory and revisited layer by layer (onnxq.calib.search);
- refinement (`--refine`): after the sweep, distribution correction and learned rounding and
  activation steps in the torch mirror (onnxq.correct, onnxq.refine).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxq.calib import frontier, streamed_gptq
from onnxq.calib.observers import HistogramObserver, MinMaxObserver, ScaleClipObserver
from onnxq.calib.runner import collect_observers, fixed_batch
from onnxq.calib.sample_axes import sequence_first
from onnxq.calib.search import SearchResult, SearchSettings, search_parameters
from onnxq.calib.simulate import build_simulation
from onnxq.config import CalibrationMethod, QuantConfig
from onnxq.correct import corrected_for_refinement
from onnxq.errors import OnnxqError
from onnxq.memory import release_free_memory
from onnxq.passes.fold_bn import ChannelStatistics
from onnxq.passes.graph_utils import constant
from onnxq.passes.insert_qdq import activation_params, planned_weight, weight_target
from onnxq.progress import Progress
from onnxq.quant import masks
from onnxq.quant.kernels import WeightRangeChoice
from onnxq.quant.plan import QuantPlan, Replan
from onnxq.refine import refine


@dataclass
class Calibrated:
    """What calibration gives Q/DQ insertion: the plan (replanned where observed ranges showed
    masks), ranges per observed tensor, and the weights' integers and scales where chosen."""

    plan: QuantPlan
    ranges: dict[str, tuple[float, float]]
    samples: int
    search: SearchResult | None = None
    refined: object = None  # onnxq.refine's result: learned integers, biases and activation steps
    rounded: dict = field(default_factory=dict)  # GPTQ's integers from the observation pass
    extremes: dict | None = None  # the min-max ranges, where auto or a search meets them (compares_extremes)
    notes: list[str] = field(default_factory=list)


def calibrate(
    float_model: onnx.ModelProto,
    graph,
    plan: QuantPlan,
    stream,
    inputs,
    config: QuantConfig,
    choice: WeightRangeChoice,
    progress: Progress,
    replan: Replan,
    *,
    statistics: dict[str, ChannelStatistics] | None = None,
    data_free: bool = False,
    affine_layers: frozenset[str] = frozenset(),
) -> Calibrated:
    """Calibrate `plan` (made from the IR `graph` of `float_model`) on the batches of `stream`.

    `replan`: the plan again with layers kept float (tensors observed at a mask's values);
    `statistics`: BatchNorm statistics for distribution correction; `affine_layers`: merged
    re-parameterized convs that learn QPRep's affine during refinement."""
    output_rule = any(spec.rule.kind == "output" for spec in plan.weights.values())
    sweeps = config.calibration.searched or config.corrects_bias or output_rule
    streams_gptq = _streams_gptq(config, sweeps)
    searched = sweeps or (config.gptq_in_sweep and not streams_gptq)
    if not (searched or config.refine):
        return _observed(float_model, graph, plan, stream, config, choice, progress, replan, streams_gptq)
    _refuse_sequence_first(inputs)
    data, samples = _gather(stream)
    result = Calibrated(plan, {}, samples)
    chunk_size = fixed_batch(float_model) or config.batch_size
    if not config.calibration.searched:
        chunks = frontier.batches(data, chunk_size)
        result.ranges, _, _ = _observe(float_model, plan, chunks, config, progress)
        result.plan = _without_masks(graph, plan, replan, result.ranges)
    if searched:
        search = _search(float_model, result.plan, data, result.ranges, config, choice, progress)
        if config.calibration.searched:  # nothing observed yet: the sharers, for later plans
            chunks = frontier.batches(data, chunk_size)
            result.ranges, result.extremes = _observed_after_search(
                float_model, result.plan, chunks, config, progress
            )
        chosen = {result.plan.activations[root].observed: r for root, r in search.ranges.items()}
        result.ranges = {**result.ranges, **chosen}
        result.search = search
        result.notes += _search_notes(search)
    if config.refine:
        release_free_memory()  # the search's freed activations must not sit under refinement's peak
        started = time.perf_counter()
        data, corrected, by_unit = corrected_for_refinement(
            float_model, statistics, data, config, data_free, progress
        )
        result.notes += corrected
        spent = time.perf_counter() - started + (result.search.seconds if result.search else 0.0)
        result.refined = _refine(
            float_model, graph, result, data, config, choice, progress, spent, affine_layers, by_unit
        )
        result.notes += result.refined.notes(config.refine_loss)
        if affine_layers:
            result.notes.append(_affine_note(config, affine_layers, result.refined.mirror.affine_weights))
    return result


def _affine_note(config: QuantConfig, layers: frozenset[str], learned: list[str]) -> str:
    if config.refine_affine:  # layers whose scales are not one per output channel learn none
        return f"{len(learned)} of {len(layers)} layers learned a per-channel affine (--refine-affine)"
    return f"QPRep: {len(layers)} merged re-parameterized convs learned a per-channel affine"


def _observed(float_model, graph, plan, stream, config, choice, progress, replan, streams_gptq) -> Calibrated:
    """Ranges observed in one pass over the streamed data, GPTQ's H measured in it where asked."""
    streamed = streamed_gptq.prepare(float_model, list(plan.weights)) if streams_gptq else None
    taps = streamed.taps if streamed else None
    ranges, samples, extremes = _observe(float_model, plan, stream, config, progress, taps=taps)
    plan = _without_masks(graph, plan, replan, ranges, extremes)
    result = Calibrated(plan, ranges, samples, extremes=extremes)
    if streamed:
        result.rounded, result.notes = _rounded_on_float_inputs(streamed, plan, config, choice, progress)
    return result


def _without_masks(graph, plan: QuantPlan, replan: Replan, *ranges) -> QuantPlan:
    """The plan again with the nodes around tensors observed at a mask's values kept float."""
    masked = {}
    for observed in ranges:
        masked |= masks.observed_unbounded(graph, plan, observed or {})
    return replan(keep_float={**plan.kept_float, **masked}) if masked else plan


def _refuse_sequence_first(inputs) -> None:
    """The calibration sweep cuts its data into batches along the first axis, which a
    sequence-first export (an LSTM's time steps) uses for something else."""
    spec = sequence_first(inputs)
    if spec is not None:
        raise OnnxqError(
            f"input {spec.name!r} has its first axis fixed at {spec.shape[0]} and a later one free, so "
            "its batch is not on the first axis: the calibration sweep (--calib-method mse, mae or "
            "pd; GPTQ rounding and bias correction, the defaults below 8-bit weights; --refine) cuts "
            "data along the first axis; quantize it with 8-bit weights and --calib-method "
            "auto, minmax or percentile, or export it batch-first"
        )


def compares_extremes(config: QuantConfig) -> bool:
    """Whether searched ranges (mse, mae, pd) meet the min-max ones in the check, as auto's
    percentile ranges do: with 8-bit activations and no refinement after the search. A search
    scores each range by its own tensor's error and clips the rare large activations a detector's
    scores live in (W8A8 mse lowest output SQNR: PP-PicoDet 1.7 dB, YOLOv8n's scores 12.0 dB,
    against 13.8 and 20.9 with auto)."""
    return config.calibration.searched and config.lowest_activation_bits >= 8 and not config.refine


def _observed_after_search(float_model, plan: QuantPlan, chunks, config: QuantConfig, progress: Progress):
    """The statistics ranges of the tensors a search over roots misses (the sharers, for later
    plans) and, where the search meets the min-max ranges, every observed tensor's min-max range:
    one pass over the data."""
    sharers, compared = plan.sharer_tensors(), compares_extremes(config)
    tensors = None if compared else sharers
    observed, _, extremes = _observe(float_model, plan, chunks, config, progress, tensors, compared)
    return {name: observed[name] for name in sharers if name in observed}, extremes


def _observe(
    float_model,
    plan,
    stream,
    config: QuantConfig,
    progress: Progress,
    tensors=None,
    extremes: bool = False,
    taps=None,
):
    """Float activation ranges by statistics (of `tensors`, or of all the plan observes), the
    samples seen, and the min-max ranges of the same values (auto, or where `extremes`), the
    alternative to the percentile or searched ones. `taps` read their tensors in the same pass
    (GPTQ's input correlations)."""
    progress.stage(f"calibrate ({config.calibration.value})", total=config.max_samples)
    observer = _observer_factory(config, plan)
    tensors = plan.observed_tensors() if tensors is None else tensors
    if not tensors:
        return {}, 0, None
    observers, samples = collect_observers(float_model, tensors, stream, observer, progress, taps)
    ranges = {name: o.range() for name, o in observers.items()}
    if not (extremes or config.calibration is CalibrationMethod.AUTO):
        return ranges, samples, None
    return ranges, samples, {name: o.extreme_range() for name, o in observers.items()}


def _streams_gptq(config: QuantConfig, sweeps: bool) -> bool:
    """GPTQ with H measured on the float model in the observation pass (onnxq.calib.streamed_gptq):
    where every weight is 8-bit and nothing else (`sweeps`, refinement) needs the calibration sweep."""
    return config.rounds_by_gptq and config.lowest_weight_bits >= 8 and not (sweeps or config.refine)


def _rounded_on_float_inputs(
    streamed, plan: QuantPlan, config: QuantConfig, choice: WeightRangeChoice, progress: Progress
) -> tuple[dict, list[str]]:
    """GPTQ's integers for the weights whose H the observation pass measured, and notes."""
    progress.status(f"GPTQ: rounding {len(streamed.layers)} weights")
    rounded, nearest = streamed_gptq.round_weights(streamed, plan, config.symmetric_weights, choice)
    notes = [f"GPTQ chose the integers of {len(rounded)} weights on float inputs (--weight-rounding)"]
    return rounded, notes + _left_nearest(nearest)


def _left_nearest(nearest: dict[str, str]) -> list[str]:
    """The note on the weights GPTQ left at nearest rounding (the first and why), if any."""
    if not nearest:
        return []
    first, why = next(iter(nearest.items()))
    return [f"GPTQ left {len(nearest)} weights at nearest rounding (first: {first}: {why})"]


def _gather(stream) -> tuple[dict[str, np.ndarray], int]:
    """All calibration batches in memory: the search revisits them many times."""
    parts = list(stream)
    data = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    return data, len(next(iter(data.values())))


def _search(
    float_model, plan, data, ranges, config: QuantConfig, int8_range: WeightRangeChoice, progress
) -> SearchResult:
    """Scales chosen by error in onnxruntime (or fixed ranges with bias correction only)."""
    method = config.calibration.value if config.calibration.searched else "fixed"
    settings = SearchSettings(
        method=method,
        bias_correction=config.corrects_bias,
        symmetric_weights=config.symmetric_weights,
        symmetric_activations=config.activation_symmetric,
        int8_range=int8_range,
        pd_lambda=config.pd_lambda,
        holdout=config.holdout if method == "pd" else 0.0,
        seed=config.seed,
        time_budget=config.time_budget,
        memory_budget=config.search_memory_gb * 1e9,
        half_cache=config.search_cache_half,
        fixed_batch=fixed_batch(float_model),
        rounding="gptq" if config.gptq_in_sweep else "nearest",
        activation_error=config.activation_error,
    )
    fixed = {
        spec.tensor: ranges[spec.observed] for spec in plan.activations.values() if spec.observed in ranges
    }
    return search_parameters(build_simulation(float_model, plan), plan, data, settings, progress, fixed)


def _refine(
    float_model,
    graph,
    calibrated: Calibrated,
    data,
    config: QuantConfig,
    int8_range: WeightRangeChoice,
    progress,
    spent: float,
    affine_layers: frozenset[str],
    statistics: dict[str, ChannelStatistics] | None = None,
):
    """Learned rounding and activation steps, starting from the calibrated ones (onnxq.refine).

    `graph` is the IR graph the plan was made from: its initializers are the float weights;
    `spent`: seconds of --time-budget already used (search, distribution correction);
    `affine_layers` learn QPRep's per-channel affine too; `statistics`: each unit's float inputs
    are corrected towards them first (PD-Quant's DC, block by block)."""
    from onnxq.refine.block_correction import BlockCorrection
    from onnxq.refine.unit_learning import RefineSettings

    plan, ranges, search = calibrated.plan, calibrated.ranges, calibrated.search
    ratios = search.weight_ratios if search else {}
    seeded = search.rounded if search else {}  # GPTQ's integers: refinement starts from them
    weights = {
        name: seeded[name]
        if name in seeded
        else planned_weight(
            constant(graph.initializers[name]),
            spec,
            weight_target(spec, config.symmetric_weights, int8_range),
            ratios.get(name),
        )
        for name, spec in plan.weights.items()
    }
    params = activation_params(plan, ranges, symmetric=config.activation_symmetric)
    budget = None if config.time_budget is None else max(1.0, config.time_budget - spent)
    settings = RefineSettings(
        unit=config.refine_unit,
        loss=config.refine_loss,
        iterations=config.refine_iters,
        batch=config.refine_batch,
        pd_samples=config.refine_pd_samples or None,
        memory=config.refine_memory_gb * 1e9,
        qdrop=config.qdrop,
        time_budget=budget,
        seed=config.seed,
        threads=config.threads,
        device=config.device,
        compiled=config.refine_compile,
    )
    biases = search.biases if search else None
    correction = None
    if statistics:
        correction = BlockCorrection(
            statistics,
            closeness=config.correction_closeness,
            batch=config.refine_batch,
            per_sample=config.correction_statistics == "sample",
        )
    return refine(
        float_model,
        plan,
        params,
        weights,
        biases,
        data,
        settings,
        progress,
        affine_layers,
        frozenset(seeded),
        correction,
    )


def _search_notes(search: SearchResult) -> list[str]:
    spent = f"{search.seconds:.1f} s"
    if search.pd_seconds:
        pruned, candidates = search.pd_pruned
        spent += (
            f" (pd {search.pd_seconds:.1f} s; {pruned} of {candidates} candidates ruled out by λ·regulariser)"
        )
    notes = [f"calibration search: {search.samples} samples, {spent}"]
    if search.rounded:
        notes.append(f"GPTQ chose the integers of {len(search.rounded)} weights (--weight-rounding)")
    notes += _left_nearest(search.nearest)
    if search.pd_loss:
        losses = ", ".join(f"{k} {v:.4g}" for k, v in search.pd_loss.items())
        notes.append(f"prediction difference (KL): {losses}")
    if search.pd_kept_start:
        notes.append("pd found nothing better than the mse choice on the calibration KL: kept the mse choice")
    local = [name for name in search.skipped if not name.endswith(" (pd)")]
    refined = [name for name in search.skipped if name.endswith(" (pd)")]
    if local:
        notes.append(
            f"time budget reached: {len(local)} items kept min-max ranges and their bias (first: {local[0]})"
        )
    if refined:
        notes.append(f"time budget reached: pd skipped {len(refined)} items, which keep their mse choice")
    return notes


def _observer_factory(config: QuantConfig, plan: QuantPlan):
    """tensor → its observer; Scale-Clip's K follows the bit width of the activation observed."""
    if config.calibration is CalibrationMethod.MINMAX:
        return lambda name: MinMaxObserver()
    if config.calibration is CalibrationMethod.SCALECLIP:
        bits = {spec.observed: spec.bits for spec in plan.activations.values()}
        return lambda name: ScaleClipObserver(config.activation_scaleclip_k(bits.get(name, 8)))
    return lambda name: HistogramObserver(config.percentile)
