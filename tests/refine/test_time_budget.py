"""--time-budget counts refinement's own overheads: the mirror built before the units, and the
last unit's evaluations before and after its learning, so that it does not overrun the budget
(an earlier unit's come out of the shares of the units after it)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import onnxq  # noqa: E402
from onnxq.refine import export, reconstruct, unit_learning  # noqa: E402
from tests.refine.common import FAST  # noqa: E402

EVALUATION_S = 10.0  # what each of a unit's evaluations costs on the fake clock


class FakeClock:
    """unit_learning's clock: it moves only when a unit's loss is evaluated."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def _quantize(model, data, **changes) -> onnxq.QuantResult:
    config = dict(FAST, weight_bits=4, activation_bits=4, refine_iters=8, refine_batch=8, time_budget=600.0)
    return onnxq.quantize(model, data, onnxq.QuantConfig(**{**config, **changes}))


def test_the_last_unit_learns_in_its_share_less_its_two_evaluations(
    small_model, calibration_data, monkeypatch
):
    clock = FakeClock()
    monkeypatch.setattr(unit_learning, "time", clock)
    real_evaluate, real_learn, real_run = (
        unit_learning.UnitJob.evaluate,
        unit_learning.UnitJob._learn,
        unit_learning.UnitJob.run,
    )
    shares, learning = [], []

    def evaluate(self):
        clock.now += EVALUATION_S
        return real_evaluate(self)

    def run(self, seconds, progress):
        shares.append(seconds)
        return real_run(self, seconds, progress)

    def learn(self, seconds, progress):
        learning.append(seconds)
        return real_learn(self, seconds, progress)

    monkeypatch.setattr(unit_learning.UnitJob, "evaluate", evaluate)
    monkeypatch.setattr(unit_learning.UnitJob, "run", run)
    monkeypatch.setattr(unit_learning.UnitJob, "_learn", learn)
    result = _quantize(small_model, calibration_data)
    assert len(result.refinement.units) > 1 and len(learning) == len(shares) == len(result.refinement.units)
    assert learning[:-1] == shares[:-1]  # the units after them take their overheads
    assert learning[-1] == pytest.approx(shares[-1] - 2 * EVALUATION_S)


def test_without_a_budget_a_unit_learns_without_a_share(small_model, calibration_data, monkeypatch):
    learning = []
    real_learn = unit_learning.UnitJob._learn

    def learn(self, seconds, progress):
        learning.append(seconds)
        return real_learn(self, seconds, progress)

    monkeypatch.setattr(unit_learning.UnitJob, "_learn", learn)
    _quantize(small_model, calibration_data, time_budget=None)
    assert learning and set(learning) == {None}


def test_the_units_get_the_budget_less_the_mirror_built_first(small_model, calibration_data, monkeypatch):
    given, received = [], []
    real_refine, real_reconstruct = export.refine, export.reconstruct

    def refine(model, plan, activations, weights, biases, data, settings, *args, **kwargs):
        given.append(settings.time_budget)
        return real_refine(model, plan, activations, weights, biases, data, settings, *args, **kwargs)

    def reconstructing(mirror, units, data, settings, progress, correction):
        received.append(settings.time_budget)
        return real_reconstruct(mirror, units, data, settings, progress, correction)

    monkeypatch.setattr(export, "refine", refine)
    monkeypatch.setattr(export, "reconstruct", reconstructing)
    _quantize(small_model, calibration_data)
    assert len(given) == len(received) == 1 and 0 < received[0] < given[0]


def test_the_last_unit_runs_no_inputs_for_a_unit_after_it(small_model, calibration_data, monkeypatch):
    quantized_runs = []
    real = reconstruct._run_all

    def recording(mirror, unit, batches, *, quantized, names=None):
        if quantized:
            quantized_runs.append(unit)
        return real(mirror, unit, batches, quantized=quantized, names=names)

    monkeypatch.setattr(reconstruct, "_run_all", recording)
    result = _quantize(small_model, calibration_data, time_budget=None)
    units = result.refinement.units
    assert len(units) > 1 and len(quantized_runs) == len(units) - 1
