"""One compute layer as a small onnxruntime session: its weight candidates and their errors.

The search asks a probe for a layer's output under a candidate weight (and its absorbed
Relu/Clip), on the quantized model's inputs, against the float layer on the float inputs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import helper

from onnxq.calib import scratch
from onnxq.calib.frontier import paired_batches
from onnxq.calib.rounding import Factored, factor, gptq_round, input_correlation, refusal, too_few_rows
from onnxq.calib.simulate import Arrays, param_names
from onnxq.io import session
from onnxq.memory import return_free_pages
from onnxq.passes.insert_qdq import bias_quantization, room_for_bias, weight_target
from onnxq.quant.plan import QuantPlan
from onnxq.quant.weights import GroupRanges, QuantizedWeight, group_ranges, quantize_weight

if TYPE_CHECKING:
    from onnxq.calib.sweep import Sweep

BIAS_SAMPLES = 64  # samples that estimate a candidate's mean output shift


class LayerProbe:
    """One compute node (and its absorbed Relu/Clip) as a small onnxruntime session."""

    def __init__(self, sweep: Sweep, node: onnx.NodeProto):
        self.sweep = sweep
        self.node = node
        plan = sweep.plan
        self.spec = plan.weights[node.input[1]]
        self.weight = sweep.sim.float_params[self.spec.name]
        self.target = weight_target(self.spec, sweep.settings.symmetric_weights, sweep.settings.int8_range)
        bias = node.input[2] if len(node.input) > 2 and node.input[2] in sweep.sim.float_params else ""
        self.bias_name = bias
        self.float_bias = sweep.sim.float_params[bias] if bias else None
        self.quantized_bias = bias in plan.biases
        self.channel_axis = 1 if node.op_type in ("Conv", "ConvTranspose") else -1
        self.activation = _absorbed_after(sweep.sim.model.graph, node, plan)
        self.positions = 0
        self._runner = None
        self.factored: Factored | None = None  # H of its inputs, once GPTQ rounds it
        self._rounded: dict[bytes | None, QuantizedWeight] = {}  # GPTQ's result by ratios
        self._ranges: GroupRanges | None = None  # the scale groups every ratio shares

    def prepare_rounding(self, quantized: Arrays) -> str | None:
        """Measure H on the quantized model's inputs, so that every later candidate is rounded
        by GPTQ; where GPTQ cannot serve the layer, the reason (it keeps nearest rounding)."""
        reason = refusal(self.node, self.weight)
        if reason:
            return reason
        values = quantized[self.node.input[0]]
        inputs = (q for q, _ in paired_batches(values, values, self.sweep.settings.batch_size))
        correlation = input_correlation(self.node, self.weight, inputs)
        reason = too_few_rows(correlation)
        if reason is None:
            self.factored = factor(correlation.gram)
            self._rounded.clear()
        scratch.release()  # the patches, tens of MB per batch, would otherwise stay resident
        return_free_pages()
        return reason

    def release_rounding(self) -> None:
        """Free H and GPTQ's results (a detector layer's H takes hundreds of MB)."""
        self.factored = None
        self._rounded.clear()

    def quantized(self, ratios: np.ndarray | None) -> QuantizedWeight:
        """The weight's integers and scales for these ratios: nearest rounding, or GPTQ's (kept
        per ratios while H is: bias correction and the final choice ask for the same ones again)."""
        spec = self.spec
        if self._ranges is None:
            self._ranges = group_ranges(self.weight, spec.layout, spec.granularity, spec.rule, self.target)
        nearest = quantize_weight(
            self.weight, spec.layout, spec.granularity, spec.rule, self.target, ratios, self._ranges
        )
        if self.factored is None:
            return nearest
        key = None if ratios is None else np.asarray(ratios, np.float64).tobytes()
        if key not in self._rounded:
            self._rounded[key] = gptq_round(self.weight, nearest, self.factored, self.node, spec.layout)
        return self._rounded[key]

    @property
    def runner(self):
        if self._runner is None:
            self._runner = session(
                _layer_model(self.sweep.sim.model, self.node, self.activation, bool(self.bias_name)),
                arena=False,
            )
        return self._runner

    def candidate(self, ratios: np.ndarray | None, bias: np.ndarray | None = None):
        """(dequantized weight, the bias as the deployed model holds it) for these ratios."""
        quantized = self.quantized(ratios)
        if not self.bias_name:
            return quantized.dequantize(), None
        if bias is None:
            bias = self.sweep.biases.get(self.bias_name, self.float_bias)
        if self.quantized_bias and quantized.per_output_channel_scale is not None:
            source = self.sweep.plan.root(self.sweep.plan.biases[self.bias_name].activation)
            input_scale = self.sweep.params[param_names(source)["scale"]]
            quantized = room_for_bias(quantized, bias, input_scale)  # as insert_qdq writes it
            integers, scale = bias_quantization(bias, input_scale * quantized.per_output_channel_scale)
            bias = (integers.astype(np.float64) * scale).astype(np.float32)
        return quantized.dequantize(), bias

    def _run(self, x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None):
        feed = {"x": x.astype(np.float32, copy=False), "w": weight}  # the cache may be float16
        if self.bias_name:
            feed["b"] = bias
        return self.runner.run(None, feed)

    def mean_shift(self, weight, bias, quantized, floating, samples: int | None = None) -> np.ndarray:
        """Per output channel, mean(float output − quantized output) before the activation,
        over the first `samples` samples (all when None)."""
        return self.mean_shifts([(weight, bias)], quantized, floating, samples)[0]

    def mean_shifts(self, weights: list, quantized, floating, samples: int | None = None) -> list[np.ndarray]:
        """mean_shift of each (weight, bias) candidate, the float layer run once per batch for
        all of them (per candidate it took a third of a ResNet-50 weight search's layer runs)."""
        x_name = self.node.input[0]
        size = self.sweep.settings.batch_size
        totals: list = [0.0] * len(weights)
        positions = 0
        for q_batch, f_batch in paired_batches(quantized[x_name], floating[x_name], size, samples):
            reference = self._run(f_batch, self.weight, self.float_bias)[0]
            x = q_batch.astype(np.float32, copy=False)  # widened once, not per candidate
            for k, (weight, bias) in enumerate(weights):
                output = self._run(x, weight, bias)[0]
                totals[k] = totals[k] + _channel_sums(reference - output, self.channel_axis)
            positions += reference.size // reference.shape[self.channel_axis]
        return [(total / max(positions, 1)).astype(np.float32) for total in totals]

    def losses(self, candidates: list[np.ndarray], quantized: Arrays, floating: Arrays) -> np.ndarray:
        """(candidates, output channels) summed output error, each candidate bias-corrected."""
        settings = self.sweep.settings
        squared = settings.method != "mae"
        weights = [self.candidate(r, self.float_bias) for r in candidates]
        if settings.bias_correction and self.bias_name:
            shifts = self.mean_shifts(weights, quantized, floating, samples=BIAS_SAMPLES)
            weights = [
                self.candidate(ratios, (self.float_bias + shift).astype(np.float32))
                for ratios, shift in zip(candidates, shifts, strict=True)
            ]
        x_name = self.node.input[0]
        totals = np.zeros((len(candidates), self.weight.shape[self.spec.layout.out_axis]))
        self.positions = 0
        for q_batch, f_batch in paired_batches(quantized[x_name], floating[x_name], settings.batch_size):
            x = q_batch.astype(np.float32, copy=False)  # widened once, not per candidate
            reference = self._run(f_batch, self.weight, self.float_bias)[-1]
            self.positions += reference.size
            for k, (weight, bias) in enumerate(weights):
                difference = self._run(x, weight, bias)[-1] - reference
                with np.errstate(over="ignore"):
                    error = _channel_sums(difference**2 if squared else np.abs(difference), self.channel_axis)
                if squared and not np.isfinite(error).all():  # squares past float32: errors of 1e19+
                    error = _channel_sums(np.square(difference, dtype=np.float64), self.channel_axis)
                totals[k] += error
        return totals


def _channel_sums(values: np.ndarray, axis: int) -> np.ndarray:
    moved = np.moveaxis(values, axis, 0)
    return moved.reshape(moved.shape[0], -1).sum(axis=1, dtype=np.float64)


def _absorbed_after(graph: onnx.GraphProto, node: onnx.NodeProto, plan: QuantPlan) -> onnx.NodeProto | None:
    output = node.output[0]
    return next((n for n in graph.node if n.name in plan.absorbed and n.input[0] == output), None)


def _layer_model(
    model: onnx.ModelProto, node: onnx.NodeProto, activation: onnx.NodeProto | None, bias_fed: bool
):
    """x, w (, b) → (pre-activation output, post-activation output).

    A bias the search does not tune (left float by the plan) is baked in as a constant."""
    layer = onnx.NodeProto()
    layer.CopyFrom(node)
    names = ["x", "w", "b"][: len(node.input)]
    del layer.input[:]
    layer.input.extend(names)
    del layer.output[:]
    layer.output.append("pre")
    nodes, outputs = [layer], ["pre"]
    known = {t.name: t for t in model.graph.initializer}
    initializers = []
    if len(names) == 3 and not bias_fed:
        bias = onnx.TensorProto()
        bias.CopyFrom(known[node.input[2]])
        bias.name = "b"
        initializers.append(bias)
        names = names[:2]
    if activation is not None:
        act = onnx.NodeProto()
        act.CopyFrom(activation)
        act.input[0] = "pre"
        del act.output[:]
        act.output.append("post")
        nodes.append(act)
        outputs.append("post")
        initializers += [known[n] for n in act.input[1:] if n in known]
    graph = helper.make_graph(
        nodes,
        "layer",
        [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names],
        [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in outputs],
        initializers,
    )
    return helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
