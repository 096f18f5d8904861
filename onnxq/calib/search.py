"""Choose every scale by the error it causes, measured in onnxruntime (mse, mae, pd).

One sweep walks the simulation's segments in graph order with two frontiers: the float model's
tensors and the quantized model's own tensors (everything before the cut already quantized with
what was chosen). At each item:
- weights: a grid of clipping ratios per scale group; each candidate runs the layer (and its
  absorbed Relu/Clip) in onnxruntime on the quantized input, and each group keeps the ratio whose
  output is closest to the float layer's output (squared or absolute error). With bias
  correction the candidate's output is first shifted by its own mean error per channel.
- activations: a grid of clipping ratios of the observed range, scored on a fixed random subset
  of positions against the float tensor (with activation_error "readers", each channel's error
  weighted by how much the layers reading it amplify it: onnxq.calib.reader_weights).
With GPTQ rounding (settings.rounding), each layer first measures its inputs' correlations on the
quantized model and every weight candidate is rounded by GPTQ at its scales (onnxq.calib.rounding).
`pd` then sweeps again over the items narrower than 8 bits (at 8 bits the local choice holds):
each tries a few multipliers around its choice, scored by the KL divergence of the quantized
from the float softmax at the model output (later items quantized as chosen so far) plus λ
times the normalised MSE of the item's own outputs (PD-Quant's regulariser against fitting the
small calibration set).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from functools import cached_property

import numpy as np
import onnx

from onnxq.calib.frontier import (
    PerBatch,
    advance,
    batches,
    count,
    fit_memory,
    flat_values,
    sized_batches,
)
from onnxq.calib.layer import BIAS_SAMPLES, LayerProbe
from onnxq.calib.reader_weights import ChannelWeights, reader_channel_weights
from onnxq.calib.simulate import FAKE_QUANT_SUFFIX, Arrays, Item, Segment, Simulation, fake_quant_feed
from onnxq.passes.insert_qdq import activation_quantizer
from onnxq.progress import Progress
from onnxq.quant.kernels import FULL_RANGE, WeightRangeChoice
from onnxq.quant.plan import QuantPlan
from onnxq.quant.weights import QuantizedWeight, group_membership

COARSE = np.linspace(0.05, 1.0, 20)  # clipping ratios, step 0.05
FINE = np.array([-0.03, -0.015, 0.015, 0.03])
PD_WEIGHT_STEPS = (0.9, 0.95, 1.05)
PD_ACTIVATION_STEPS = (0.8, 0.9, 1.1)
# Losses this close (relative) count as a tie, which the widest ratio wins: float64 sums of the
# same errors in another order differ in their last bits.
TIE = 1e-9
ACTIVATION_POSITIONS = 1 << 20  # positions per tensor the activation search scores


@dataclass(frozen=True)
class SearchSettings:
    method: str  # "fixed" (given ranges; only "output" weights searched), "mse", "mae" or "pd"
    bias_correction: bool = True
    symmetric_weights: bool | None = True  # None: symmetric at 8 bits only (weight_target)
    symmetric_activations: bool = False
    int8_range: WeightRangeChoice = FULL_RANGE
    pd_lambda: float = 0.1
    holdout: float = 0.2
    seed: int = 0
    time_budget: float | None = None
    batch_size: int = 32  # at most; fewer where one batch's tensors would pass frontier.BATCH_BYTES
    fixed_batch: int | None = None  # the model's own batch size, where its graph fixes one
    memory_budget: float = 1.5e9  # bytes of cached tensors (float and quantized frontiers)
    half_cache: bool = True  # keep cached float32 tensors in float16 (half the memory)
    rounding: str = "nearest"  # weight integers: "nearest", or "gptq" (onnxq.calib.rounding)
    activation_error: str = "own"  # "own": every value alike; "readers": weighted by the readers


@dataclass
class SearchResult:
    ranges: dict[str, tuple[float, float]]  # activation (root) → clipping range
    weight_ratios: dict[str, np.ndarray]
    biases: dict[str, np.ndarray]
    samples: int  # used by the search
    held_out: int
    pd_loss: dict[str, float] = field(default_factory=dict)  # "calibration"/"held-out" (+ before pd)
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0
    pd_seconds: float = 0.0  # of which the prediction-difference sweep
    pd_pruned: tuple[int, int] = (0, 0)  # pd candidates skipped by the regulariser bound, of all
    pd_kept_start: bool = False  # pd ended no better on the calibration KL: its start was kept
    feed: Arrays = field(default_factory=dict)  # the simulation's parameters for the chosen model
    rounded: dict[str, QuantizedWeight] = field(default_factory=dict)  # GPTQ's integers, by weight
    nearest: dict[str, str] = field(default_factory=dict)  # weight → why GPTQ could not round it


def search_parameters(
    sim: Simulation,
    plan: QuantPlan,
    data: Arrays,
    settings: SearchSettings,
    progress: Progress,
    fixed_ranges: dict[str, tuple[float, float]] | None = None,
) -> SearchResult:
    """Walk the items in order and choose each one's scale (see module docstring)."""
    started = time.perf_counter()
    search, held = _split(data, settings)
    unit = settings.fixed_batch if settings.fixed_batch and _bakes_its_batch(sim, search, settings) else 1
    search, batch_size = fit_memory(sim, search, settings.memory_budget, settings.half_cache, unit)
    if settings.fixed_batch:  # whole batches only: the graph cannot run any other size
        search, held = _whole_batches(search, unit), _whole_batches(held, unit)
        batch_size = unit
    settings = replace(settings, batch_size=min(settings.batch_size, batch_size) if unit == 1 else unit)
    sweep = _Sweep(sim, plan, settings, fixed_ranges or {}, started)
    progress.stage(f"calibrate ({settings.method}): {count(search)} samples", total=len(_items(sim)))
    sweep.local(search, progress)
    result = SearchResult(sweep.ranges, sweep.ratios, sweep.biases, count(search), count(held))
    if settings.method == "pd" or count(held):
        targets = {
            name: sweep.float_logits(part) for name, part in (("calibration", search), ("held-out", held))
        }
    if settings.method == "pd":
        for name, part in (("calibration", search), ("held-out", held)):
            if count(part):
                result.pd_loss[f"{name} before pd"] = sweep.prediction_loss(part, targets[name])
        progress.stage(
            f"calibrate (pd, λ={settings.pd_lambda:g})", total=sum(sweep.bits(i) < 8 for i in _items(sim))
        )
        pd_started = time.perf_counter()
        start = sweep.snapshot()
        sweep.prediction_difference(search, targets["calibration"], progress)
        before = result.pd_loss["calibration before pd"]
        result.pd_loss["calibration"] = sweep.prediction_loss(search, targets["calibration"])
        if result.pd_loss["calibration"] >= before:
            sweep.restore(start)  # nothing better found: the search keeps its starting point
            result.pd_kept_start = True
            result.pd_loss["calibration"] = before
        result.pd_seconds = time.perf_counter() - pd_started
        result.pd_pruned = (sweep.pd_pruned, sweep.pd_candidates)
    for name, part in (("calibration", search), ("held-out", held)):
        if count(part) and (settings.method == "pd" or count(held)) and name not in result.pd_loss:
            result.pd_loss[name] = sweep.prediction_loss(part, targets[name])
    result.skipped = sweep.skipped
    result.feed = sweep.params
    result.rounded = sweep.rounded
    result.nearest = sweep.nearest
    result.seconds = time.perf_counter() - started
    return result


# ----------------------------------------------------------------------------- data


def _bakes_its_batch(sim: Simulation, data: Arrays, settings: SearchSettings) -> bool:
    """Whether a graph that declares a fixed batch size really runs only that one: a static
    export's Reshape may bake it ([1, 576]), while a detector that merely declares 1 runs any
    batch, and the search's batches of 32 stay faster there. One float run on one sample more."""
    size = settings.fixed_batch + 1
    if count(data) < size:
        return True
    try:
        sim.run(sim.segments, {k: v[:size] for k, v in data.items()}, sim.float_params, quiet=True)
    except Exception:  # onnxruntime raises its own types for a shape it cannot take
        return True
    return False


def _whole_batches(data: Arrays, size: int) -> Arrays:
    total = count(data)
    return {k: v[: total - total % size] for k, v in data.items()}


def _split(data: Arrays, settings: SearchSettings) -> tuple[Arrays, Arrays]:
    """A seeded held-out part of the calibration data (none when holdout is 0 or data is tiny)."""
    total = count(data)
    held = round(total * settings.holdout) if total >= 10 else 0
    order = np.random.default_rng(settings.seed).permutation(total)
    keep, out = np.sort(order[held:]), np.sort(order[:held])
    return {k: v[keep] for k, v in data.items()}, {k: v[out] for k, v in data.items()}


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


def _items(sim: Simulation) -> list[Item]:
    return [s.item for s in sim.segments if s.item is not None]


# ----------------------------------------------------------------------------- the sweep


class _Sweep:
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
        self.pd_candidates = 0  # scored by pd, and of those
        self.pd_pruned = 0  # skipped: their regulariser alone exceeded the best loss
        self._kl_now: float | None = None  # KL of the model as chosen so far, once measured in pd

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
        self._kl_now = None

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
            return float(np.mean(weights * (difference**2 if self._squared else np.abs(difference))))

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
