"""A model raised to a newer opset by onnx's version converter, with what the converter loses put
back, and checked on a sample to compute what the original computes.

The converter rewrites Resize-10 and Upsample-7/9 as a Resize of the target opset without their
coordinate rule: those ops map output to input coordinates asymmetrically (x_in = x_out / scale)
and, at nearest, take the floor when enlarging and the ceiling when shrinking, where a Resize
since opset 11 defaults to half-pixel coordinates and round-half-down. An FCN exported at opset
10 came out of the converter 13.8 dB from its own float outputs, and every check after it compared
against the converted model. The attributes are set here, and the converted model's outputs are
compared with the original's before anything else runs on it.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper, version_converter

from onnxq.errors import OnnxqError, first_line
from onnxq.io import oldest_ir_version, session
from onnxq.passes.graph_utils import opset_version
from onnxq.passes.simplify import TOLERANCE, relative_difference

ASYMMETRIC_UNTIL = 10  # the last opset whose resizing ops map coordinates asymmetrically


def upgrade_opset(
    model: onnx.ModelProto,
    target: int,
    sample: dict[str, np.ndarray] | None = None,
    expected: list[np.ndarray] | None = None,
) -> onnx.ModelProto:
    """The model at opset `target`; with `sample`, checked to compute what the original computes
    on it (`expected`: the original's outputs on it, where the caller has them)."""
    version = opset_version(model)
    try:
        converted = version_converter.convert_version(_without_image_scalers(model), target)
    except Exception as err:  # the converter raises plain RuntimeError and C++ errors
        raise OnnxqError(
            f"cannot upgrade the model from opset {version} to {target}: {first_line(err)}"
        ) from None
    if version <= ASYMMETRIC_UNTIL:
        _keep_asymmetric_resizing(converted.graph)
    converted.ir_version = oldest_ir_version(converted)
    if sample is not None:
        _check_upgrade(model, converted, sample, expected, version, target)
    return converted


def _without_image_scalers(model: onnx.ModelProto) -> onnx.ModelProto:
    """ImageScaler (y = scale·x + bias per channel), experimental until opset 9, written as a Mul
    and an Add: the version converter has no schema for it (Tiny YOLOv2 as onnxmltools exported it
    from CoreML starts with one), while onnxruntime runs the original for the check. Constants are
    nodes, not initializers, which IR version 3 would also have to list as graph inputs."""
    if not any(node.op_type == "ImageScaler" for node in model.graph.node):
        return model
    result = onnx.ModelProto()
    result.CopyFrom(model)
    nodes = []
    for node in result.graph.node:
        nodes += _scale_and_shift(node) if node.op_type == "ImageScaler" else [node]
    del result.graph.node[:]
    result.graph.node.extend(nodes)
    return result


def _scale_and_shift(node: onnx.NodeProto) -> list[onnx.NodeProto]:
    """Mul and Add with numpy broadcasting (opset 7 on; onnxruntime runs nothing older)."""
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    scale = np.array([attributes.get("scale", 1.0)], np.float32)
    bias = np.asarray(attributes.get("bias", [0.0]), np.float32).reshape(1, -1, 1, 1)
    base = node.name or node.output[0]
    scale_name, bias_name, scaled = f"{base}/onnxq_scale", f"{base}/onnxq_bias", f"{base}/onnxq_scaled"
    return [
        helper.make_node("Constant", [], [scale_name], value=numpy_helper.from_array(scale)),
        helper.make_node("Constant", [], [bias_name], value=numpy_helper.from_array(bias)),
        helper.make_node("Mul", [node.input[0], scale_name], [scaled], f"{base}/Mul"),
        helper.make_node("Add", [scaled, bias_name], list(node.output), f"{base}/Add"),
    ]


def _keep_asymmetric_resizing(graph: onnx.GraphProto) -> None:
    """Every Resize the converter wrote from a Resize-10 or Upsample keeps their coordinates."""
    for node in graph.node:
        if node.op_type != "Resize":
            continue
        mode = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "mode"), b"nearest")
        kept = [a for a in node.attribute if a.name not in ("coordinate_transformation_mode", "nearest_mode")]
        del node.attribute[:]
        node.attribute.extend(kept)
        node.attribute.append(helper.make_attribute("coordinate_transformation_mode", "asymmetric"))
        if mode == b"nearest":
            node.attribute.append(helper.make_attribute("nearest_mode", _nearest_rounding(node, graph)))


def _nearest_rounding(node: onnx.NodeProto, graph: onnx.GraphProto) -> str:
    """Resize-10's nearest rounding: ceiling where every axis shrinks or stays, floor where every
    axis grows or stays, and floor where the scales are computed at run time (exports enlarge
    feature maps; the check after the upgrade catches a model that shrinks them)."""
    scales = _constant(graph, node.input[2]) if len(node.input) > 2 else None
    if scales is None or scales.size == 0:
        return "floor"
    if np.all(scales <= 1) and np.any(scales < 1):
        return "ceil"
    if np.all(scales >= 1):
        return "floor"
    raise OnnxqError(
        f"cannot upgrade Resize {node.name or node.output[0]!r}: it shrinks some axes and enlarges "
        "others with nearest rounding, which no Resize since opset 11 computes alike; export the "
        "model at opset 13 or later"
    )


def _constant(graph: onnx.GraphProto, name: str) -> np.ndarray | None:
    """The initializer or Constant output of that name, or None (only it is decoded)."""
    for init in graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in graph.node:
        if (
            node.op_type == "Constant"
            and node.output[0] == name
            and node.attribute[:1]
            and node.attribute[0].name == "value"
        ):
            return numpy_helper.to_array(node.attribute[0].t)
    return None


def reference_outputs(model: onnx.ModelProto, sample: dict[str, np.ndarray]) -> list[np.ndarray] | None:
    """The model's outputs on `sample` without onnxruntime's rewrites, or None where it fails."""
    try:
        return session(model, optimize=False).run(None, sample)
    except Exception:  # onnxruntime's Fail on shapes the sample does not fit
        return None


def _check_upgrade(original, converted, sample, expected, version: int, target: int) -> None:
    """Stop with the reason where the upgraded model's outputs differ from the original's, or
    where it fails on a sample the original runs on. Where the original fails too, nothing is
    said here: the stage that needs the sample reports the model's own failure."""
    expected = reference_outputs(original, sample) if expected is None else expected
    if expected is None:
        return
    try:
        actual = session(converted, optimize=False).run(None, sample)
    except Exception as err:
        upgraded = f"the model upgraded from opset {version} to {target}"
        raise OnnxqError(f"{upgraded} fails where the original runs: {first_line(err)}") from None
    difference = relative_difference(expected, actual)
    if difference > TOLERANCE:
        raise OnnxqError(
            f"upgrading the model from opset {version} to {target} (onnx's version converter) changed "
            f"its outputs by {difference:.2e} (relative): export the model at opset {target} or later"
        )
