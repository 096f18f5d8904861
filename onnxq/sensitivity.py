"""What each quantizer alone costs at the model's outputs: the fidelity fallback's ranking.

Quantization noise from different tensors adds up nearly independently at the outputs (on
yolov8n the sum of the one-at-a-time noise powers predicts the all-quantized score SQNR within
1 dB), so the layers worth keeping float are those whose own quantizers cost the outputs most.
A layer's fall from its input's SQNR to its output's says how much it adds locally, not what
that costs downstream: yolov8n's second Conv adds little locally and costs its scores most.

Each layer's quantizers (weights, input, output) are switched on alone in the float model
(calibration's tunable graph, one session) with the parameters the QDQ model holds, on a few
samples, and the noise power is read on the output (or output part) the fidelity check found
lowest.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from onnxq import selections
from onnxq.branching import compare_variants
from onnxq.calib.data import Batch
from onnxq.calib.runner import fixed_batch
from onnxq.calib.simulate import Arrays, fake_quant_feed, tunable_model
from onnxq.fidelity import LAYER_SAMPLES, first_samples
from onnxq.io import run, session
from onnxq.quant.plan import QuantPlan

Layer = tuple[str, str, str]  # (node, input tensor, output tensor), named as in the float graph


def layer_costs(
    float_model: onnx.ModelProto,
    quantized: onnx.ModelProto,
    plan: QuantPlan,
    layers: list[Layer],
    samples: list[Batch],
    output: str,
) -> list[tuple[str, float]]:
    """(layer, noise power at `output` relative to its signal) for each quantized layer, costliest
    first: the layer's weights and the quantizers of its input and output, switched on together
    and alone in the float model (one run per layer and sample, from the layer's first quantizer
    on: onnxq.branching)."""
    float_model, names = selections.judged_model(float_model)
    tunable, float_feed, _ = tunable_model(float_model, plan)
    batches = list(first_samples(samples, LAYER_SAMPLES, whole=fixed_batch(float_model) is not None))
    feeds = quantized_feeds(quantized, plan)
    weights = {
        n.name: n.input[1] for n in float_model.graph.node if n.name in plan.layers and len(n.input) > 1
    }
    variants = {}
    for node, source, target in layers:
        feed = variants.setdefault(node, {})
        for item in (weights.get(node), _root(plan, source), _root(plan, target)):
            feed.update(feeds.get(item, {}))
    compared = compare_variants(tunable, float_feed, variants, batches, names, float_model=float_model)
    costs = []
    for node in variants:
        results = {result.name: result.sqnr_db for result in compared[node]}
        sqnr = results.get(output, min(results.values(), default=float("inf")))
        costs.append((node, float(10 ** (-sqnr / 10))))
    return sorted(costs, key=lambda item: -item[1])


def quantized_feeds(
    quantized: onnx.ModelProto, plan: QuantPlan, *, weights: bool = True
) -> dict[str, Arrays]:
    """Each quantizer's feed of the tunable graph as the QDQ model holds it: an activation's
    scale, zero point and integer bounds; a layer's dequantized weights (and its bias), unless
    `weights` is False (a model whose weights another feed already holds: a copy of them all)."""
    quantizers = {n.output[0]: n for n in quantized.graph.node if n.op_type == "QuantizeLinear"}
    read = {name for node in quantizers.values() for name in _parameter_names(node)}
    constants = {t.name: onnx.numpy_helper.to_array(t) for t in quantized.graph.initializer if t.name in read}
    feeds: dict[str, Arrays] = {}
    for name, spec in plan.activations.items():
        node = quantizers.get(f"{name}_quantized")
        if spec.shares is None and node is not None:
            feeds[name] = fake_quant_feed(name, *_activation_params(node, constants))
    if not weights:
        return feeds
    dequantized = _dequantized_constants(quantized, [*plan.weights, *plan.biases])
    biases = {spec.weight: spec.name for spec in plan.biases.values()}
    for name in plan.weights:
        feed = {n: dequantized[n] for n in (name, biases.get(name)) if n in dequantized}
        if name in feed:
            feeds[name] = feed
    return feeds


def _parameter_names(node: onnx.NodeProto) -> list[str]:
    """The constants _activation_params reads for a QuantizeLinear: its scale and zero point, and
    the bounds of a Clip before it."""
    names = list(node.input[1:3])
    if node.input[0].endswith("_clipped"):
        tensor = node.input[0][: -len("_clipped")]
        names += [f"{tensor}_clip_min", f"{tensor}_clip_max"]
    return names


def _activation_params(node: onnx.NodeProto, constants: Arrays) -> tuple[float, float, float, float]:
    """(scale, zero point, qmin, qmax) of a QuantizeLinear; a Clip before it narrows the bounds."""
    scale_name, zero_name, *bounds = _parameter_names(node)
    scale, zero = constants[scale_name], constants[zero_name]
    info = np.iinfo(zero.dtype)
    qmin, qmax = float(info.min), float(info.max)
    low, high = (constants.get(name) for name in bounds) if bounds else (None, None)
    if low is not None and high is not None:
        qmin = float(np.rint(low / scale)) + float(zero)
        qmax = float(np.rint(high / scale)) + float(zero)
    return float(scale), float(zero), qmin, qmax


def _dequantized_constants(quantized: onnx.ModelProto, names: list[str]) -> Arrays:
    """The float values of stored weights and biases, as onnxruntime dequantizes them."""
    wanted = {f"{name}_dequantized": name for name in names}
    nodes = [n for n in quantized.graph.node if n.op_type == "DequantizeLinear" and n.output[0] in wanted]
    if not nodes:
        return {}
    needed = {i for n in nodes for i in n.input if i}
    graph = helper.make_graph(
        nodes,
        "dequantize",
        [],
        [helper.make_tensor_value_info(n.output[0], onnx.TensorProto.FLOAT, None) for n in nodes],
        [t for t in quantized.graph.initializer if t.name in needed],
    )
    model = helper.make_model(graph, opset_imports=quantized.opset_import)
    model.ir_version = quantized.ir_version
    values = run(session(model, optimize=False), {})
    return {wanted[n.output[0]]: v.astype(np.float32) for n, v in zip(nodes, values, strict=True)}


def _root(plan: QuantPlan, tensor: str) -> str:
    return plan.root(tensor) if tensor in plan.activations else tensor
