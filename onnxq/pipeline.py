"""The quantization pipeline, top to bottom:

load → simplify (guarded) → fold BatchNormalization → fuse branches → plan → calibrate (ranges,
scale search, GPTQ, distribution correction and refinement: onnxq.calibrate) → insert Q/DQ →
validate → tune (ranges, fidelity, speed: onnxq.tune). `fuse()` is the first half on its own
(what `onnxq fuse` runs). With `calibration="bn-stats"` the calibration data is synthesised from
the model's BatchNorm statistics first (data-free).
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
from onnx import version_converter

import onnxq
from onnxq import tune
from onnxq.calib.data import (
    DataSource,
    DataStats,
    batches,
    describe_count,
    first_batch,
    model_inputs,
    peek_samples,
    random_sample,
)
from onnxq.calib.runner import fixed_batch
from onnxq.calib.search import SearchResult
from onnxq.calibrate import calibrate
from onnxq.config import Preprocess, QuantConfig
from onnxq.correct import (
    DATA_FREE,
    check_synthesis_inputs,
    synthesised_calibration,
)
from onnxq.errors import OnnxqError
from onnxq.fidelity import Fidelity, HoldBack
from onnxq.io import (
    check_writable,
    load_model,
    oldest_ir_version,
    run,
    save_model,
    session,
    to_proto,
)
from onnxq.passes.batch_axis import add_batch_axis, remove_batch_axis
from onnxq.passes.equalize import equalize_channels
from onnxq.passes.exported_forms import standard_forms
from onnxq.passes.float32 import compute_in_float32
from onnxq.passes.fold_affine import fold_affine
from onnxq.passes.fold_bn import ChannelStatistics, FoldReport, fold_batchnorm
from onnxq.passes.fuse_activations import fuse_activations, needs_opset
from onnxq.passes.fuse_branches import FuseReport, fuse_branches
from onnxq.passes.graph_utils import constants_to_initializers, name_nodes, opset_version
from onnxq.passes.infer_types import typed_ir
from onnxq.passes.insert_qdq import (
    activation_params,
    insert_qdq,
    required_opset,
)
from onnxq.passes.simplify import simplify
from onnxq.passes.split_addend_reads import split_addend_reads
from onnxq.passes.strided_views import drop_whole_strided_views
from onnxq.progress import Progress, Silent
from onnxq.quant.int8_form import choose_int8_range
from onnxq.quant.plan import QuantPlan, plan_quantization
from onnxq.refine import require_refinement

MIN_OPSET = 13  # per-axis QuantizeLinear / DequantizeLinear
CHECK_SAMPLES = 2  # samples the simplify and validate checks run (whole activations are held)


@dataclass
class FuseResult:
    """The float model with BatchNormalization folded and re-parameterized branches merged."""

    model: onnx.ModelProto
    folded: FoldReport
    fused: FuseReport
    notes: list[str] = field(default_factory=list)
    statistics: dict[str, ChannelStatistics] = field(default_factory=dict)  # tensor → BatchNorm's


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
    inputs = model_inputs(proto)
    checker_error = _checker_error(proto)
    notes: list[str] = []
    if checker_error:
        notes.append(
            f"the input model fails the onnx checker ({checker_error}): the output is validated "
            "by onnxruntime alone"
        )
    data_free = isinstance(calibration, str) and calibration == DATA_FREE
    if data_free:
        calibration, synthesised = _synthesise(proto, inputs, config, progress)
        notes.append(synthesised)
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
    float_model, statistics, stream = _equalized(prepared, stream, config, progress, notes)
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
        raise OnnxqError("nothing to quantize: the model has no Conv, Gemm or MatMul with constant weights")
    opset = required_opset(plan)
    if opset > opset_version(float_model):
        float_model = _convert_opset(float_model, opset)
        notes.append(f"opset raised to {opset} for the integer types in use")
        graph_model = typed_ir(float_model)
        plan = plan_quantization(graph_model.graph, config)
    choice, ranged = choose_int8_range(float_model, plan, sample, config, baseline=prepared.model)
    notes += ranged
    affine = frozenset(block.conv for block in prepared.fused.merged) if config.qprep else frozenset()
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
        return functools.partial(_build, float_model, config, chosen, search, choice, kept, rounded)

    first = builder(ranges)(plan)
    if refined is not None and config.refine_check:
        progress.stage("check refinement")
        searched = builder(ranges, learned=False)(plan)
        checked = held.batches or [sample]
        kept, lines = tune.keep_refinement(float_model, first, searched, checked, config, bool(held.batches))
        notes += lines
        if not kept:
            refined, first = None, searched  # `builder` builds without it from here on
    progress.stage("validate")
    check = functools.partial(validate, sample=sample, check=not checker_error)
    check(first.model)
    rebuild = tune.Rebuild(builder, replan, check)
    tuned = tune.tune_model(
        float_model, prepared.model, first, ranges, extremes, rebuild, sample, held, config, progress
    )
    notes += tuned.notes
    best, report = tuned.candidate, tuned.fidelity
    saved = remove_batch_axis(best.model, unbatched)
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
    )


def _unbatched_note(names: list[str]) -> str:
    listed = ", ".join(map(repr, names))
    return (
        f"input {listed} takes one sample without a batch axis: calibrated one sample per run, "
        "saved with the input as exported"
    )


def _present(float_nodes: dict[str, str], model: onnx.ModelProto) -> dict[str, str]:
    """The float nodes the saved model holds: where nothing was quantized it is the float model
    before equalization, without the Muls that pass added."""
    names = {node.name for node in model.graph.node}
    return {node: reason for node, reason in float_nodes.items() if node in names}


EQUALIZE_SAMPLES = 64  # calibration samples whose channel maxima set the equalization
EQUALIZE_BYTES = 128 << 20  # of them held at once at most (a 640×640 detector: 27 samples)


def _equalized(prepared: FuseResult, stream, config: QuantConfig, progress: Progress, notes: list[str]):
    """The float model with its layer pairs' channels equalized (config.equalizes) and its
    channels moved across float ops (config.rescales_float_sides), the BatchNorm statistics
    rescaled with it, and the stream with the samples it looked at put back."""
    if not config.equalizes and not config.rescales_float_sides:
        return prepared.model, prepared.statistics, stream
    progress.stage("equalize")
    peeked, stream = peek_samples(stream, EQUALIZE_SAMPLES, EQUALIZE_BYTES)

    def per_channel(node) -> bool:
        return config.layer_settings(node.name, node.op_type).granularity.kind == "channel"

    equalized = equalize_channels(
        prepared.model, peeked, prepared.statistics, per_channel, layer_pairs=config.equalizes
    )
    notes += equalized.notes
    return equalized.model, equalized.statistics, stream


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


def _build(
    float_model, config: QuantConfig, ranges, search, choice, refined, rounded, plan: QuantPlan
) -> tune.Candidate:
    """The QDQ model for `plan`, with its layers' (node, input, output) tensors; `rounded`:
    weight integers GPTQ chose in the observation pass."""
    graph_model = typed_ir(float_model)
    layers = _layer_tensors(graph_model.graph, plan)
    params = activation_params(plan, ranges, symmetric=config.activation_symmetric)
    if refined is not None:
        params.update({root: p for root, p in refined.activations.items() if root in params})
    integers = {
        **(search.rounded if search else {}),
        **rounded,
        **(refined.weights if refined is not None else {}),
    }
    insert_qdq(
        graph_model.graph,
        plan,
        params,
        symmetric_weights=config.symmetric_weights,
        int8_range=choice,
        weight_ratios=search.weight_ratios if search else None,
        biases={**(search.biases if search else {}), **(refined.biases if refined is not None else {})},
        refined_weights=integers,
    )
    quantized = to_proto(graph_model)
    quantized.ir_version = oldest_ir_version(quantized)
    _write_metadata(quantized, config, choice.reason)
    return tune.Candidate(quantized, plan, layers)


def _layer_tensors(graph, plan: QuantPlan) -> list[tuple[str, str, str]]:
    """(node, input, output) of every quantized compute layer, named as in the float graph; an
    input behind an absorbed Relu/Clip (removed from the QDQ graph) is read before it."""
    before_absorbed = {n.outputs[0].name: n.inputs[0].name for n in graph if n.name in plan.absorbed}
    return [
        (node.name, before_absorbed.get(node.inputs[0].name, node.inputs[0].name), node.outputs[0].name)
        for node in graph
        if node.name in plan.layers and node.inputs and node.inputs[0] is not None
    ]


def _synthesise(proto, inputs, config: QuantConfig, progress) -> tuple[dict[str, np.ndarray], str]:
    """Data-free calibration inputs (onnxq.correct), from the model with its branches unmerged:
    every branch's BatchNorm keeps its statistics."""
    require_refinement(config.device)
    shape = check_synthesis_inputs(inputs)
    prepared = fuse(proto, simplify_first=config.simplify, merge_branches=False, progress=progress)
    return synthesised_calibration(prepared.model, prepared.statistics, shape, config, progress)


def fuse(
    model: str | os.PathLike | onnx.ModelProto,
    *,
    sample: dict[str, np.ndarray] | None = None,
    simplify_first: bool = True,
    merge_branches: bool = True,
    progress: Progress | None = None,
) -> FuseResult:
    """Simplify (guarded by `sample`, random data when None), fold BatchNormalization, merge branches.

    The result computes what the input computes (to float rounding); every merge the passes
    refused is in the reports with its reason.
    """
    progress = progress or Silent()
    proto = load_model(model) if isinstance(model, str | os.PathLike) else model
    proto, notes = standard_forms(proto)
    exported = opset_version(proto)
    proto = _supported_opset(proto)
    raised = (
        f"opset raised from {exported} to {MIN_OPSET} (per-channel Q/DQ)"
        if opset_version(proto) > exported
        else ""
    )
    proto, widened = compute_in_float32(proto)
    notes += [note for note in (raised, widened) if note]
    if simplify_first:
        progress.stage("simplify")
        proto, note = simplify(proto, sample if sample is not None else random_sample(model_inputs(proto)))
        notes.append(note)
    progress.stage("fold and fuse")
    graph_model = typed_ir(proto)
    if raised := needs_opset(graph_model.graph, opset_version(proto)):
        proto = _convert_opset(proto, raised)
        notes.append(f"opset raised to {raised} for HardSwish")
        graph_model = typed_ir(proto)
    name_nodes(graph_model.graph)  # later stages rebuild the graph and refer to nodes by name
    constants_to_initializers(graph_model.graph)
    if views := drop_whole_strided_views(graph_model.graph):
        notes.append(f"wrote {views} strided views of whole tensors (as_strided) as the tensors")
    folded = fold_batchnorm(graph_model.graph)
    if folded.folded:
        notes.append(f"folded {len(folded.folded)} BatchNormalization nodes")
    if activations := fuse_activations(graph_model.graph, opset_version(proto)):
        notes.append(
            f"fused {activations} hard-swish/hard-sigmoid activations written op by op into one node each"
        )
    if affine := fold_affine(graph_model.graph, folded.statistics):
        notes.append(f"folded {len(affine)} constant Mul/Add nodes into the layers before them")
    fused = fuse_branches(graph_model.graph) if merge_branches else FuseReport()
    if fused.merged:
        notes.append(f"merged {fused.branches_merged} branches into {len(fused.merged)} Conv nodes")
    statistics = _output_statistics(graph_model.graph, folded.statistics, folded.kept, fused)
    result = to_proto(graph_model)
    result.ir_version = oldest_ir_version(result)
    return FuseResult(result, folded, fused, notes, statistics)


def _output_statistics(
    graph, by_layer: dict[str, ChannelStatistics], kept: dict[str, ChannelStatistics], fused: FuseReport
):
    """BatchNorm statistics by the tensor each folded layer now produces, and by the output of each
    BatchNormalization left in the graph; a merged Conv's output is a sum of branches whose
    covariance no BatchNorm recorded, so it has none."""
    merged = {name for block in fused.merged for name in (block.conv, *block.branches)}
    folded = {
        node.outputs[0].name: by_layer[node.name]
        for node in graph
        if node.name in by_layer and node.name not in merged
    }
    produced = {value.name for node in graph for value in node.outputs}
    return folded | {name: stats for name, stats in kept.items() if name in produced}


def fuse_file(source: str | os.PathLike, target: str | os.PathLike, **kwargs) -> FuseResult:
    """fuse() and save atomically."""
    check_writable(target, source=source)
    result = fuse(source, **kwargs)
    save_model(result.model, target)
    return result


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


def validate(model: onnx.ModelProto, sample: dict[str, np.ndarray], *, check: bool = True) -> None:
    """The onnx checker (`check`: unless the input model already failed it) and one onnxruntime
    run on real data must both accept the model."""
    error = _checker_error(model) if check else None
    if error:
        raise OnnxqError(f"internal error: the quantized model is invalid ({error})")
    outputs = run(session(model), sample)
    if not all(np.isfinite(o).all() for o in outputs if o.dtype.kind == "f"):
        raise OnnxqError("internal error: the quantized model produces NaN or infinite values")


def _checker_error(model: onnx.ModelProto) -> str | None:
    """The onnx checker's first line about `model`, or None when it passes. Exporters write
    models onnxruntime runs but the checker refuses (a graph input declared without a shape)."""
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as err:
        return str(err).splitlines()[0]
    except ValueError:  # over protobuf's 2 GB: the checker cannot take it, onnxruntime can
        return None
    return None


def _supported_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    return model if opset_version(model) >= MIN_OPSET else _convert_opset(model, MIN_OPSET)


def _convert_opset(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    version = opset_version(model)
    try:
        converted = version_converter.convert_version(model, target)
    except Exception as err:  # the converter raises plain RuntimeError and C++ errors
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise OnnxqError(f"cannot upgrade the model from opset {version} to {target}: {first}") from None
    converted.ir_version = oldest_ir_version(converted)
    return converted


def _write_metadata(model: onnx.ModelProto, config: QuantConfig, weight_reason: str) -> None:
    settings = {k: (v.value if hasattr(v, "value") else v) for k, v in asdict(config).items()}
    settings["op_types"] = sorted(config.op_types)
    entries = {
        "onnxq.version": onnxq.__version__,
        "onnxq.config": json.dumps(settings, sort_keys=True),
        "onnxq.weight_range": weight_reason,
    }
    kept = [p for p in model.metadata_props if p.key not in entries]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in entries.items():
        model.metadata_props.add(key=key, value=value)
