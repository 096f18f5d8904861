"""Per-layer weight statistics that predict how hard a layer is to quantize.

Merged re-parameterized weights are known to carry outliers (the identity branch adds 1·γ/σ to one
tap per channel): a large max|w| / std in a channel wastes most of that channel's integer levels,
and a wide spread of max|w| across channels ruins a per-tensor scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

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
    """Statistics of every Conv/Gemm/MatMul with an initializer weight (or only `layers`)."""
    initializers = {t.name: t for t in model.graph.initializer}
    stats = []
    for node in model.graph.node:
        if node.op_type not in WEIGHTED_OPS or len(node.input) < 2 or node.input[1] not in initializers:
            continue
        if layers is not None and node.name not in layers:
            continue
        weight = numpy_helper.to_array(initializers[node.input[1]]).astype(np.float64)
        channels = _by_output_channel(node, weight)
        peaks = np.abs(channels).max(axis=1)
        stds = channels.std(axis=1)
        ratio = np.where(stds > 0, peaks / np.maximum(stds, 1e-30), 0.0)
        median = float(np.median(peaks))
        stats.append(
            LayerWeights(
                node.name or node.output[0],
                node.op_type,
                tuple(weight.shape),
                float(peaks.max()),
                float(ratio.max()),
                float(peaks.max() / median) if median > 0 else float("inf"),
            )
        )
    return stats


def _by_output_channel(node: onnx.NodeProto, weight: np.ndarray) -> np.ndarray:
    """The weight as rows of one output channel each."""
    if node.op_type == "Conv" or (node.op_type == "Gemm" and _trans_b(node)):
        return weight.reshape(weight.shape[0], -1)
    if node.op_type == "ConvTranspose":
        return np.moveaxis(weight, 1, 0).reshape(weight.shape[1], -1)
    return weight.reshape(-1, weight.shape[-1]).T  # Gemm without transB, MatMul: one column each


def _trans_b(node: onnx.NodeProto) -> bool:
    return any(a.name == "transB" and a.i for a in node.attribute)
