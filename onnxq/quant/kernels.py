"""Facts about the integer kernels onnxruntime runs on this machine.

On x86 CPUs without VNNI, onnxruntime's u8×s8 kernels multiply pairs of bytes and add the two
products in int16 (vpmaddubsw), which saturates when weights use the full int8 range:
255·127·2 > 32767. The QDQ graph then computes something else than its float simulation
(onnxruntime issues #5849, #6545, #12072, #14642). Rather than guess from CPU flags, run a
one-layer probe through the same kernels and see whether they saturate.
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


@dataclass(frozen=True)
class WeightRangeChoice:
    """The integer range of 8-bit weights, and why (written to the model's metadata).

    onnxruntime runs convolutions and matrix products on its int8 GEMM kernels, the ones that
    saturate without VNNI, except depthwise convolutions: their own kernel widens to int16 before
    multiplying, so they keep the full range where their probe says it is exact. On MobileNetV2
    that is 84.0 % top-1 against 81.2 with every weight at 7 bits (float 85.0; BENCHMARKS.md).
    """

    bits: int  # weights on the GEMM kernels: 8 = [-127, 127]; 7 = [-63, 63]
    reason: str
    unsigned: bool = False  # stored as uint8 around zero point 128 (u8×u8 kernels)
    depthwise_bits: int = 8  # weights of depthwise convolutions

    def reduces(self, depthwise: bool) -> bool:
        """Whether 8-bit weights of this kind of layer take the 7-bit range."""
        return (self.depthwise_bits if depthwise else self.bits) == 7


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
    if depthwise_kernels_saturate():
        return WeightRangeChoice(7, f"7-bit weight range [-63, 63]: {why}", depthwise_bits=7)
    return WeightRangeChoice(
        7,
        f"7-bit weight range [-63, 63]: {why}; depthwise convolutions keep [-127, 127], "
        "their kernel does not saturate",
    )


@functools.cache
def int8_kernels_saturate() -> bool:
    """True when a 1×1 QLinearConv with inputs 255 and weights 127 loses its exact sum."""
    return _loses_exact_sum(_probe_model(_CHANNELS, kernel=1, group=1))


@functools.cache
def depthwise_kernels_saturate() -> bool:
    """True when a 3×3 depthwise QLinearConv with inputs 255 and weights 127 loses its exact sum."""
    return _loses_exact_sum(_probe_model(_CHANNELS, kernel=3, group=_CHANNELS))


def _loses_exact_sum(probe: onnx.ModelProto) -> bool:
    weights = next(t for t in probe.graph.initializer if t.name == "w")
    _, per_group, height, width = weights.dims
    x = np.full((1, _CHANNELS, height, width), 255.0, np.float32)
    exact = 255.0 * 127.0 * per_group * height * width
    got = float(session(probe, optimize=True, threads=1).run(None, {"x": x})[0].ravel()[0])
    return got < 0.9 * exact


def _probe_model(channels: int, kernel: int, group: int) -> onnx.ModelProto:
    """Conv over `channels` inputs of 255 with weights of 127 (one output channel per group),
    its sum quantized well inside the output's range."""
    outputs = 1 if group == 1 else channels
    weights = np.full((outputs, channels // group, kernel, kernel), 127, np.int8)
    out_scale = np.float32(255.0 * 127.0 * (channels // group) * kernel * kernel / 200.0)
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=0),
        helper.make_node("Conv", ["xd", "wd"], ["y"], group=group),
        helper.make_node("QuantizeLinear", ["y", "ys", "yz"], ["yq"]),
        helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["out"]),
    ]
    initializers = [
        numpy_helper.from_array(np.float32(1.0), "xs"),
        numpy_helper.from_array(np.uint8(0), "xz"),
        numpy_helper.from_array(weights, "w"),
        numpy_helper.from_array(np.ones(outputs, np.float32), "ws"),
        numpy_helper.from_array(np.zeros(outputs, np.int8), "wz"),
        numpy_helper.from_array(out_scale, "ys"),
        numpy_helper.from_array(np.uint8(0), "yz"),
    ]
    graph = helper.make_graph(
        nodes,
        "saturation_probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, kernel, kernel])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    return model
