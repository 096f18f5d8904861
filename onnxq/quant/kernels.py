"""Facts about the integer kernels onnxruntime runs on this machine.

On x86 CPUs without VNNI, onnxruntime's u8×s8 GEMM kernels multiply pairs of bytes and add the
two products in int16 (vpmaddubsw), which saturates when weights use the full int8 range:
255·127·2 > 32767. The QDQ graph then computes something else than its float simulation
(onnxruntime issues #5849, #6545, #12072, #14642). Not every layer runs on those kernels: a
depthwise convolution has a kernel of its own, which widens to int16 before multiplying, and a
ConvTranspose is computed in float from its dequantized weights. Rather than guess from CPU
flags or onnxruntime's version, run a one-layer probe of each kind through the same session
options and see whether it keeps the exact sum.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxq.config import WeightRange
from onnxq.io import session

_CHANNELS = 64
GEMM = "gemm"  # Conv, Gemm, MatMul: onnxruntime's int8 GEMM kernels
DEPTHWISE = "depthwise"  # a Conv with one input and one output channel per group
TRANSPOSE = "transpose"  # ConvTranspose
_OTHER_KERNELS = (DEPTHWISE, TRANSPOSE)
_NAMES = {DEPTHWISE: "depthwise convolutions", TRANSPOSE: "ConvTranspose"}


@dataclass(frozen=True)
class WeightRangeChoice:
    """The integer range of 8-bit weights per kind of layer, and why (written to the metadata).

    Where the GEMM kernels saturate, their layers' weights take 7 bits; the kinds in `exact` keep
    [-127, 127]. On MobileNetV2 (no VNNI) that is 84.0 % top-1 at W8A8 against 81.2 with every
    weight at 7 bits (float 85.0; BENCHMARKS.md).
    """

    bits: int  # weights on the GEMM kernels: 8 = [-127, 127]; 7 = [-63, 63]
    reason: str
    unsigned: bool = False  # stored as uint8 around zero point 128 (u8×u8 kernels)
    exact: frozenset[str] = frozenset()  # kinds of layers that keep [-127, 127] where `bits` is 7

    def reduces(self, kernel: str) -> bool:
        """Whether 8-bit weights of this kind of layer take the 7-bit range."""
        return self.bits == 7 and kernel not in self.exact


FULL_RANGE = WeightRangeChoice(8, "full int8 range [-127, 127]")
UNSIGNED_REASON = (
    "full 8-bit weights stored as uint8 around zero point 128 (onnxruntime's u8×u8 kernels, "
    "which never saturate)"
)


def choose_weight_range(requested: WeightRange) -> WeightRangeChoice:
    if requested is WeightRange.FULL:
        return WeightRangeChoice(8, "full int8 range [-127, 127], as requested")
    if requested is WeightRange.UNSIGNED:
        return WeightRangeChoice(8, UNSIGNED_REASON + ", as requested", unsigned=True)
    if requested is WeightRange.REDUCED:
        return _reduced("as requested")
    if int8_kernels_saturate():
        return _reduced(
            "onnxruntime's int8 GEMM kernels on this CPU (no VNNI) saturate with full-range int8 weights"
        )
    return WeightRangeChoice(
        8,
        "full int8 range [-127, 127]: onnxruntime's int8 kernels on this CPU do not saturate; "
        "pass --int8-range reduced for models deployed on x86 CPUs without VNNI",
    )


def _reduced(why: str) -> WeightRangeChoice:
    exact = full_range_kernels()
    reason = f"7-bit weight range [-63, 63]: {why}"
    if exact:
        kept = " and ".join(_NAMES[k] for k in _OTHER_KERNELS if k in exact)
        reason += f"; {kept} keep [-127, 127], their kernels do not saturate"
    return WeightRangeChoice(7, reason, exact=exact)


@functools.cache
def int8_kernels_saturate() -> bool:
    """True when a 1×1 QLinearConv with inputs 255 and weights 127 loses its exact sum."""
    return _loses_exact_sum(GEMM)


@functools.cache
def full_range_kernels() -> frozenset[str]:
    """The kinds of layers besides GEMM ones whose kernels keep full-range int8 weights exact."""
    return frozenset(kind for kind in _OTHER_KERNELS if not _loses_exact_sum(kind))


def _loses_exact_sum(kind: str) -> bool:
    """Inputs of 255 and weights of 127: does the first output keep 255·127·(weights it sums)?"""
    probe, x, terms = _probe(kind)
    got = float(session(probe, optimize=True, threads=1).run(None, {"x": x})[0].ravel()[0])
    return got < 0.9 * 255.0 * 127.0 * terms


def _probe(kind: str) -> tuple[onnx.ModelProto, np.ndarray, int]:
    """(model, input, products summed into the first output) of a one-layer probe of `kind`."""
    if kind == DEPTHWISE:
        kernel, shape = 3, (_CHANNELS, 1, 3, 3)
        layer = helper.make_node("Conv", ["xd", "wd"], ["y"], group=_CHANNELS)
        terms = kernel * kernel
    elif kind == TRANSPOSE:
        kernel, shape = 1, (_CHANNELS, 1, 1, 1)
        layer = helper.make_node("ConvTranspose", ["xd", "wd"], ["y"])
        terms = _CHANNELS
    else:
        kernel, shape = 1, (1, _CHANNELS, 1, 1)
        layer = helper.make_node("Conv", ["xd", "wd"], ["y"])
        terms = _CHANNELS
    axis = 1 if kind == TRANSPOSE else 0
    channels = shape[axis]
    x = np.full((1, _CHANNELS, kernel, kernel), 255.0, np.float32)
    return _qdq_model(layer, np.full(shape, 127, np.int8), axis, channels, terms, x.shape), x, terms


def _qdq_model(
    layer: onnx.NodeProto, weights: np.ndarray, axis: int, channels: int, terms: int, x_shape: tuple
) -> onnx.ModelProto:
    """`layer` between Q/DQ pairs, its per-channel weights at scale 1, its sum well inside the
    output's range."""
    out_scale = np.float32(255.0 * 127.0 * terms / 200.0)
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=axis),
        layer,
        helper.make_node("QuantizeLinear", ["y", "ys", "yz"], ["yq"]),
        helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["out"]),
    ]
    initializers = [
        numpy_helper.from_array(np.float32(1.0), "xs"),
        numpy_helper.from_array(np.uint8(0), "xz"),
        numpy_helper.from_array(weights, "w"),
        numpy_helper.from_array(np.ones(channels, np.float32), "ws"),
        numpy_helper.from_array(np.zeros(channels, np.int8), "wz"),
        numpy_helper.from_array(out_scale, "ys"),
        numpy_helper.from_array(np.uint8(0), "yz"),
    ]
    graph = helper.make_graph(
        nodes,
        "saturation_probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    return model
