"""The planned float graph executed in torch, node by node, with the plan's fake quantizers.

The mirror is what gradients flow through: activation quantizers sit where insert_qdq puts its
QuantizeLinear/DequantizeLinear pairs, weights are RoundingWeights (nearest rounding until
learned), and quantized biases are stored at s_in·s_w as insert_qdq stores them, so its hard
output is the QDQ model's output. Absorbed Relu/Clip nodes stay in the mirror: the quantizer
after them has zero point 0 and clamps at 0 exactly as the QDQ graph's does without them.

A node whose op is missing from ops.OPS (or which the op refuses) runs in onnxruntime on its
own, without a gradient; a unit holding one that the data's values reach is not refined (see
unit_learning.py), one that reads only shapes and constants stops nothing (stops_gradient).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from onnxq.calib.runner import fixed_batch
from onnxq.calib.simulate import node_reads
from onnxq.errors import OnnxqError
from onnxq.io import oldest_ir_version, session
from onnxq.passes.infer_types import element_types
from onnxq.quant.plan import QuantPlan
from onnxq.quant.weights import QuantizedWeight
from onnxq.refine.ops import OPS
from onnxq.refine.quantizers import ActivationQuantizer, RoundingWeight, round_ste

Env = dict[str, torch.Tensor]
Observe = Callable[[str, torch.Tensor], None] | None  # sees each output as the mirror makes it
ActivationParams = dict[str, tuple]  # root tensor → (scale, zero point, IntRange), as insert_qdq


@dataclass
class MirrorNode:
    name: str
    op_type: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict
    proto: onnx.NodeProto
    in_torch: bool  # False: onnxruntime runs it, without a gradient
    outer: list[str] = field(default_factory=list)  # what its subgraphs (If, Loop) read around it


class Mirror(nn.Module):
    """Run any node range of the model, in float or quantized, on a dict of named tensors."""

    def __init__(
        self,
        model: onnx.ModelProto,
        plan: QuantPlan | None = None,
        activations: ActivationParams | None = None,
        weights: dict[str, QuantizedWeight] | None = None,
        biases: dict[str, np.ndarray] | None = None,
        affine_layers: Iterable[str] = (),
        seeded: Iterable[str] = (),
    ) -> None:
        """`affine_layers`: layer nodes whose weight also learns QPRep's per-channel affine;
        `seeded`: weights whose rounding starts from their given integers (GPTQ's), not nearest."""
        super().__init__()
        self.fixed_batch = fixed_batch(model)  # N where the input fixes its batch: runs of N samples
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
        self.constants: Env = {t.name: _tensor(numpy_helper.to_array(t)) for t in model.graph.initializer}
        self.nodes: list[MirrorNode] = []
        for node in model.graph.node:
            if node.op_type == "Constant":
                self.constants[node.output[0]] = _tensor(_constant_value(node))
                continue
            attrs = {a.name: _attribute_value(a) for a in node.attribute}
            name = node.name or f"{node.op_type}_{node.output[0]}"
            in_torch = node.op_type in OPS and node.domain in ("", "ai.onnx")
            outer = [n for n in node_reads(node) if n and n not in node.input]
            self.nodes.append(
                MirrorNode(
                    name, node.op_type, list(node.input), list(node.output), attrs, node, in_torch, outer
                )
            )
        self.graph_inputs = [i.name for i in model.graph.input if i.name not in self.constants]
        self.graph_outputs = [o.name for o in model.graph.output]
        self._model = model  # typed lazily, only if a node falls back to onnxruntime
        self._types: dict[str, int] | None = None
        self.last_use = _last_uses(self.nodes, self.graph_outputs)
        self._sessions: dict[str, object] = {}
        self._quantizers(plan, activations or {}, weights or {}, biases or {}, set(seeded))
        self._enable_affine(set(affine_layers), weights or {})
        learned = {*self.weight_index, *self.corrected_biases}
        self._valued = _valued_tensors(self.nodes, self.graph_inputs, learned)

    def stops_gradient(self, node: MirrorNode) -> bool:
        """Whether onnxruntime runs `node` on values a gradient must flow through: the data, a
        learned weight, or what they make. A node that reads only shapes and constants (DETR's
        sine position embedding, computed from the image's mask) stops none."""
        return not node.in_torch and any(name in self._valued for name in [*node.inputs, *node.outer])

    # ------------------------------------------------------------------------ set-up

    def _quantizers(self, plan, activations, weights, biases, seeded: set[str]) -> None:
        self.activation = nn.ModuleList()
        self.root_index: dict[str, int] = {}
        for root, (scale, zero, target) in activations.items():
            self.root_index[root] = len(self.activation)
            self.activation.append(ActivationQuantizer(scale, int(zero), target.qmin, target.qmax))
        self.quant_points: dict[str, int] = {}  # tensor → quantizer applied right after it
        if plan is not None:
            absorbed_outputs = {n.outputs[0] for n in self.nodes if n.name in plan.absorbed}
            for spec in plan.activations.values():
                point = spec.observed if spec.observed in absorbed_outputs else spec.tensor
                root = plan.root(spec.tensor)
                if root in self.root_index:
                    self.quant_points[point] = self.root_index[root]
        self.rounding = nn.ModuleList()
        self.weight_index: dict[str, int] = {}
        self.weight_scales: dict[str, np.ndarray | None] = {}
        for name, quantized in weights.items():
            scale, zero = quantized.element_params()
            self.weight_index[name] = len(self.rounding)
            weight = self.constants[name].numpy()
            seed = quantized.integers if name in seeded else None
            target = quantized.target
            self.rounding.append(RoundingWeight(weight, scale, zero, target.qmin, target.qmax, seed))
            self.weight_scales[name] = quantized.per_output_channel_scale
        self.corrected_biases = {name: _tensor(value) for name, value in biases.items()}
        self.bias_specs: dict[str, tuple[int, str]] = {}  # bias → (activation quantizer, scale buffer)
        self.bias_weights: dict[str, str] = {}  # bias → its layer's weight
        if plan is not None:
            for spec in plan.biases.values():
                root = plan.root(spec.activation)
                if self.weight_scales.get(spec.weight) is not None and root in self.root_index:
                    scale = torch.from_numpy(np.asarray(self.weight_scales[spec.weight], np.float32))
                    buffer = f"bias_scale_{len(self.bias_specs)}"
                    self.register_buffer(buffer, scale, persistent=False)
                    self.bias_specs[spec.name] = (self.root_index[root], buffer)
                    self.bias_weights[spec.name] = spec.weight

    def _enable_affine(self, layers: set[str], weights: dict[str, QuantizedWeight]) -> None:
        """QPRep on the named layers whose weights have one scale per output channel."""
        self.affine_weights: list[str] = []
        for node in self.nodes:
            name = node.inputs[1] if node.name in layers and len(node.inputs) > 1 else None
            quantized = weights.get(name) if name else None
            if quantized is None or quantized.axis is None or quantized.block_size:
                continue
            if np.asarray(quantized.scale).size != quantized.integers.shape[quantized.axis]:
                continue
            self.rounding[self.weight_index[name]].enable_affine(quantized.axis)
            self.affine_weights.append(name)

    def to_device(self, device: torch.device) -> Mirror:
        """Parameters, buffers, constants and corrected biases on `device`."""
        self.to(device)
        self.constants = {k: v.to(device) for k, v in self.constants.items()}
        self.corrected_biases = {k: v.to(device) for k, v in self.corrected_biases.items()}
        return self

    # ------------------------------------------------------------------------ running

    def quantize_inputs(self, feeds: Env, quantized: bool) -> Env:
        """The graph inputs as the first nodes read them."""
        env = dict(feeds)
        if quantized:
            for name in self.graph_inputs:
                if name in env and name in self.quant_points:
                    env[name] = self.activation[self.quant_points[name]](env[name])
        return env

    def run(
        self,
        env: Env,
        begin: int,
        end: int,
        *,
        quantized: bool,
        keep: Iterable[str] = (),
        observe: Observe = None,
    ) -> Env:
        """Run nodes[begin:end] on `env`; returns it with the outputs added.

        Tensors no node after `end` reads are dropped as soon as they are used, except `keep`;
        `observe` sees each output as it is made (a probe that keeps none of them).
        A model whose input fixes its batch at N runs N samples at a time: its export may have
        baked N into shapes anywhere (a Reshape's target with the batch third, a class token
        expanded to the batch as a constant), which batches of many samples would not fit, or
        worse, would fit wrongly.
        """
        parts = self._micro_batches(env)
        if parts is None:
            return self._run(env, begin, end, quantized, keep, observe)
        runs = [self._run(part, begin, end, quantized, keep, observe) for part in parts]
        return _joined(runs, self.fixed_batch)

    def _micro_batches(self, env: Env) -> list[Env] | None:
        """`env` cut into runs of the model's fixed batch, or None where it is one already (or
        the model's batch is free)."""
        if self.fixed_batch is None:
            return None
        batches = [v.shape[0] for v in env.values() if v.dim() >= 2 and v.is_floating_point()]
        batch = max(batches, default=0)
        if batch <= self.fixed_batch or batch % self.fixed_batch:
            return None
        return [
            {
                k: v[start : start + self.fixed_batch] if v.dim() and v.shape[0] == batch else v
                for k, v in env.items()
            }
            for start in range(0, batch, self.fixed_batch)
        ]

    def _run(
        self, env: Env, begin: int, end: int, quantized: bool, keep: Iterable[str], observe: Observe
    ) -> Env:
        """`run` on one batch the model takes, `env` updated in place."""
        keep = set(keep) | set(self.graph_outputs)
        weights: Env = {}
        for index in range(begin, end):
            node = self.nodes[index]
            inputs = [self._value(name, env, weights, quantized) if name else None for name in node.inputs]
            around = {name: self._value(name, env, weights, quantized) for name in node.outer}
            outputs = self._execute(node, inputs, around)
            for name, value in zip(node.outputs, outputs, strict=False):
                if not name:
                    continue
                if quantized and name in self.quant_points:
                    value = self.activation[self.quant_points[name]](value)
                env[name] = value
                if observe is not None:
                    observe(name, value)
            for name in [*node.inputs, *node.outer]:
                if name in env and self.last_use.get(name, -1) <= index and name not in keep:
                    del env[name]
        return env

    def forward(self, feeds: Env, quantized: bool = True) -> list[torch.Tensor]:
        env = self.run(self.quantize_inputs(feeds, quantized), 0, len(self.nodes), quantized=quantized)
        return [env[name] for name in self.graph_outputs]

    def _value(self, name: str, env: Env, weights: Env, quantized: bool) -> torch.Tensor:
        if name in env:
            return env[name]
        if quantized:
            if name in self.weight_index:
                if name not in weights:
                    weights[name] = self.rounding[self.weight_index[name]]()
                return weights[name]
            if name in self.bias_specs:
                return self._quantized_bias(name)
            if name in self.corrected_biases:
                return self.corrected_biases[name]
        return self.constants[name]

    def _quantized_bias(self, name: str) -> torch.Tensor:
        """round(b / (s_in·s_w))·s_in·s_w, the int32 bias insert_qdq writes (a zero scale → 1);
        with QPRep, b is γ·b + β and s_w is γ·s_w, as export writes them."""
        bias = self.corrected_biases.get(name, self.constants[name])
        root, buffer = self.bias_specs[name]
        scale = self.activation[root].scale.clamp_min(1e-12) * getattr(self, buffer)
        rounding = self.rounding[self.weight_index[self.bias_weights[name]]]
        gain = rounding.channel_gain()
        if gain is not None:
            bias, scale = bias * gain + rounding.shift, scale * gain
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        return round_ste(bias / scale) * scale

    def _execute(self, node: MirrorNode, inputs: list, around: Env) -> tuple:
        if node.in_torch:
            try:
                fn = OPS[node.op_type]
                if node.op_type in ("Split", "Attention"):  # what they return depends on it
                    return fn(node.attrs, *inputs, outputs=len(node.outputs))
                return fn(node.attrs, *inputs)
            except NotImplementedError:
                node.in_torch = False
        return self._onnxruntime(node, inputs, around)

    def _onnxruntime(self, node: MirrorNode, inputs: list, around: Env) -> tuple:
        """The node alone in onnxruntime: no gradient, but the values are right. The tensors its
        subgraphs read from the graph around it are inputs of that model under their own names."""
        arrays = [None if v is None else np.ascontiguousarray(v.detach().cpu().numpy()) for v in inputs]
        outer = {name: np.ascontiguousarray(v.detach().cpu().numpy()) for name, v in around.items()}
        if node.name not in self._sessions:
            if self._types is None:
                self._types = element_types(self._model)
            names = [f"in{i}" if v is not None else "" for i, v in enumerate(arrays)]
            infos = [
                helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), None)
                for n, a in zip(names, arrays, strict=True)
                if a is not None
            ]
            infos += [
                helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), None)
                for n, a in outer.items()
            ]
            outputs = [
                helper.make_tensor_value_info(f"out{i}", self._types.get(o, onnx.TensorProto.FLOAT), None)
                for i, o in enumerate(node.outputs)
                if o
            ]
            single = helper.make_node(
                node.op_type,
                names,
                [f"out{i}" if o else "" for i, o in enumerate(node.outputs)],
                domain=node.proto.domain,
            )
            single.attribute.extend(node.proto.attribute)
            graph = helper.make_graph([single], node.name, infos, outputs)
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
            model.ir_version = oldest_ir_version(model)
            self._sessions[node.name] = session(model, arena=False)
        runner = self._sessions[node.name]
        feed = {f"in{i}": a for i, a in enumerate(arrays) if a is not None} | outer
        device = next((v.device for v in inputs if v is not None), torch.device("cpu"))
        results = iter(runner.run(None, feed))  # the named outputs only: put back in their places
        return tuple(
            torch.from_numpy(np.asarray(next(results))).to(device) if o else None for o in node.outputs
        )


def _tensor(array: np.ndarray) -> torch.Tensor:
    array = np.asarray(array)
    if array.dtype == np.float64:
        array = array.astype(np.float32)
    return torch.from_numpy(array.copy())


def _attribute_value(attribute: onnx.AttributeProto):
    """An attribute's value as the op table reads it: tensors (ConstantOfShape's value, which
    ultralytics' heads set) as numpy arrays, not TensorProtos; strings as str, not the bytes onnx
    gives."""
    value = helper.get_attribute_value(attribute)
    if attribute.type == onnx.AttributeProto.TENSOR:
        return numpy_helper.to_array(value).copy()  # a writable copy, as torch wants
    if attribute.type == onnx.AttributeProto.STRING:
        return value.decode()
    if attribute.type == onnx.AttributeProto.STRINGS:
        return [v.decode() for v in value]
    return value


def _constant_value(node: onnx.NodeProto) -> np.ndarray:
    attribute = node.attribute[0]
    value = helper.get_attribute_value(attribute)
    if attribute.name in ("value", "sparse_value"):
        return numpy_helper.to_array(value)
    dtypes = {
        "value_float": np.float32,
        "value_floats": np.float32,
        "value_int": np.int64,
        "value_ints": np.int64,
    }
    return np.asarray(value, dtypes.get(attribute.name))


SHAPE_READERS = frozenset({"Shape", "Size"})


def _valued_tensors(nodes: list[MirrorNode], inputs: list[str], learned: set[str]) -> set[str]:
    """Tensors whose values follow the data or a learned weight: the graph's inputs, those
    weights, and what nodes make from them, except what reads only their shapes."""
    valued = set(inputs) | learned
    for node in nodes:
        if node.op_type not in SHAPE_READERS and any(n in valued for n in [*node.inputs, *node.outer]):
            valued.update(name for name in node.outputs if name)
    return valued


def _last_uses(nodes: list[MirrorNode], outputs: list[str]) -> dict[str, int]:
    last: dict[str, int] = {}
    for index, node in enumerate(nodes):
        for name in [*node.inputs, *node.outer]:
            last[name] = index
    for name in outputs:
        last[name] = len(nodes)
    return last


def _joined(runs: list[Env], batch: int) -> Env:
    """The runs' tensors joined along the batch axis; those without it (shapes, constants) once.
    A tensor that holds its samples on another axis cannot be joined: it stops refinement."""
    joined: Env = {}
    for name, value in runs[0].items():
        parts = [run[name] for run in runs]
        if value.dim() and value.shape[0] == batch and all(p.shape == value.shape for p in parts):
            joined[name] = torch.cat(parts)
        elif all(p.shape == value.shape and torch.equal(p, value) for p in parts[1:]):
            joined[name] = value
        else:
            raise OnnxqError(
                f"refinement cannot join tensor {name!r} of the model's fixed batch of {batch}: its samples "
                "lie on another axis than the first; export the model with a free batch axis"
            )
    return joined
