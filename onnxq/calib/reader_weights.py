"""How much each channel of an activation counts in the error of the layers that read it.

A rounding or clipping error e_c in input channel c reaches a reader's output through that
channel's weights, and the readers' squared output error is about Σ_c ‖W_c‖² e_c² when channel
errors are uncorrelated. Scoring an activation's clipping ratio by this weighted error instead
of its own mean error spends the 2^bits levels where the readers look: a channel whose weights
are near zero may be clipped hard, one that the next layer amplifies may not.

Measured on held-out calibration images it lost (tools/choose_activation_error.py): the
readers' output is not the model's, and after a depthwise reader the projection that follows
decides what a channel's error costs. So it is a choice (QuantConfig.activation_error), not
the default.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx


@dataclass(frozen=True)
class ChannelWeights:
    """Weights per channel of a tensor laid out [..., channels, inner...]: channel of flat
    position p = (p // inner) % channels."""

    weights: np.ndarray  # per channel, mean 1
    inner: int

    def at(self, positions: np.ndarray) -> np.ndarray:
        """The weight of each flat position of the tensor."""
        channels = len(self.weights)
        return self.weights[(positions // self.inner) % channels].astype(np.float32)


def reader_channel_weights(
    readers: list[onnx.NodeProto], tensor: str, shape: tuple[int, ...], params: dict[str, np.ndarray]
) -> ChannelWeights | None:
    """The readers' squared weights summed per input channel of `tensor` (its sample shape
    `shape`, batch first), or None where a reader is not a layer whose weights are known."""
    if not readers:
        return None
    total, inner = None, None
    for node in readers:
        found = _one_reader(node, tensor, shape, params)
        if found is None:
            return None
        weights, reader_inner = found
        if total is not None and (len(weights) != len(total) or reader_inner != inner):
            return None
        total = weights if total is None else total + weights
        inner = reader_inner
    mean = float(total.mean())
    if not np.isfinite(mean) or mean <= 0:
        return None
    return ChannelWeights((total / mean).astype(np.float64), inner)


def _one_reader(node, tensor, shape, params) -> tuple[np.ndarray, int] | None:
    if len(node.input) < 2 or node.input[0] != tensor or node.input[1] not in params:
        return None
    weight = params[node.input[1]].astype(np.float64)
    if node.op_type == "Conv" and len(shape) == weight.ndim:
        group = int(_attribute(node, "group", 1))
        per_out = (weight**2).reshape(weight.shape[0], weight.shape[1], -1).sum(axis=2)
        per_in = per_out.reshape(group, weight.shape[0] // group, weight.shape[1]).sum(axis=1)
        return _checked(per_in.reshape(-1), shape, 1)
    if node.op_type == "ConvTranspose" and len(shape) == weight.ndim:
        return _checked((weight**2).reshape(weight.shape[0], -1).sum(axis=1), shape, 1)
    if node.op_type == "MatMul" and weight.ndim == 2:
        return _checked((weight**2).sum(axis=1), shape, len(shape) - 1)
    if node.op_type == "Gemm" and weight.ndim == 2 and not _attribute(node, "transA", 0):
        axis = 0 if _attribute(node, "transB", 0) else 1
        return _checked((weight**2).sum(axis=axis), shape, 1)
    return None


def _checked(weights: np.ndarray, shape: tuple[int, ...], axis: int) -> tuple[np.ndarray, int] | None:
    """(weights, inner) where the tensor's channel axis holds that many channels."""
    if axis >= len(shape) or shape[axis] != len(weights):
        return None
    return weights, int(np.prod(shape[axis + 1 :], dtype=np.int64))


def _attribute(node: onnx.NodeProto, name: str, default: int) -> int:
    found = [a for a in node.attribute if a.name == name]
    return int(onnx.helper.get_attribute_value(found[0])) if found else default
