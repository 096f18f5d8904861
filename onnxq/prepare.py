"""Prepare the float model every later stage plans on: simplify (guarded by a sample), fold
BatchNormalization, fuse activations and constant affines, merge re-parameterized branches. What
`onnxq fuse` runs, and the pipeline's first stage. The BatchNorm statistics folding removes are
kept by the tensor each folded layer now produces (distribution correction reads them).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxq.calib.inputs import DYNAMIC_SIZE, SMALL_DYNAMIC_SIZE, model_inputs, random_sample
from onnxq.io import check_writable, load_model, oldest_ir_version, save_model, session, to_proto
from onnxq.passes.exported_forms import standard_forms
from onnxq.passes.float32 import compute_in_float32
from onnxq.passes.fold_affine import fold_affine
from onnxq.passes.fold_bn import ChannelStatistics, FoldReport, fold_batchnorm
from onnxq.passes.fuse_activations import fuse_activations, needs_opset
from onnxq.passes.fuse_branches import FuseReport, fuse_branches
from onnxq.passes.graph_utils import constants_to_initializers, name_nodes, opset_version
from onnxq.passes.infer_types import typed_ir
from onnxq.passes.opset_upgrade import reference_outputs, upgrade_opset
from onnxq.passes.simplify import simplify
from onnxq.passes.strided_views import drop_whole_strided_views
from onnxq.progress import Progress, Silent

MIN_OPSET = 13  # per-axis QuantizeLinear / DequantizeLinear
SAMPLE_SIZES = (DYNAMIC_SIZE, SMALL_DYNAMIC_SIZE, 2)  # unknown sizes tried for the simplify check


@dataclass
class FuseResult:
    """The float model with BatchNormalization folded and re-parameterized branches merged."""

    model: onnx.ModelProto
    folded: FoldReport
    fused: FuseReport
    notes: list[str] = field(default_factory=list)
    statistics: dict[str, ChannelStatistics] = field(default_factory=dict)  # tensor → BatchNorm's


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
    exported, expected, raised = opset_version(proto), None, ""
    if exported < MIN_OPSET:
        # the original's outputs: the reference of the upgrade's check and of simplify's (where the
        # model fails on the sample, the upgrade is not checked and simplify says why it kept it)
        if sample is None:
            sample, expected = sample_and_outputs(proto)
        else:
            expected = reference_outputs(proto, sample)
        proto = upgrade_opset(proto, MIN_OPSET, sample if expected is not None else None, expected)
        raised = f"opset raised from {exported} to {MIN_OPSET} (per-channel Q/DQ)"
    proto, widened = compute_in_float32(proto)
    notes += [note for note in (raised, widened) if note]
    if simplify_first:
        progress.stage("simplify")
        if sample is None:
            sample, expected = sample_and_outputs(proto)
        proto, note = simplify(proto, sample, None if widened else expected)
        notes.append(note)
    progress.stage("fold and fuse")
    graph_model = typed_ir(proto)
    if raised := needs_opset(graph_model.graph, opset_version(proto)):
        proto = upgrade_opset(proto, raised, sample)
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


def sample_and_outputs(model: onnx.ModelProto) -> tuple[dict[str, np.ndarray], list[np.ndarray] | None]:
    """A random sample the model runs on, for the simplify check where no data is given, and the
    model's outputs on it (the check's reference: the model is not run twice). Its unknown sizes
    are 224, else 32, else 2 (a YOLO neck needs sides of 32 or more; PP-OCRv4's text recognizer,
    whose height is declared unknown but must be 48, runs at 2 and at neither other). Where none
    runs, the first and no outputs: the check then says why it kept the model."""
    inputs = model_inputs(model)
    runner = session(model, optimize=False)
    for size in SAMPLE_SIZES:
        sample = random_sample(inputs, size=size)
        try:
            return sample, runner.run(None, sample)
        except Exception:  # onnxruntime's Fail on sizes the model cannot take
            continue
    return random_sample(inputs, size=SAMPLE_SIZES[0]), None
