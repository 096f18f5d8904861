"""Per-layer weight statistics that predict how hard a layer is to quantize.

Merged re-parameterized weights are known to carry outliers (the identity branch adds 1·γ/σ to one
tap per channel): a large max|w| / std in a channel wastes most of that channel's integer levels,
and a wide spread of max|w| across channels ruins a per-tensor scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from onnxq.io import to_ir
from onnxq.passes.graph_utils import constant, output_channel_axis

WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass(frozen=True)
class LayerWeights:
    layer: str
    op_type: str
    shape: tuple[int, ...]
    absmax: float  # max |w| over the whole tensor
    peak_to_std: float  # max over output channels of max|w_c| / std(w_c)
    channel_spread: float  # max over channels of max|w_c|, over its median across channels


def weight_statistics(model: onnx.ModelProto, layers: set[str] | None = None) -> list[LayerWeights]:
    """Statistics of every Conv/Gemm/MatMul with a constant weight (or only `layers`)."""
    stats = []
    for node in to_ir(model).graph:
        weight = constant(node.inputs[1]) if node.op_type in WEIGHTED_OPS and len(node.inputs) > 1 else None
        if weight is None or (layers is not None and node.name not in layers):
            continue
        axis = output_channel_axis(node, weight)  # None (grouped ConvTranspose): one row
        by_channel = weight[None] if axis is None else np.moveaxis(weight, axis, 0)
        rows = by_channel.reshape(by_channel.shape[0], -1).astype(np.float64)
        peaks = np.abs(rows).max(axis=1)
        stds = rows.std(axis=1)
        ratio = np.where(stds > 0, peaks / np.maximum(stds, 1e-30), 0.0)
        median = float(np.median(peaks))
        stats.append(
            LayerWeights(
                node.name or node.outputs[0].name,
                node.op_type,
                tuple(weight.shape),
                float(peaks.max()),
                float(ratio.max()),
                float(peaks.max() / median) if median > 0 else float("inf"),
            )
        )
    return stats
