"""Fold inference-mode BatchNormalization into the Conv, ConvTranspose or Gemm before it.

With σ = sqrt(var + ε) per output channel c:
    W'[c] = W[c] · γ[c] / σ[c]
    b'[c] = (b[c] − μ[c]) · γ[c] / σ[c] + β[c]
A BatchNormalization after a channel-axis Concat of such layers (MixNet's mixed-kernel depthwise
convs) folds slice by slice, each layer taking the channels it wrote. The fold is skipped (with
the reason) when a layer's output is read elsewhere or any parameter is not a constant. A layer
whose weights other layers share too (a siamese network's tied branches) folds into a copy of
its own; the others keep the original.

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
    if attribute(bn, "training_mode", 0) or len(bn.outputs) > 1:
        return "training-mode BatchNormalization"
    source = bn.inputs[0].producer() if bn.inputs[0] is not None else None
    joined = source is not None and source.op_type == "Concat" and source.domain == ""
    layers = _concatenated_layers(source) if joined else [source]
    if isinstance(layers, str):
        return layers
    reasons = [_unfoldable(layer, source if joined else bn) for layer in layers]
    if reason := next((r for r in reasons if r is not None), None):
        return reason
    if joined and single_consumer(source.outputs[0]) is not bn:
        return f"output of Concat {source.name!r} is read elsewhere"
    params = [constant(v) for v in bn.inputs[1:5]]
    if any(p is None for p in params):
        return "weights or statistics are not constants"
    gamma, beta, mean, var = (np.asarray(p, np.float64) for p in params)
    factor = gamma / np.sqrt(var + attribute(bn, "epsilon", 1e-5))
    widths = [_output_channels(layer) for layer in layers]
    if sum(widths) != factor.size:
        return f"{factor.size} BatchNorm channels against {sum(widths)} layer output channels"
    output_statistics = _bn_output_statistics(bn)  # read while the BatchNorm is still there
    start = 0
    for layer, width in zip(layers, widths, strict=True):
        part = slice(start, start + width)
        _scale_layer(graph, layer, factor[part], beta[part] - mean[part] * factor[part])
        statistics[layer.name] = ChannelStatistics(output_statistics.mean[part], output_statistics.var[part])
        start += width
    bypass(graph, bn, source.outputs[0])
    return None


def _concatenated_layers(concat: ir.Node) -> list[ir.Node] | str:
    """The layers whose outputs a channel-axis Concat joins (MixNet's mixed-kernel convs, then one
    BatchNorm over all of them): each slice of the BatchNorm folds into its own layer."""
    layers = [value.producer() if value is not None else None for value in concat.inputs]
    if any(layer is None or layer.op_type not in FOLDABLE or layer.domain != "" for layer in layers):
        return "not preceded by Conv, ConvTranspose or Gemm, nor by a Concat of them"
    weight = constant(layers[0].inputs[1])
    if weight is None:
        return "weights or statistics are not constants"
    rank = 2 if layers[0].op_type == "Gemm" else weight.ndim
    axis = attribute(concat, "axis", 0)
    if (axis + rank if axis < 0 else axis) != 1:
        return "preceded by a Concat that is not along channels"
    return layers


def _unfoldable(layer: ir.Node, reader: ir.Node) -> str | None:
    """Why `layer` cannot take the BatchNorm's affine into its weights, or None."""
    if layer is None or layer.op_type not in FOLDABLE or layer.domain != "":
        return "not preceded by Conv, ConvTranspose or Gemm"
    if single_consumer(layer.outputs[0]) is not reader:
        return f"output of {layer.op_type} {layer.name!r} is read elsewhere"
    weight = constant(layer.inputs[1])
    if weight is None:
        return "weights or statistics are not constants"
    if output_channel_axis(layer, weight) is None:
        return "grouped ConvTranspose"
    bias_value = layer.inputs[2] if len(layer.inputs) > 2 else None
    if bias_value is not None and constant(bias_value) is None:
        return "bias is not a constant"
    if scaled_gemm(layer):
        return "Gemm with alpha or beta other than 1"
    return None


def _output_channels(layer: ir.Node) -> int:
    weight = constant(layer.inputs[1])
    return weight.shape[output_channel_axis(layer, weight)]


def _scale_layer(graph: ir.Graph, layer: ir.Node, factor: np.ndarray, shift: np.ndarray) -> None:
    """Make `layer` compute factor·y + shift per output channel, y being what it computed."""
    weight = constant(layer.inputs[1])
    axis = output_channel_axis(layer, weight)
    bias_value = layer.inputs[2] if len(layer.inputs) > 2 else None
    bias = constant(bias_value)
    bias = np.zeros(weight.shape[axis]) if bias is None else np.broadcast_to(bias, factor.shape)
    shape = [1] * weight.ndim
    shape[axis] = -1
    new_weight = (weight.astype(np.float64) * factor.reshape(shape)).astype(weight.dtype)
    new_bias = (bias * factor + shift).astype(weight.dtype)
    layer.replace_input_with(1, set_initializer(graph, layer.inputs[1].name, new_weight))
    bias_input = set_initializer(
        graph, (bias_value.name if bias_value else layer.name) + "_folded_bias", new_bias
    )
    if len(layer.inputs) < 3:
        layer.resize_inputs(3)
    layer.replace_input_with(2, bias_input)
