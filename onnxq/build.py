"""Build the QDQ model for a plan: activation parameters from the chosen ranges (or refinement's
learned steps), weight integers from the search, GPTQ or refinement, Q/DQ inserted
(onnxq.passes.insert_qdq), and the settings written into the model's metadata."""

from __future__ import annotations

import json
from dataclasses import asdict

import onnx

import onnxq
from onnxq import tune
from onnxq.config import QuantConfig
from onnxq.io import oldest_ir_version, to_proto
from onnxq.passes.infer_types import typed_ir
from onnxq.passes.insert_qdq import activation_params, insert_qdq
from onnxq.quant.plan import QuantPlan


def build_candidate(
    float_model, config: QuantConfig, ranges, search, choice, refined, rounded, plan: QuantPlan
) -> tune.Candidate:
    """The QDQ model for `plan`, with its layers' (node, input, output) tensors; `rounded`:
    weight integers GPTQ chose in the observation pass."""
    graph_model = typed_ir(float_model)
    layers = _layer_tensors(graph_model.graph, plan)
    params = activation_params(plan, ranges, symmetric=config.activation_symmetric)
    if refined is not None:
        params.update({root: p for root, p in refined.activations.items() if root in params})
    integers = {
        **(search.rounded if search else {}),
        **rounded,
        **(refined.weights if refined is not None else {}),
    }
    insert_qdq(
        graph_model.graph,
        plan,
        params,
        symmetric_weights=config.symmetric_weights,
        int8_range=choice,
        weight_ratios=search.weight_ratios if search else None,
        biases={**(search.biases if search else {}), **(refined.biases if refined is not None else {})},
        refined_weights=integers,
        integer_activations=config.lowest_bits >= 8,
    )
    quantized = to_proto(graph_model)
    quantized.ir_version = oldest_ir_version(quantized)
    _write_metadata(quantized, config, choice.reason)
    return tune.Candidate(quantized, plan, layers)


def _layer_tensors(graph, plan: QuantPlan) -> list[tuple[str, str, str]]:
    """(node, input, output) of every quantized compute layer, named as in the float graph; an
    input behind an absorbed Relu/Clip (removed from the QDQ graph) is read before it."""
    before_absorbed = {n.outputs[0].name: n.inputs[0].name for n in graph if n.name in plan.absorbed}
    return [
        (node.name, before_absorbed.get(node.inputs[0].name, node.inputs[0].name), node.outputs[0].name)
        for node in graph
        if node.name in plan.layers and node.inputs and node.inputs[0] is not None
    ]


def _write_metadata(model: onnx.ModelProto, config: QuantConfig, weight_reason: str) -> None:
    settings = {k: (v.value if hasattr(v, "value") else v) for k, v in asdict(config).items()}
    settings["op_types"] = sorted(config.op_types)
    entries = {
        "onnxq.version": onnxq.__version__,
        "onnxq.config": json.dumps(settings, sort_keys=True),
        "onnxq.weight_range": weight_reason,
    }
    kept = [p for p in model.metadata_props if p.key not in entries]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in entries.items():
        model.metadata_props.add(key=key, value=value)
