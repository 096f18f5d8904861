"""The search's sweep (onnxq.calib.search): the items in graph order, each scale chosen by the
error it causes on the quantized model's own activations (see search.py), and the KL of the
quantized from the float prediction that pd and the held-out report measure."""

from __future__ import annotations

import time
from functools import cached_property

import numpy as np
import onnx

from onnxq.calib.frontier import PerBatch, advance, batches, count, flat_values
from onnxq.calib.layer import LayerProbe
from onnxq.calib.reader_weights import ChannelWeights, reader_channel_weights
from onnxq.calib.simulate import FAKE_QUANT_SUFFIX, Arrays, Item, Segment, Simulation, fake_quant_feed
from onnxq.errors import OnnxqError
from onnxq.passes.insert_qdq import activation_quantizer
from onnxq.progress import Progress
from onnxq.quant.weights import QuantizedWeight, group_membership

COARSE = np.linspace(0.05, 1.0, 20)  # clipping ratios, step 0.05
FINE = np.array([-0.03, -0.015, 0.015, 0.03])
# Losses this close (relative) count as a tie, which the widest ratio wins: float64 sums of the
# same errors in another order differ in their last bits.
TIE = 1e-9
ACTIVATION_POSITIONS = 1 << 20  # positions per tensor the activation search scores


def widest_of_least(losses: np.ndarray, ratios: np.ndarray) -> np.ndarray:
    """Per scale group (column), the widest clipping ratio among those of least loss.

    A group whose output does not move with its ratio on the calibration data (a channel that its
    absorbed Relu keeps off there, or whose inputs are zero) ties every candidate, and the first,
    the narrowest, used to win: EfficientNet-Lite0 at W8A8 (`--w-range output`, 32 images) had
    channels of 50 layers clipped to 5 % of their largest weight: 25 dB in-sample, 7.4 dB on
    unseen images where those channels fire. Without evidence for clipping the range stays whole."""
    least = losses.min(axis=0)
    tied = losses <= least * (1 + TIE)
    return np.where(tied, ratios, -np.inf).max(axis=0)


def _batches_of(values) -> list[np.ndarray]:
    """A cached tensor's batches (one array where it is kept whole)."""
    return list(values) if isinstance(values, PerBatch) else [values]


def sweep_items(sim: Simulation) -> list[Item]:
    return [s.item for s in sim.segments if s.item is not None]


# ----------------------------------------------------------------------------- the sweep


class Sweep:
    """Chosen parameters so far, and the machinery to score candidates for the next item."""

    def __init__(self, sim, plan, settings, fixed_ranges, started):
        self.sim, self.plan, self.settings = sim, plan, settings
        self.fixed_ranges = fixed_ranges
        self.started = started
        self.params: Arrays = dict(sim.float_params)
        self.ranges: dict[str, tuple[float, float]] = {}
        self.ratios: dict[str, np.ndarray] = {}
        self.biases: dict[str, np.ndarray] = {}
        self.rounded: dict[str, QuantizedWeight] = {}  # GPTQ's weights, as chosen so far
        self.skipped: list[str] = []
        self.nearest: dict[str, str] = {}  # weight → why GPTQ left it at nearest rounding
        self.observed: dict[str, tuple[float, float]] = {}
        self.layers = {node.name: node for node in sim.model.graph.node}
        self.rng = np.random.default_rng(settings.seed)
        self._probes: dict[str, LayerProbe] = {}

    # -- state --------------------------------------------------------------------

    def snapshot(self) -> tuple:
        """Everything chosen so far, to return to if a later sweep ends worse."""
        return dict(self.params), dict(self.ranges), dict(self.ratios), dict(self.biases), dict(self.rounded)

    def restore(self, state: tuple) -> None:
        """In place: the result already holds these dicts."""
        chosen = (self.params, self.ranges, self.ratios, self.biases, self.rounded)
        for current, saved in zip(chosen, state, strict=True):
            current.clear()
            current.update(saved)

    # -- running ------------------------------------------------------------------

    def advance(self, segment: Segment, frontier: Arrays, params: Arrays) -> Arrays:
        return advance(
            self.sim, segment, frontier, params, self.settings.batch_size, self.settings.half_cache
        )

    def layer(self, node: onnx.NodeProto) -> LayerProbe:
        """The node's probe, built once: its session is reused by every later candidate."""
        if node.name not in self._probes:
            self._probes[node.name] = LayerProbe(self, node)
        return self._probes[node.name]

    def out_of_time(self) -> bool:
        budget = self.settings.time_budget
        return budget is not None and time.perf_counter() - self.started > budget

    # -- local sweep --------------------------------------------------------------

    def local(self, data: Arrays, progress: Progress) -> None:
        quantized, floating = data, data
        done = 0
        for segment in self.sim.segments:
            item = segment.item
            if item is not None:
                if self.out_of_time() and self.settings.method != "fixed":
                    self.skipped.append(item.name)
                    self._fallback(item, quantized)
                elif item.kind == "weight":
                    loss = self._choose_weights(item, quantized, floating)
                    progress.status(f"{item.node}: output {self._loss_name()} {loss:.3g}")
                else:
                    loss = self._choose_activation(item, quantized, floating)
                    progress.status(f"{item.name}: {self._loss_name()} {loss:.3g}")
                done += 1
                progress.advance(done)
            quantized = self.advance(segment, quantized, self.params)
            floating = self.advance(segment, floating, self.sim.float_params)

    def _loss_name(self) -> str:
        return "mae" if self.settings.method == "mae" else "mse"

    def _fallback(self, item: Item, quantized: Arrays) -> None:
        """Out of time: min-max ranges, rule-based weights, no bias correction."""
        if item.kind == "activation":
            values = flat_values(quantized[self.plan.activations[item.name].observed])
            self._set_activation(item.name, float(values.min()), float(values.max()))
        else:
            self._set_weights(self.layers[item.node], None, None)

    # -- activations --------------------------------------------------------------

    def _choose_activation(self, item: Item, quantized: Arrays, floating: Arrays) -> float:
        spec = self.plan.activations[item.name]
        values, reference = flat_values(quantized[spec.observed]), flat_values(floating[spec.observed])
        low, high = spec.bounded(float(values.min()), float(values.max()))
        if not (np.isfinite(low) and np.isfinite(high)):
            raise _overflow(item.name, reference, searched=self.settings.method != "fixed")
        self.observed[item.name] = (low, high)
        if self.settings.method == "fixed":
            low, high = self.fixed_ranges.get(item.name, (low, high))
            self._set_activation(item.name, low, high)
            return float("nan")
        picks = self._positions(values.size)
        x = values[picks].astype(np.float32)
        target = reference[picks].astype(np.float32)
        if spec.floor is not None:  # the readers flatten what lies below: no error counted there
            target = np.maximum(target, np.float32(low))
        channels = self._reader_weights(item, quantized)
        weights = channels.at(picks) if channels is not None else np.float32(1.0)

        def error(ratio: float) -> float:
            scale, zero, bounds = activation_quantizer(low * ratio, high * ratio, spec.bits, self.sym_act)
            q = np.clip(np.rint(x / scale) + np.float32(zero), bounds.qmin, bounds.qmax)
            difference = (q - np.float32(zero)) * scale - target
            with np.errstate(over="ignore"):
                loss = float(np.mean(weights * (difference**2 if self._squared else np.abs(difference))))
            if np.isfinite(loss):
                return loss
            wide = difference.astype(np.float64)  # squares or sums past float32's range
            return float(np.mean(weights * (np.square(wide) if self._squared else np.abs(wide))))

        # one ratio for both ends: the two ends searched apart lowered each tensor's error here but
        # raised MobileNetV2's held-out KL (W4A4 1.27 → 1.37, W6A6 0.090 → 0.110; BENCHMARKS.md)
        best = min(COARSE, key=error)
        best = min([best, *np.clip(best + FINE, 0.01, 1.0)], key=error)
        self._set_activation(item.name, low * best, high * best)
        return error(best)

    def _reader_weights(self, item: Item, quantized: Arrays) -> ChannelWeights | None:
        """Each channel's weight in its readers' output error; None where the tensor's error is
        scored plain: by choice, or where a reader is not a weighted layer or a sharer reads it."""
        spec = self.plan.activations[item.name]
        if self.settings.activation_error != "readers" or any(
            other.tensor != item.name and self.plan.root(other.tensor) == item.name
            for other in self.plan.activations.values()
        ):
            return None
        shapes = {tuple(batch.shape) for batch in _batches_of(quantized[spec.observed])}
        if len(shapes) != 1:
            return None
        quantized_name = f"{spec.observed}{FAKE_QUANT_SUFFIX}"
        readers = self.readers.get(quantized_name, [])
        return reader_channel_weights(readers, quantized_name, shapes.pop(), self.params)

    @cached_property
    def readers(self) -> dict[str, list[onnx.NodeProto]]:
        """Tensor → the nodes reading it (built for activation_error "readers" only)."""
        found: dict[str, list[onnx.NodeProto]] = {}
        for node in self.sim.model.graph.node:
            for name in set(node.input):
                found.setdefault(name, []).append(node)
        return found

    @property
    def sym_act(self) -> bool:
        return self.settings.symmetric_activations

    @property
    def _squared(self) -> bool:
        return self.settings.method != "mae"

    def _positions(self, size: int) -> np.ndarray:
        if size <= ACTIVATION_POSITIONS:
            return np.arange(size)
        return np.sort(self.rng.choice(size, ACTIVATION_POSITIONS, replace=False))

    def _set_activation(self, tensor: str, low: float, high: float) -> None:
        spec = self.plan.activations[tensor]
        low, high = spec.bounded(low, high)
        scale, zero, bounds = activation_quantizer(low, high, spec.bits, self.sym_act)
        self.ranges[tensor] = (low, high)
        self.params.update(fake_quant_feed(tensor, float(scale), float(zero), bounds.qmin, bounds.qmax))

    # -- weights ------------------------------------------------------------------

    def _choose_weights(self, item: Item, quantized: Arrays, floating: Arrays) -> float:
        node = self.layers[item.node]
        layer = self.layer(node)
        if self.settings.rounding == "gptq":
            self._prepare_rounding(layer, quantized)
        if self.settings.method == "fixed" and layer.spec.rule.kind != "output":
            self._set_weights(node, None, quantized, floating, layer)
            return float("nan")
        membership = group_membership(layer.weight, layer.spec.layout, layer.spec.granularity)
        groups = membership.shape[0]
        coarse = [np.full(groups, r) for r in COARSE]
        losses = layer.losses(coarse, quantized, floating) @ membership.T  # (candidates, groups)
        best = widest_of_least(losses, np.stack(coarse))
        fine = [best, *(np.clip(best + step, 0.01, 1.0) for step in FINE)]
        losses = layer.losses(fine, quantized, floating) @ membership.T
        chosen = widest_of_least(losses, np.stack(fine))
        self._set_weights(node, chosen, quantized, floating, layer)
        return float(losses.min(axis=0).sum() / max(1, layer.positions))

    def _set_weights(self, node, ratios, quantized, floating=None, layer=None) -> float:
        layer = layer or self.layer(node)
        if ratios is not None:
            self.ratios[layer.spec.name] = ratios
        dequantized, bias = layer.candidate(ratios, layer.float_bias)
        if self.settings.bias_correction and layer.bias_name and quantized is not None:
            shift = layer.mean_shift(dequantized, bias, quantized, floating)
            self.biases[layer.bias_name] = (layer.float_bias + shift).astype(np.float32)
            dequantized, bias = layer.candidate(ratios)
        self.params[layer.spec.name] = dequantized
        if layer.bias_name:
            self.params[layer.bias_name] = bias
        self._keep_rounding(layer)
        return float("nan")

    def _prepare_rounding(self, layer: LayerProbe, quantized: Arrays) -> None:
        if layer.spec.name in self.nearest:  # refused once (op, size, too few rows): pd's revisit
            return  # reads no more samples, and would measure H only to refuse it again
        reason = layer.prepare_rounding(quantized)
        if reason:
            self.nearest[layer.spec.name] = reason

    def _keep_rounding(self, layer: LayerProbe) -> None:
        """Record GPTQ's weight at the ratios chosen and free the layer's H; pd measures it anew
        if it revisits the layer."""
        if layer.factored is not None:
            self.rounded[layer.spec.name] = layer.quantized(self.ratios.get(layer.spec.name))
            layer.release_rounding()

    # -- prediction difference ----------------------------------------------------

    def float_logits(self, data: Arrays) -> np.ndarray | None:
        if not count(data):
            return None
        return self._outputs(self.sim.segments, data, self.sim.float_params)

    def _outputs(self, segments, data: Arrays, params: Arrays) -> np.ndarray:
        name = self.sim.model.graph.output[0].name
        parts = [
            self.sim.run(segments, batch, params)[name] for batch in batches(data, self.settings.batch_size)
        ]
        return np.concatenate(parts)

    def prediction_loss(self, data: Arrays, target: np.ndarray) -> float:
        return prediction_difference(target, self._outputs(self.sim.segments, data, self.params))


def prediction_difference(reference: np.ndarray, quantized: np.ndarray) -> float:
    """KL(float ‖ quantized) of the softmax over the class axis, averaged over samples.

    Outputs that are not (samples, classes) are compared by normalised MSE instead.
    """
    if reference.ndim != 2:
        return float(np.mean((reference - quantized) ** 2) / max(np.mean(reference**2), 1e-12))
    log_p = _log_softmax(reference.astype(np.float64))
    log_q = _log_softmax(quantized.astype(np.float64))
    return float(np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=1)))


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def _overflow(name: str, reference: np.ndarray, *, searched: bool) -> OnnxqError:
    """The quantized model's values went infinite or NaN. The error sums that overflowed float32
    on activations of 1e20 (squares, GPTQ's input products) are retaken in float64 since ef76735,
    so no model at hand reaches this any more: a guard, not a known path."""
    finite = reference[np.isfinite(reference)]
    peak = f"{float(np.abs(finite).max()):.3g}" if finite.size else "infinity"
    instead = (
        "--calib-method auto, minmax or percentile"
        if searched
        else "--weight-rounding nearest and --no-bias-correction"
    )
    return OnnxqError(
        f"the quantized model's values at activation {name!r} are infinite or NaN (its float values "
        f"reach {peak}): float32 error sums overflow on activations this large; calibrate with {instead}"
    )
