"""GPTQ for 8-bit weights without the calibration sweep: each layer's input correlations H
measured on the float model, in the pass that observes the activation ranges.

Below 8 bits GPTQ measures a layer's inputs on the quantized model, layer after layer (the sweep
in onnxq.calib.search): the error earlier layers leave changes what a layer reads. At 8 bits a
quantized input differs from the float one by at most half a step of 255, so H on the float
inputs is H on the quantized ones up to that noise, and one pass serves every layer at once.
On MobileNetV2 at W8A8 (256 images) the sweep took 93-101 s, the streamed pass 35-42 s.

Every layer's H is held through the pass; past MAX_TOTAL_BYTES, the layers left over keep
nearest rounding, and the notes say which.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx
from onnx import numpy_helper

from onnxq.calib.rounding import (
    CorrelationSum,
    correlation_bytes,
    factor,
    gptq_round,
    refusal,
    too_few_rows,
)
from onnxq.passes.insert_qdq import planned_weight, weight_target
from onnxq.quant.kernels import WeightRangeChoice
from onnxq.quant.plan import QuantPlan
from onnxq.quant.weights import QuantizedWeight

MAX_TOTAL_BYTES = 512 << 20  # H of every layer at once (the zoo's detectors: about 230 MiB)


@dataclass
class _Layer:
    node: onnx.NodeProto
    initializer: onnx.TensorProto  # the weight, read again when rounded: a copy of every
    # weight held through the pass cost as much memory as the model (226 MB on a Keypoint R-CNN)
    correlation: CorrelationSum


@dataclass
class StreamedGptq:
    """The layers whose H the observation pass accumulates, and the weights it cannot serve."""

    layers: dict[str, _Layer] = field(default_factory=dict)  # weight → its layer
    nearest: dict[str, str] = field(default_factory=dict)  # weight → why it keeps nearest rounding

    @property
    def taps(self) -> dict[str, list[CorrelationSum]]:
        """Float tensor → the correlation sums that read it (collect_observers feeds them)."""
        taps: dict[str, list[CorrelationSum]] = {}
        for layer in self.layers.values():
            taps.setdefault(layer.node.input[0], []).append(layer.correlation)
        return taps


def prepare(model: onnx.ModelProto, weights: list[str]) -> StreamedGptq:
    """Correlation sums for the planned `weights` that GPTQ can round, in graph order."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input[1:2]:
            readers.setdefault(name, []).append(node)
    initializers = {i.name: i for i in model.graph.initializer}
    streamed, total = StreamedGptq(), 0
    for name in weights:
        nodes = readers.get(name, [])
        if len(nodes) != 1 or name not in initializers or nodes[0].input[0] in initializers:
            streamed.nearest[name] = "it is not the constant second input of exactly one layer"
            continue
        node, weight = nodes[0], numpy_helper.to_array(initializers[name])
        reason = refusal(node, weight)
        size = correlation_bytes(node, weight)
        if reason is None and total + size > MAX_TOTAL_BYTES:
            budget = MAX_TOTAL_BYTES >> 20
            reason = f"the input correlations of the layers before it take the {budget} MiB budget"
        if reason:
            streamed.nearest[name] = reason
            continue
        total += size
        streamed.layers[name] = _Layer(node, initializers[name], CorrelationSum(node, weight))
    return streamed


def round_weights(
    streamed: StreamedGptq, plan: QuantPlan, symmetric: bool | None, int8_range: WeightRangeChoice
) -> tuple[dict[str, QuantizedWeight], dict[str, str]]:
    """GPTQ's integers for every planned weight whose H was measured well enough (scales as
    the range rule sets them), and why the others keep nearest rounding. Each H is freed once
    used (the layers are taken out of `streamed`)."""
    rounded: dict[str, QuantizedWeight] = {}
    nearest = {name: why for name, why in streamed.nearest.items() if name in plan.weights}
    for name in list(streamed.layers):
        layer = streamed.layers.pop(name)
        spec = plan.weights.get(name)
        if spec is None:  # the layer was kept float after observation
            continue
        correlation = layer.correlation.result()
        reason = too_few_rows(correlation)
        if reason:
            nearest[name] = reason
            continue
        weight = numpy_helper.to_array(layer.initializer)
        quantized = planned_weight(weight, spec, weight_target(spec, symmetric, int8_range), None)
        rounded[name] = gptq_round(weight, quantized, factor(correlation.gram), layer.node, spec.layout)
    return rounded, nearest
