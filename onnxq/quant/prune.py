"""Q/DQ pairs only where they pay: pruning a plan after it is drawn up.

A plan first marks every tensor an integer kernel could read. Some of those pairs buy nothing:
after the last quantized layer, or between two float ops, they only cost precision and time;
some cost more than they buy: where no layer reads a tensor and its rounding reaches a model
output through float ops alone, the output loses precision for an integer Concat; and
where onnxruntime would wrap a layer in Q/DQ pairs around an op with no integer kernel, keeping
the layer float can run faster (`keep_float_neighbours`, tried when the model is slower).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import onnx_ir as ir

from onnxq.passes.graph_utils import computed_values

if TYPE_CHECKING:
    from onnxq.quant.plan import QuantPlan

SHAPE_OPS = frozenset({"Shape", "Size"})


def keep_float_neighbours(graph: ir.Graph, plan: QuantPlan) -> None:
    planned = set(plan.quantized_nodes)
    for node in graph:
        if node.name not in plan.layers:
            continue
        readers = _readers(node.outputs[0], plan)
        float_ops = sorted(
            {r.op_type for r in readers if r.name not in planned and r.op_type not in SHAPE_OPS}
        )
        if float_ops:
            _keep_float(
                graph, plan, node, f"feeds {'/'.join(float_ops)} (no integer kernel): float is faster"
            )


def keep_float_convs_without_output_pair(graph: ir.Graph, plan: QuantPlan) -> None:
    """8-bit Convs whose output keeps no Q/DQ pair stay float, weights and all.

    onnxruntime fuses a Conv into QLinearConv only with a QuantizeLinear after it; without one
    (a detector head's last convs, once their outputs' pairs are dropped) it runs a float Conv
    on dequantized weights: the weights' rounding costs the outputs precision and their
    DequantizeLinear costs time on every run, for a smaller file only (on held-out samples
    yolov8n and YOLOX keep their fidelity and speed; the gain is a deployed graph without them).
    Gemm and MatMul keep their weights: their integer kernels take a float output. Below 8 bits
    nothing runs on integers, and the width is what the user asked for. A model with no other
    layer (a single conv) keeps its weights: there they are all the quantization does."""
    simulated = [
        node
        for node in graph
        if node.name in plan.layers
        and node.op_type == "Conv"
        and not _output_planned(node, plan)
        and plan.layers[node.name].weight_bits == 8
        and plan.layers[node.name].activation_bits == 8
    ]
    if len(simulated) == len(plan.layers):
        return
    reason = "its output stays float, so onnxruntime would run a float Conv on dequantized weights"
    for node in simulated:
        _keep_float(graph, plan, node, reason)
    planned = set(plan.quantized_nodes)
    for node in simulated:
        _drop_input_pair_nobody_needs(node.inputs[0], plan, planned)


def _drop_input_pair_nobody_needs(value: ir.Value, plan: QuantPlan, planned: set[str]) -> None:
    """A floated conv's input pair stays where a quantized node produces it (its integer kernel
    writes int8; floating the producer too would cascade up the head and cost its integer
    kernels) or another quantized node reads it; otherwise it only rounds a float tensor."""
    value = _before_absorbed(value, plan)
    producer = value.producer()
    if value.name not in plan.activations:
        return
    if producer is not None and producer.name in planned:
        return
    if not _read_by(value, plan, planned):
        _drop_activation(plan, value.name)


def _before_absorbed(value: ir.Value, plan: QuantPlan) -> ir.Value:
    """The layer's own output where `value` comes from a Relu/Clip folded into its layer."""
    producer = value.producer()
    return producer.inputs[0] if producer is not None and producer.name in plan.absorbed else value


def _keep_float(graph: ir.Graph, plan: QuantPlan, node: ir.Node, reason: str) -> None:
    """Take a layer out of the plan, weights (unless another layer shares them) and bias too."""
    weight = node.inputs[1].name
    del plan.layers[node.name]
    if not any(n.name in plan.layers and n.inputs[1].name == weight for n in graph):
        plan.weights.pop(weight, None)
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        plan.biases.pop(node.inputs[2].name, None)
    plan.quantized_nodes.remove(node.name)
    plan.float_nodes[node.name] = reason


def _readers(value: ir.Value, plan: QuantPlan) -> list[ir.Node]:
    """The nodes reading a tensor, looking through absorbed Relu/Clip."""
    found = []
    for user, _ in value.uses():
        found += _readers(user.outputs[0], plan) if user.name in plan.absorbed else [user]
    return found


def drop_quantizers_that_do_not_pay(graph: ir.Graph, plan: QuantPlan) -> None:
    """Remove Q/DQ pairs that only cost precision, and say which nodes stay float because of it.

    - After the last quantized layer (a detector's decode, a probability map's Sigmoid, box and
      score tensors concatenated across very different ranges) no integer kernel follows: one
      8-bit scale would be shared by values that need their own (scores in [0, 1] beside box
      coordinates in pixels), and the outputs users read lose most. The whole tail stays float.
    - Where no layer reads the tensor (or a shape-only copy of it) and its rounding would reach
      an output through float ops alone (YOLOv8's class logits, concatenated with the box logits
      that a small DFL Conv reads after a Softmax, then split and put through a Sigmoid): the
      integer Concat it buys does not pay for what the outputs lose (yolov8n's scores: the class
      logits' pair alone cost them down to 15 dB SQNR). A tensor a layer reads keeps its pair.
    - Between two float ops (inside a HardSwish written as x·clip(x+3, 0, 6)/6, around an Add
      with a constant): neither side runs on integers, so the pair is pure loss and time.
    - Where only integer elementwise ops read the tensor and no layer reads what they write (a
      transformer's residual stream: each Add's sum goes to a float LayerNormalization and the
      next Add): the integer Adds save almost nothing, while the stream is rounded again at every
      block and the normalization scales the error up (a ViT's class token: 21 → 9 dB at the
      output). A Conv's output keeps its pair, and so does a Gemm's with a float bias:
      onnxruntime runs their integer kernels only with one; a MatMul writes float from its
      integer kernel (MatMulIntegerToFloat) without one.
    """
    feeds_layer = _nodes_feeding_a_layer(graph, plan)
    feeds_output = _nodes_passing_rounding_to_an_output(graph, plan)
    planned = set(plan.quantized_nodes)
    values = computed_values(graph)
    while True:
        serving = _values_serving_a_layer(graph, plan, planned)
        dropped = [
            name
            for name, spec in plan.activations.items()
            if not _pays(values[spec.tensor], plan, planned, feeds_layer)
            or (_reaches(values[spec.tensor], feeds_output) and not _layer_reads(name, plan, values))
            or not (spec.tensor in serving or _producer_needs_pair(values[spec.tensor], plan))
        ]
        if not dropped:
            break
        for name in dropped:
            _drop_activation(plan, name)
        for bias in [b for b in plan.biases.values() if b.activation not in plan.activations]:
            del plan.biases[bias.name]  # int32 bias needs the input's scale: it stays float
        for node in graph:
            if node.name in planned and node.name not in plan.layers and not _output_planned(node, plan):
                planned.discard(node.name)
                plan.quantized_nodes.remove(node.name)
                plan.float_nodes[node.name] = "after the last quantized layer, or between float ops"


def _pays(value: ir.Value, plan: QuantPlan, planned: set[str], feeds_layer: set[str]) -> bool:
    """A layer follows, and a quantized node produces or reads the tensor."""
    integer_side = _produced_by(value, planned) or _read_by(value, plan, planned)
    return _reaches(value, feeds_layer) and integer_side


def _layer_reads(name: str, plan: QuantPlan, values: dict[str, ir.Value]) -> bool:
    """Whether a quantized layer reads the activation itself or a shape-only op's copy of it
    (dropping the pair would cost that layer its integer kernel)."""
    if any(reader.name in plan.layers for reader in _readers(values[name], plan)):
        return True
    return any(
        _layer_reads(other, plan, values) for other, spec in plan.activations.items() if spec.shares == name
    )


def _values_serving_a_layer(graph: ir.Graph, plan: QuantPlan, planned: set[str]) -> set[str]:
    """Names of the tensors a quantized layer reads, or a quantized node reads whose planned
    output is such a tensor in turn (an Add's sum that a Conv reads, through MaxPool or Concat):
    the tensors whose integer form some layer's integer kernel consumes."""
    serving: set[str] = set()

    def serves(value: ir.Value) -> bool:
        return any(
            reader.name in plan.layers
            or (reader.name in planned and any(out.name in serving for out in reader.outputs))
            for reader in _readers(value, plan)
        )

    # every reader comes after its tensor's producer: walked backwards, it is decided first
    for value in [*(v for node in reversed(list(graph)) for v in node.outputs), *graph.inputs]:
        if serves(value):
            serving.add(value.name)
    return serving


def _producer_needs_pair(value: ir.Value, plan: QuantPlan) -> bool:
    """Whether the tensor's producer runs on integers only with a QuantizeLinear after it: a
    Conv (QLinearConv), or a Gemm whose bias stays float (QGemm writes float only with an int32
    bias or none; otherwise onnxruntime runs a float Gemm on dequantized weights)."""
    producer = _before_absorbed(value, plan).producer()
    if producer is None or producer.name not in plan.layers:
        return False
    if producer.op_type == "Gemm":
        bias = producer.inputs[2] if len(producer.inputs) > 2 else None
        return bias is not None and bias.name not in plan.biases
    return producer.op_type in ("Conv", "ConvTranspose")


def _nodes_feeding_a_layer(graph: ir.Graph, plan: QuantPlan) -> set[str]:
    """Names of the nodes from whose outputs some quantized layer can be reached."""
    feeding: set[str] = set()
    for node in reversed(list(graph)):
        users = (user for value in node.outputs for user, _ in value.uses())
        if node.name in plan.layers or any(user.name in feeding for user in users):
            feeding.add(node.name)
    return feeding


def _nodes_passing_rounding_to_an_output(graph: ir.Graph, plan: QuantPlan) -> set[str]:
    """Names of the nodes through which an input's rounding reaches a graph output with no
    quantized layer on the way (shape ops pass nothing on: their outputs are sizes)."""
    outputs = {v.name for v in graph.outputs}
    passing: set[str] = set()
    for node in reversed(list(graph)):
        if node.name in plan.layers or node.op_type in SHAPE_OPS:
            continue
        users = (user for value in node.outputs for user, _ in value.uses())
        if any(v.name in outputs for v in node.outputs) or any(user.name in passing for user in users):
            passing.add(node.name)
    return passing


def _reaches(value: ir.Value, nodes: set[str]) -> bool:
    return any(user.name in nodes for user, _ in value.uses())


def _produced_by(value: ir.Value, planned: set[str]) -> bool:
    producer = value.producer()
    return producer is None or producer.name in planned  # a graph input counts: QuantizeLinear starts


def _read_by(value: ir.Value, plan: QuantPlan, planned: set[str]) -> bool:
    """Whether a quantized node reads the tensor (through an absorbed Relu/Clip)."""
    return any(reader.name in planned for reader in _readers(value, plan))


def _output_planned(node: ir.Node, plan: QuantPlan) -> bool:
    return any(v.name in plan.activations for v in node.outputs)


def _drop_activation(plan: QuantPlan, name: str) -> None:
    """Forget an activation, its sharers, and the Relu/Clip absorbed into it (which stays)."""
    spec = plan.activations.pop(name, None)
    if spec is None:
        return
    for node_name, source in list(plan.absorbed.items()):
        if source == spec.tensor:
            del plan.absorbed[node_name]
    for other in [n for n, s in plan.activations.items() if s.shares == name]:
        _drop_activation(plan, other)
