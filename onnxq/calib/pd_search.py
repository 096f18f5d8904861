"""pd's second sweep (PD-Quant): after the local choices, each item narrower than 8 bits tries a
few multipliers around its choice, scored by the KL of the quantized from the float softmax at
the model output (the rest of the model run as chosen so far) plus λ times the normalised MSE of
the item's own outputs, the regulariser against fitting the small calibration set."""

from __future__ import annotations

import numpy as np

from onnxq.calib.frontier import PerBatch, batches, sized_batches
from onnxq.calib.layer import BIAS_SAMPLES
from onnxq.calib.simulate import Arrays, Item, Segment, fake_quant_feed
from onnxq.calib.sweep import Sweep, prediction_difference
from onnxq.passes.insert_qdq import activation_quantizer
from onnxq.progress import Progress
from onnxq.quant.weights import group_membership

PD_WEIGHT_STEPS = (0.9, 0.95, 1.05)
PD_ACTIVATION_STEPS = (0.8, 0.9, 1.1)


class PredictionSweep(Sweep):
    """The sweep with pd's second pass over it."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.pd_candidates = 0  # scored by pd, and of those
        self.pd_pruned = 0  # skipped: their regulariser alone exceeded the best loss
        self._kl_now: float | None = None  # KL of the model as chosen so far, once measured

    def restore(self, state: tuple) -> None:
        super().restore(state)
        self._kl_now = None

    def prediction_difference(self, data: Arrays, target: np.ndarray, progress: Progress) -> None:
        quantized, floating = data, data
        done = 0
        for index, segment in enumerate(self.sim.segments):
            following = self.sim.segments[index:]
            floating_next = self.advance(segment, floating, self.sim.float_params)
            item = segment.item
            if item is not None and self.bits(item) < 8:  # 8-bit items: the local choice holds
                if self.out_of_time():
                    self.skipped.append(f"{item.name} (pd)")
                else:
                    loss = self._pd_item(item, following, quantized, floating, floating_next, target)
                    progress.status(f"{item.name}: pd loss {loss:.4g}")
                done += 1
                progress.advance(done)
            quantized = self.advance(segment, quantized, self.params)
            floating = floating_next

    def bits(self, item: Item) -> int:
        specs = self.plan.weights if item.kind == "weight" else self.plan.activations
        return specs[item.name].bits

    def _pd_item(self, item, following, quantized, floating, floating_next, target) -> float:
        layer = None
        if item.kind == "weight":  # its input's scale may have moved: requantize the bias
            layer = self.layer(self.layers[item.node])
            if self.settings.rounding == "gptq":
                self._prepare_rounding(layer, quantized)
            weight, bias = layer.candidate(self.ratios.get(layer.spec.name))
            self._update({layer.spec.name: weight} | ({layer.bias_name: bias} if layer.bias_name else {}))

        powers = {  # per-sample float tensors only: shapes carried per batch are not features
            name: _power(floating_next[name])
            for name in following[0].outputs
            if not isinstance(floating_next[name], PerBatch) and floating_next[name].dtype.kind == "f"
        }
        lam = self.settings.pd_lambda

        def regulariser(params: Arrays) -> float:
            return lam * self._pd_regulariser(following[0], quantized, floating_next, powers, params)

        if self._kl_now is None:  # else: the model is unchanged since the last item measured it
            self._kl_now = self._pd_kl(following, quantized, target, self.params)
        best, best_kl = None, self._kl_now
        best_loss = best_kl + regulariser(self.params)
        for candidate in self._pd_candidates(item, quantized, floating):
            params = {**self.params, **candidate[0]}
            penalty = regulariser(params)
            self.pd_candidates += 1
            if penalty >= best_loss:  # KL ≥ 0: it cannot win, skip running the rest of the model
                self.pd_pruned += 1
                continue
            kl = self._pd_kl(following, quantized, target, params)
            if kl + penalty < best_loss - 1e-12:
                best, best_kl, best_loss = candidate, kl, kl + penalty
        if best is not None:
            params, commit = best
            self.params.update(params)
            commit()
            self._kl_now = best_kl
        if layer is not None:
            self._keep_rounding(layer)
        return best_loss

    def _update(self, params: Arrays) -> None:
        """Set parameters; the model's KL is re-measured only if one of them changed."""
        for name, value in params.items():
            if not np.array_equal(self.params[name], value):
                self.params[name] = value
                self._kl_now = None

    def _pd_candidates(self, item: Item, quantized: Arrays, floating: Arrays):
        """(parameter feed, commit) pairs around the item's current choice."""
        if item.kind == "activation":
            low, high = self.ranges[item.name]
            seen_low, seen_high = self.observed.get(item.name, (low, high))
            spec = self.plan.activations[item.name]
            for step in PD_ACTIVATION_STEPS:
                new_low, new_high = spec.bounded(max(low * step, seen_low), min(high * step, seen_high))
                scale, zero, bounds = activation_quantizer(new_low, new_high, spec.bits, self.sym_act)
                feed = fake_quant_feed(item.name, float(scale), float(zero), bounds.qmin, bounds.qmax)

                def commit(new=(new_low, new_high)):
                    self.ranges[item.name] = new

                yield feed, commit
            return
        node = self.layers[item.node]
        layer = self.layer(node)
        groups = group_membership(layer.weight, layer.spec.layout, layer.spec.granularity).shape[0]
        base = self.ratios.get(layer.spec.name, np.ones(groups))
        for step in PD_WEIGHT_STEPS:
            ratios = np.clip(base * step, 0.01, 1.0)
            dequantized, bias = layer.candidate(ratios, layer.float_bias)
            feed = {layer.spec.name: dequantized}
            corrected = None
            if self.settings.bias_correction and layer.bias_name:
                shift = layer.mean_shift(dequantized, bias, quantized, floating, samples=BIAS_SAMPLES)
                corrected = (layer.float_bias + shift).astype(np.float32)
                dequantized, bias = layer.candidate(ratios, corrected)
            if layer.bias_name:
                feed[layer.bias_name] = bias

            def commit(ratios=ratios, corrected=corrected):
                self.ratios[layer.spec.name] = ratios
                if corrected is not None:
                    self.biases[layer.bias_name] = corrected

            yield feed, commit

    def _pd_regulariser(self, first: Segment, quantized, floating_next, powers, params) -> float:
        """Normalised MSE of the item's own outputs against the float model's, per sample."""
        total, start = 0.0, 0
        for batch, size in sized_batches(quantized, self.settings.batch_size):
            outputs = self.sim.run([first], batch, params)
            for tensor in powers:
                reference = floating_next[tensor][start : start + size]
                total += float(np.sum((outputs[tensor] - reference) ** 2) / powers[tensor])
            start += size
        return total / max(1, start)

    def _pd_kl(self, following, quantized, target, params) -> float:
        """KL of the quantized from the float softmax at the output, running the rest of the model."""
        name = self.sim.model.graph.output[0].name
        outputs = [
            self.sim.run(following, b, params)[name] for b in batches(quantized, self.settings.batch_size)
        ]
        return prediction_difference(target, np.concatenate(outputs))


def _power(values: np.ndarray, chunk: int = 16) -> float:
    """Mean square per sample, the regulariser's normaliser (never 0); a few samples at a time,
    so that no float64 copy of a whole cached tensor is ever made."""
    total = 0.0
    for start in range(0, len(values), chunk):
        part = values[start : start + chunk].astype(np.float32)
        total += float(np.vdot(part, part))
    return max(total / max(len(values), 1), 1e-12)
