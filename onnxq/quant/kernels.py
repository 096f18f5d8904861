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
    """The weight integer range to use, and why (written to the model's metadata)."""

    bits: int  # 8 = [-127, 127]; 7 = [-63, 63]
    reason: str
    unsigned: bool = False  # stored as uint8 around zero point 128 (u8×u8 kernels)


def choose_weight_range(requested: WeightRange) -> WeightRangeChoice:
    if requested is WeightRange.FULL:
        return WeightRangeChoice(8, "full int8 range [-127, 127], as requested")
    if requested is WeightRange.REDUCED:
        return WeightRangeChoice(7, "7-bit weight range [-63, 63], as requested")
    if requested is WeightRange.UNSIGNED:
        return WeightRangeChoice(8, UNSIGNED_REASON + ", as requested", unsigned=True)
    if int8_kernels_saturate():
        return WeightRangeChoice(
            7,
            "7-bit weight range [-63, 63]: onnxruntime's int8 kernels on this CPU (no VNNI) "
            "saturate with full-range int8 weights",
        )
    return WeightRangeChoice(
        8,
        "full int8 range [-127, 127]: onnxruntime's int8 kernels on this CPU do not saturate; "
        "pass --int8-range reduced for models deployed on x86 CPUs without VNNI",
    )


UNSIGNED_REASON = (
    "full 8-bit weights stored as uint8 around zero point 128 (onnxruntime's u8×u8 kernels, "
    "which never saturate)"
)


@functools.cache
def int8_kernels_saturate() -> bool:
    """True when a 1×1 QLinearConv with inputs 255 and weights 127 loses its exact sum."""
    probe = _probe_model()
    x = np.full((1, _CHANNELS, 2, 2), 255.0, np.float32)
    exact = 255.0 * 127.0 * _CHANNELS
    got = float(session(probe, optimize=True, threads=1).run(None, {"x": x})[0].ravel()[0])
    return got < 0.9 * exact


def _probe_model() -> onnx.ModelProto:
    weights = np.full((1, _CHANNELS, 1, 1), 127, np.int8)
    out_scale = np.float32(255.0 * 127.0 * _CHANNELS / 200.0)
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=0),
        helper.make_node("Conv", ["xd", "wd"], ["y"]),
        helper.make_node("QuantizeLinear", ["y", "ys", "yz"], ["yq"]),
        helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["out"]),
    ]
    initializers = [
        numpy_helper.from_array(np.float32(1.0), "xs"),
        numpy_helper.from_array(np.uint8(0), "xz"),
        numpy_helper.from_array(weights, "w"),
        numpy_helper.from_array(np.ones(1, np.float32), "ws"),
        numpy_helper.from_array(np.zeros(1, np.int8), "wz"),
        numpy_helper.from_array(out_scale, "ys"),
        numpy_helper.from_array(np.uint8(0), "yz"),
    ]
    graph = helper.make_graph(
        nodes,
        "saturation_probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, _CHANNELS, 2, 2])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    return model
