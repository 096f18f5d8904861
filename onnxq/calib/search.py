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
Here: the settings, the result, and the data the search holds out; the sweep is sweep.py, pd's
second sweep pd_search.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np

from onnxq.calib.frontier import count, fit_memory
from onnxq.calib.pd_search import PredictionSweep
from onnxq.calib.simulate import Arrays, Simulation
from onnxq.calib.sweep import Sweep, sweep_items
from onnxq.progress import Progress
from onnxq.quant.kernels import FULL_RANGE, WeightRangeChoice
from onnxq.quant.plan import QuantPlan
from onnxq.quant.weights import QuantizedWeight


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
    kind = PredictionSweep if settings.method == "pd" else Sweep
    sweep = kind(sim, plan, settings, fixed_ranges or {}, started)
    progress.stage(f"calibrate ({settings.method}): {count(search)} samples", total=len(sweep_items(sim)))
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
            f"calibrate (pd, λ={settings.pd_lambda:g})",
            total=sum(sweep.bits(i) < 8 for i in sweep_items(sim)),
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
