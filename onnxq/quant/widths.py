"""Each activation's width and each weight's storage type, settled once a plan is drawn up.

An activation takes the most bits any layer reading it asks for (addends their own width), and
tensors that share a quantizer take their root's. Storage follows what onnxruntime's fusions
accept: INT2 weights of layers it may fuse into integer kernels go in INT4, block-wise 8-bit
ones in INT16; the values keep their width either way.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import TYPE_CHECKING

import onnx_ir as ir

from onnxq.config import QuantConfig
from onnxq.passes.split_addend_reads import is_layer_read

if TYPE_CHECKING:
    from onnxq.quant.plan import QuantPlan, WeightSpec


def _layer_weights(graph: ir.Graph, plan: QuantPlan) -> Iterator[tuple[ir.Node, WeightSpec]]:
    """Each planned layer with the spec of the weight it reads."""
    for node in graph:
        weight = node.inputs[1] if node.name in plan.layers and len(node.inputs) > 1 else None
        spec = plan.weights.get(weight.name) if weight is not None else None
        if spec is not None:
            yield node, spec


def widen_int2_containers(graph: ir.Graph, plan: QuantPlan) -> None:
    """2-bit weights of layers onnxruntime may fuse into an integer kernel go in INT4 types.

    onnxruntime fuses DequantizeLinear → Conv/Gemm/MatMul → QuantizeLinear (or a float graph
    output) into QLinearConv, QGemm or QLinearMatMul, which reject INT2 weights. An output
    quantized below 8 bits gets a Clip before its QuantizeLinear, which no fusion matches, so
    only those layers keep INT2 storage; the values are 2-bit either way.
    """
    for node, spec in _layer_weights(graph, plan):
        if spec.bits > 2:
            continue
        output = plan.activations.get(node.outputs[0].name)
        if output is None or output.bits >= 8:
            plan.weights[spec.name] = replace(spec, container_bits=4)


def widen_blockwise_int8_containers(graph: ir.Graph, plan: QuantPlan) -> None:
    """Block-wise 8-bit weights that onnxruntime would fuse into an integer kernel go in INT16.

    Its fusions fail at run time on block-wise scales: a bias-free Conv with a quantized output
    becomes QLinearConv ("filter scale shape invalid": Magika's first Conv; with a bias, which
    stays float beside block-wise scales, nothing is fused), a MatMul or Gemm with a quantized
    input MatMulIntegerToFloat ("Attempting to broadcast an axis by a dimension other than 1": a
    transformer's in-projection). INT16 is no type its integer kernels take, so the layer runs
    as written, DequantizeLinear in float: the values stay 8-bit. 4-bit and narrower weights
    are stored in INT4, which these fusions do not take.
    """
    for node, spec in _layer_weights(graph, plan):
        if spec.granularity.kind != "block" or spec.bits <= 4:
            continue
        biased = len(node.inputs) > 2 and node.inputs[2] is not None
        fused_conv = node.op_type == "Conv" and not biased and node.outputs[0].name in plan.activations
        if fused_conv or node.op_type in ("MatMul", "Gemm"):
            plan.weights[spec.name] = replace(spec, container_bits=16)


def assign_activation_bits(graph: ir.Graph, plan: QuantPlan, config: QuantConfig, alias) -> None:
    """Each activation gets the most bits any layer reading it asks for; sharers follow their root."""
    wanted: dict[str, int] = {}
    for node in graph:
        bits = plan.layers[node.name].activation_bits if node.name in plan.layers else None
        for value in node.inputs:
            if value is None:
                continue
            name = alias.get(value.name, value.name)
            if name in plan.activations:
                default = config.activation_bits if bits is None else bits
                wanted[name] = max(wanted.get(name, 0), default)
    for name in _addends(graph, plan, alias):
        if wanted.get(name, config.activation_bits) < config.addend_bits:
            wanted[name] = config.addend_bits
            plan.widened_addends.append(name)
    roots: dict[str, int] = {}
    for name in plan.activations:
        root = plan.root(name)
        roots[root] = max(roots.get(root, 0), wanted.get(name, config.activation_bits))
    for name, spec in list(plan.activations.items()):
        plan.activations[name] = replace(spec, bits=roots[plan.root(name)])


def share_unwidened_layer_reads(graph: ir.Graph, plan: QuantPlan, alias: dict[str, str]) -> None:
    """A layer read (onnxq.passes.split_addend_reads) of a tensor that kept the layers' width
    shares the tensor's quantizer: quantizing again at the same scale changes nothing, so the
    split costs no precision where the Adds could not take more bits (a MaxPool's output)."""
    for node in graph:
        if not is_layer_read(node.name):
            continue
        source, output = alias.get(node.inputs[0].name, node.inputs[0].name), node.outputs[0].name
        if source not in plan.activations or output not in plan.activations:
            continue
        root = plan.activations[plan.root(source)]
        if root.bits <= plan.activations[output].bits:
            plan.activations[output] = replace(plan.activations[output], shares=root.tensor, bits=root.bits)


def _addends(graph: ir.Graph, plan: QuantPlan, alias: dict[str, str]) -> list[str]:
    """Activations with their own scale that only Add nodes read: a residual branch before its
    sum, or a sum whose layers read it through their own quantizer (onnxq.passes.split_addend_reads).
    No layer reads them, so "A bits" (the inputs of weighted layers) does not bind them."""
    readers: dict[str, set[str]] = {}
    for node in graph:
        for value in node.inputs:
            # not the absorbed Relu a tensor stands for, nor the layers' own copy (they read that)
            skip = value is None or node.name in plan.absorbed or is_layer_read(node.name)
            if not skip and (name := alias.get(value.name, value.name)) in plan.activations:
                readers.setdefault(name, set()).add(node.op_type)
    return [
        name
        for name, spec in plan.activations.items()
        if spec.shares is None and readers.get(name) == {"Add"}
    ]
