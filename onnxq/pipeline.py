"""The quantization pipeline, top to bottom:

load → simplify (guarded) → fold BatchNormalization → fuse branches → plan → calibrate (ranges,
scale search, GPTQ, distribution correction and refinement: onnxq.calibrate) → insert Q/DQ →
validate → tune (ranges, fidelity, speed: onnxq.tune). The first half, up to fuse branches, is
onnxq.prepare (what `onnxq fuse` runs); the QDQ model for a plan is built by onnxq.build and
checked by onnxq.validate. With `calibration="bn-stats"` the calibration data is synthesised from
the model's BatchNorm statistics first (data-free).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxq import tune
from onnxq.build import build_candidate
from onnxq.calib.data import (
    DataSource,
    DataStats,
    batches,
    first_batch,
    model_inputs,
    peek_samples,
)
from onnxq.calib.runner import fixed_batch
from onnxq.calib.sample_axes import describe_count
from onnxq.calib.search import SearchResult
from onnxq.calibrate import calibrate
from onnxq.config import QuantConfig
from onnxq.correct import (
    DATA_FREE,
    check_synthesis_inputs,
    synthesised_calibration,
)
from onnxq.errors import OnnxqError
from onnxq.fidelity import Fidelity, HoldBack
from onnxq.io import check_writable, load_model, save_model
from onnxq.passes.batch_axis import add_batch_axis, remove_batch_axis
from onnxq.passes.equalize import equalize_channels
from onnxq.passes.graph_utils import opset_version
from onnxq.passes.infer_types import typed_ir
from onnxq.passes.insert_qdq import required_opset
from onnxq.passes.integer_hardswish import integer_hardswishes
from onnxq.passes.opset_upgrade import upgrade_opset
from onnxq.passes.split_addend_reads import split_addend_reads
from onnxq.prepare import FuseResult, fuse, fuse_file
from onnxq.preprocess import Preprocess
from onnxq.progress import Progress, Silent
from onnxq.quant.int8_form import choose_int8_range
from onnxq.quant.plan import QuantPlan, integer_chain_ops, plan_quantization
from onnxq.refine import require_refinement
from onnxq.tune.speed_choice import FLOAT_IS_FASTER
from onnxq.validate import checker_error as input_checker_error
from onnxq.validate import validate

__all__ = ["FuseResult", "QuantResult", "fuse", "fuse_file", "quantize", "quantize_file"]

CHECK_SAMPLES = 2  # samples the simplify and validate checks run (whole activations are held)


@dataclass
class QuantResult:
    """The quantized model and what was done to get it."""

    model: onnx.ModelProto
    notes: list[str] = field(default_factory=list)
    weight_range: str = ""
    int8_weight_bits: int = 8  # 8: 8-bit weights use [-127, 127]; 7: [-63, 63] (saturating kernels)
    quantized_nodes: int = 0
    float_nodes: dict[str, str] = field(default_factory=dict)
    samples: int = 0
    samples_text: str = ""  # how to say `samples` for this model's inputs
    calibration: SearchResult | None = None
    fidelity: Fidelity | None = None
    refinement: object | None = None  # onnxq.refine.export.Refinement, when --refine ran


def quantize(
    model: str | os.PathLike | onnx.ModelProto,
    calibration: DataSource,
    config: QuantConfig | None = None,
    *,
    preprocess: Preprocess | None = None,
    progress: Progress | None = None,
) -> QuantResult:
    """Quantize a float model with calibration data into a QDQ model onnxruntime runs on integers."""
    config = config or QuantConfig()
    progress = progress or Silent()
    if config.refine:
        require_refinement(config.device)  # before any work, not after calibration
    proto = load_model(model) if isinstance(model, str | os.PathLike) else model
    _refuse_quantized(proto)
    checker_error = input_checker_error(proto)
    notes: list[str] = []
    if checker_error:
        notes.append(
            f"the input model fails the onnx checker ({checker_error}): the output is validated "
            "by onnxruntime alone"
        )
    data_free = isinstance(calibration, str) and calibration == DATA_FREE
    if data_free:
        calibration, synthesised = _synthesise(proto, model_inputs(proto), config, progress)
        notes.append(synthesised)
    run = functools.partial(
        _quantize_loaded, calibration, config, preprocess, progress, checker_error, data_free
    )
    handed = [proto]
    del proto  # the run takes the only reference onnxq holds, and frees the weights once prepared
    result, moves = run(handed, list(notes))
    if moves and _left_float_for_speed(result) and _rewound(calibration):
        progress.stage("retry for integer kernels")
        handed = [load_model(model) if isinstance(model, str | os.PathLike) else model]
        try:
            retried, _ = run(handed, list(notes), integer_spread=math.inf)
        except OnnxqError as error:  # --min-sqnr refusing the retried model: the first stands
            retried = error
        result = _after_retry(result, retried, moves)
    return result


def _quantize_loaded(
    calibration: DataSource,
    config: QuantConfig,
    preprocess: Preprocess | None,
    progress: Progress,
    checker_error: str | None,
    data_free: bool,
    handed: list[onnx.ModelProto],
    notes: list[str],
    integer_spread: float | None = None,
) -> tuple[QuantResult, int]:
    """quantize() on a loaded, checked model; also how many equalization moves took HardSwishes
    off integer kernels (`integer_spread`: onnxq.passes.equalize.equalize_channels').
    `handed` holds the model and is emptied: a reference passed as an argument would stay on
    the caller's stack, and the exported weights would outlive their preparation."""
    proto = handed.pop()
    inputs = model_inputs(proto)
    stats = DataStats()
    unbatched: list[str] = []
    stream = batches(
        calibration,
        inputs,
        preprocess=preprocess,
        batch_size=config.batch_size,
        max_samples=config.max_samples,
        stats=stats,
        unbatched=unbatched,
    )
    first, stream = first_batch(stream)
    if unbatched:
        proto = add_batch_axis(proto, unbatched)
        inputs = model_inputs(proto)
        notes.append(_unbatched_note(unbatched))
    sample = first if fixed_batch(proto) else {k: v[:CHECK_SAMPLES] for k, v in first.items()}
    held = HoldBack()
    stream = held.split(stream)

    prepared = fuse(
        proto,
        sample=sample,
        simplify_first=config.simplify,
        merge_branches=config.merges_branches,
        progress=progress,
    )
    del proto  # the exported weights: from here on the prepared model stands for them
    notes += prepared.notes
    float_model, statistics, stream, moves = _equalized(
        prepared, stream, config, progress, notes, integer_spread
    )
    float_model = _split_addend_reads(float_model, config, notes)
    graph_model = typed_ir(float_model)
    plan = plan_quantization(graph_model.graph, config)
    notes += [f"override {pattern!r} matches no layer" for pattern in plan.unmatched_overrides]
    if plan.widened_addends:
        notes.append(
            f"{len(plan.widened_addends)} tensors only Add reads kept at {config.addend_bits} bits "
            "(--addend-bits)"
        )
    if not plan.weights and not plan.activations:
        layers = [
            (n.op_type, n.name) for n in graph_model.graph if n.op_type in config.op_types and not n.domain
        ]
        raise OnnxqError(f"nothing to quantize: {plan.why_nothing_quantized(layers)}")
    opset = required_opset(plan)
    if opset > opset_version(float_model):
        float_model = upgrade_opset(float_model, opset, sample)
        notes.append(f"opset raised to {opset} for the integer types in use")
        graph_model = typed_ir(float_model)
        plan = plan_quantization(graph_model.graph, config)
    choice, ranged = choose_int8_range(float_model, plan, sample, config, baseline=prepared.model)
    notes += ranged
    affine = _affine_layers(prepared, plan, config)
    replan = functools.partial(_replan, float_model, config)
    calibrated = calibrate(
        float_model,
        graph_model.graph,
        plan,
        stream,
        inputs,
        config,
        choice,
        progress,
        replan,
        statistics=statistics,
        data_free=data_free,
        affine_layers=affine,
    )
    notes += calibrated.notes
    plan, ranges, search, refined = calibrated.plan, calibrated.ranges, calibrated.search, calibrated.refined
    rounded, extremes, samples = calibrated.rounded, calibrated.extremes, calibrated.samples

    notes += stats.warnings()
    progress.stage("insert Q/DQ")

    def builder(chosen: tune.Ranges, learned: bool = True) -> tune.Build:
        """Builds with `chosen` ranges; `learned`: with refinement's integers and steps, where kept."""
        kept = refined if learned else None
        return functools.partial(build_candidate, float_model, config, chosen, search, choice, kept, rounded)

    first = builder(ranges)(plan)
    if refined is not None and config.refine_check:
        progress.stage("check refinement")
        searched = builder(ranges, learned=False)(plan)
        checked = held.batches or [sample]
        kept, lines = tune.keep_refinement(float_model, first, searched, checked, config, held.held_back)
        notes += lines
        if not kept:
            refined, first = None, searched  # `builder` builds without it from here on
    progress.stage("validate")
    check = functools.partial(validate, sample=sample, check=not checker_error, reference=float_model)
    check(first.model)
    rebuild = tune.Rebuild(builder, replan, check)
    tuned = tune.tune_model(
        float_model, prepared.model, first, ranges, extremes, rebuild, sample, held, config, progress
    )
    notes += tuned.notes
    best, report = tuned.candidate, tuned.fidelity
    saved = remove_batch_axis(best.model, unbatched)
    if integer := integer_hardswishes(saved):
        notes.append(
            f"HardSwish on integer kernels: {integer} nodes, each written as a QLinearAdd and a QLinearMul"
        )
    return QuantResult(
        saved,
        notes,
        choice.reason,
        choice.bits,
        len(best.plan.quantized_nodes),
        _present(best.plan.float_nodes, saved),
        samples,
        describe_count(inputs, samples),
        search,
        report,
        refined,
    ), moves


def _left_float_for_speed(result: QuantResult) -> bool:
    """Nothing quantized because every plan ran slower than float."""
    return not result.quantized_nodes and FLOAT_IS_FASTER in result.float_nodes.values()


def _rewound(calibration: DataSource) -> bool:
    """Whether the calibration data can be read again: files and arrays can, a reader only
    through its `rewind` (onnxruntime's CalibrationDataReader may have one), which is called."""
    if not hasattr(calibration, "get_next"):
        return True
    rewind = getattr(calibration, "rewind", None)
    if callable(rewind):
        rewind()
    return callable(rewind)


def _after_retry(first: QuantResult, retried: QuantResult | OnnxqError, moves: int) -> QuantResult:
    """The retried model where something in it is quantized (it passed the speed check), else
    the first, left float (also where the retry ended in an error, such as --min-sqnr's); either
    way the notes say what the retry was and what it found."""
    why = (
        f"the first plan ran slower than float, and {moves} of equalization's channel moves sat "
        "beside HardSwish nodes, which keeps them off integer kernels"
    )
    if isinstance(retried, OnnxqError):
        first.notes.append(f"speed: {why}; quantized again without those moves: {retried}; left float")
        return first
    if not retried.quantized_nodes:
        first.notes.append(f"speed: {why}; quantized again without those moves: still slower, left float")
        return first
    retried.notes.insert(
        0, f"speed: {why}: quantized again without those moves (the notes below are of that run)"
    )
    return retried


def _affine_layers(prepared: FuseResult, plan: QuantPlan, config: QuantConfig) -> frozenset[str]:
    """The layers whose output learns a per-channel affine during refinement: every planned layer
    with --refine-affine, the convs merged from re-parameterized branches with --qprep."""
    if config.refine_affine:
        return frozenset(plan.layers)
    return frozenset(block.conv for block in prepared.fused.merged) if config.qprep else frozenset()


def _unbatched_note(names: list[str]) -> str:
    listed = ", ".join(map(repr, names))
    return (
        f"input {listed} takes one sample per run without a leading batch axis (a scalar, or a "
        "batch axis elsewhere or none): calibrated one sample per run, saved with the input as exported"
    )


def _present(float_nodes: dict[str, str], model: onnx.ModelProto) -> dict[str, str]:
    """The float nodes the saved model holds: where nothing was quantized it is the float model
    before equalization, without the Muls that pass added."""
    names = {node.name for node in model.graph.node}
    return {node: reason for node, reason in float_nodes.items() if node in names}


EQUALIZE_SAMPLES = 64  # calibration samples whose channel maxima set the equalization
EQUALIZE_BYTES = 128 << 20  # of them held at once at most (a 640×640 detector: 27 samples)
# Below this activation width a depthwise conv's input channels line up by where each is best
# clipped, not by their maxima (onnxq.calib.observers.ChannelRangeObserver). Chosen on held-out
# calibration images by tools/choose_equalize.py (MobileNetV2 mse, KL off / maxima / clipping
# points): W4A4 1.85 / 1.77 / 1.27, W5A5 0.293 / 0.235 / 0.345, W6A6 0.144 / 0.090 / 0.112.
CLIPPED_EQUALIZATION_BITS = 5


def _equalized(
    prepared: FuseResult,
    stream,
    config: QuantConfig,
    progress: Progress,
    notes: list[str],
    integer_spread: float | None = None,
):
    """The float model with its layer pairs' channels equalized (config.equalizes) and its
    channels moved across float ops (config.rescales_float_sides), the BatchNorm statistics
    rescaled with it, the stream with the samples it looked at put back, and how many moves
    took a HardSwish off integer kernels."""
    if not config.equalizes and not config.rescales_float_sides:
        return prepared.model, prepared.statistics, stream, 0
    progress.stage("equalize")
    peeked, stream = peek_samples(stream, EQUALIZE_SAMPLES, EQUALIZE_BYTES)

    def per_channel(node) -> bool:
        return config.layer_settings(node.name, node.op_type).granularity.kind == "channel"

    def clip_levels(node) -> int | None:
        bits = config.layer_settings(node.name, node.op_type).activation_bits
        return 2**bits - 1 if bits < CLIPPED_EQUALIZATION_BITS else None

    equalized = equalize_channels(
        prepared.model,
        peeked,
        prepared.statistics,
        per_channel,
        layer_pairs=config.equalizes,
        integer_chains=integer_chain_ops(config),
        clip_levels=clip_levels,
        integer_spread=integer_spread,
    )
    notes += equalized.notes
    return equalized.model, equalized.statistics, stream, equalized.beside_integer


QUANTIZED_OPS = frozenset(
    {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger"}
)


def _split_addend_reads(model: onnx.ModelProto, config: QuantConfig, notes: list[str]) -> onnx.ModelProto:
    """Where layers read activations narrower than --addend-bits, the sums Add nodes also read
    keep the addend width for the Adds (onnxq.passes.split_addend_reads)."""
    if not config.split_sums or config.lowest_activation_bits >= config.addend_bits:
        return model
    model, count = split_addend_reads(model, config.op_types)
    if count:
        notes.append(
            f"{count} tensors read by Add and by layers: the layers read them through a quantizer of "
            f"their own, so the Adds can read them at {config.addend_bits} bits (--split-sums)"
        )
    return model


def _refuse_quantized(model: onnx.ModelProto) -> None:
    """A model that already holds quantizers would get a second set over dequantized weights."""
    found = sum(node.op_type in QUANTIZED_OPS for node in model.graph.node)
    if found:
        raise OnnxqError(
            f"the model is already quantized ({found} QuantizeLinear, DequantizeLinear or integer "
            "nodes): give onnxq the float model it came from"
        )


def _replan(float_model, config: QuantConfig, **options) -> QuantPlan:
    """The plan again, with layers kept float (tune's fallbacks)."""
    return plan_quantization(typed_ir(float_model).graph, config, **options)


def _synthesise(proto, inputs, config: QuantConfig, progress) -> tuple[dict[str, np.ndarray], str]:
    """Data-free calibration inputs (onnxq.correct), from the model with its branches unmerged:
    every branch's BatchNorm keeps its statistics."""
    require_refinement(config.device)
    shape = check_synthesis_inputs(inputs)
    prepared = fuse(proto, simplify_first=config.simplify, merge_branches=False, progress=progress)
    return synthesised_calibration(prepared.model, prepared.statistics, shape, config, progress)


def quantize_file(
    source: str | os.PathLike,
    target: str | os.PathLike,
    calibration: DataSource,
    config: QuantConfig | None = None,
    **kwargs,
) -> QuantResult:
    """quantize() and save atomically: the output file appears only when complete."""
    target = check_writable(target, source=source)
    result = quantize(source, calibration, config, **kwargs)
    save_model(result.model, target)
    return result
