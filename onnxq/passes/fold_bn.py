"""Fold inference-mode BatchNormalization into the Conv, ConvTranspose or Gemm before it.

With σ = sqrt(var + ε) per output channel c:
    W'[c] = W[c] · γ[c] / σ[c]
    b'[c] = (b[c] − μ[c]) · γ[c] / σ[c] + β[c]
The fold is skipped (with the reason) when the layer's output is read elsewhere or any parameter
is not a constant. A layer whose weights other layers share too (a siamese network's tied
branches) folds into a copy of its own; the others keep the original.

The statistics are not thrown away: the folded layer's output is the BatchNormalization's output,
whose per-channel mean and variance over the training set were β and γ²·var/(var + ε). They are
kept (FoldReport.statistics) for distribution correction and data-free calibration, and never
written into a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxq.passes.graph_utils import (
    attribute,
    bypass,
    constant,
    drop_unused_initializers,
    output_channel_axis,
    scaled_gemm,
    set_initializer,
    single_consumer,
)

FOLDABLE = ("Conv", "ConvTranspose", "Gemm")


@dataclass(frozen=True)
class ChannelStatistics:
    """Per-channel mean and variance a layer's output had over the training set."""

    mean: np.ndarray
    var: np.ndarray

    def affine(self, factor: np.ndarray, shift: np.ndarray) -> ChannelStatistics:
        """The statistics of factor·y + shift."""
        return ChannelStatistics(self.mean * factor + shift, self.var * factor**2)


@dataclass
class FoldReport:
    folded: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    statistics: dict[str, ChannelStatistics] = field(default_factory=dict)  # layer node → its output's
    # a BatchNormalization left in the graph (after an Add, before its conv): its output tensor →
    # that output's statistics, which distribution correction can match as well
    kept: dict[str, ChannelStatistics] = field(default_factory=dict)


def fold_batchnorm(graph: ir.Graph) -> FoldReport:
    """Fold every foldable BatchNormalization in place; returns what was folded and skipped."""
    report = FoldReport()
    for bn in [n for n in graph if n.op_type == "BatchNormalization" and n.domain == ""]:
        reason = _fold_one(graph, bn, report.statistics)
        if reason is None:
            report.folded.append(bn.name or bn.outputs[0].name)
        else:
            report.skipped[bn.name or bn.outputs[0].name] = reason
            if (kept := _bn_output_statistics(bn)) is not None:
                report.kept[bn.outputs[0].name] = kept
    drop_unused_initializers(graph)
    return report


def _bn_output_statistics(bn: ir.Node) -> ChannelStatistics | None:
    """The output statistics of an inference-mode BatchNormalization with constant parameters:
    mean β and variance γ²·var/(var + ε), folded or not."""
    if attribute(bn, "training_mode", 0) or len(bn.outputs) > 1:
        return None
    params = [constant(v) for v in bn.inputs[1:5]]
    if any(p is None for p in params):
        return None
    gamma, beta, _, var = (np.asarray(p, np.float64) for p in params)
    return ChannelStatistics(beta.copy(), gamma**2 * var / (var + attribute(bn, "epsilon", 1e-5)))


def _fold_one(graph: ir.Graph, bn: ir.Node, statistics: dict[str, ChannelStatistics]) -> str | None:
    layer = bn.inputs[0].producer() if bn.inputs[0] is not None else None
    if layer is None or layer.op_type not in FOLDABLE or layer.domain != "":
        return "not preceded by Conv, ConvTranspose or Gemm"
    if single_consumer(layer.outputs[0]) is not bn:
        return f"output of {layer.op_type} {layer.name!r} is read elsewhere"
    if attribute(bn, "training_mode", 0) or len(bn.outputs) > 1:
        return "training-mode BatchNormalization"
    params = [constant(v) for v in bn.inputs[1:5]]
    weight = constant(layer.inputs[1])
    if weight is None or any(p is None for p in params):
        return "weights or statistics are not constants"
    axis = output_channel_axis(layer, weight)
    if axis is None:
        return "grouped ConvTranspose"
    gamma, beta, mean, var = (np.asarray(p, np.float64) for p in params)
    epsilon = attribute(bn, "epsilon", 1e-5)
    factor = gamma / np.sqrt(var + epsilon)
    bias_value = layer.inputs[2] if len(layer.inputs) > 2 else None
    bias = constant(bias_value)
    if bias_value is not None and bias is None:
        return "bias is not a constant"
    if scaled_gemm(layer):
        return "Gemm with alpha or beta other than 1"
    bias = np.zeros(weight.shape[axis]) if bias is None else np.broadcast_to(bias, factor.shape)

    shape = [1] * weight.ndim
    shape[axis] = -1
    new_weight = (weight.astype(np.float64) * factor.reshape(shape)).astype(weight.dtype)
    new_bias = ((bias - mean) * factor + beta).astype(weight.dtype)
    layer.replace_input_with(1, set_initializer(graph, layer.inputs[1].name, new_weight))
    bias_input = set_initializer(
        graph, (bias_value.name if bias_value else layer.name) + "_folded_bias", new_bias
    )
    if len(layer.inputs) < 3:
        layer.resize_inputs(3)
    layer.replace_input_with(2, bias_input)
    statistics[layer.name] = _bn_output_statistics(bn)  # read while the BatchNorm is still there
    bypass(graph, bn, layer.outputs[0])
    return None
