"""pd's prediction term on part of each learning pass where the time budget binds: the float
remainder then runs on those samples only while learning, on every sample when a unit's loss is
measured, and on the whole batch wherever the budget leaves a unit its iterations."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import onnxq  # noqa: E402
from onnxq.refine import unit_learning  # noqa: E402
from tests.refine.common import FAST  # noqa: E402

BATCH, NARROW = 8, 3


def _remainder_rows(monkeypatch) -> list[tuple[bool, int]]:
    """(under autograd, samples) of every run of pd's float remainder."""
    rows: list[tuple[bool, int]] = []
    real = unit_learning.UnitJob._remainder

    def recording(self, env):
        first = next(v for v in env.values() if v.dim() > 0)
        rows.append((torch.is_grad_enabled(), first.shape[0]))
        return real(self, env)

    monkeypatch.setattr(unit_learning.UnitJob, "_remainder", recording)
    return rows


def _budget_allows(monkeypatch, more: int | None) -> None:
    """Each unit's timed pace allows `more` iterations beyond those done (None: all of them)."""

    def allowed(left, pace, done, total):
        return total if more is None else min(total, done + more)

    monkeypatch.setattr(unit_learning, "iterations_within", allowed)


def _refined(model, data, **changes) -> list[str]:
    settings = dict(
        FAST,
        weight_bits=4,
        activation_bits=4,
        refine_iters=12,
        refine_batch=BATCH,
        refine_loss="pd",
        refine_pd_samples=NARROW,
    )
    return onnxq.quantize(model, data, onnxq.QuantConfig(**{**settings, **changes})).notes


def _learning_rows(rows) -> set[int]:
    return {samples for graded, samples in rows if graded}


def test_a_binding_budget_narrows_pd_to_its_samples(small_model, calibration_data, monkeypatch):
    rows = _remainder_rows(monkeypatch)
    _budget_allows(monkeypatch, 2)
    notes = _refined(small_model, calibration_data, time_budget=600.0)
    assert _learning_rows(rows) == {BATCH, NARROW}  # timed on the whole batch, then narrowed
    assert any(f"pd's prediction term on {NARROW} of each batch's {BATCH} samples" in n for n in notes)
    measured = {samples for graded, samples in rows if not graded}
    assert measured and NARROW not in measured  # a unit's loss before and after: every sample


@pytest.mark.parametrize(
    "changes, more",
    [
        (dict(), None),  # no budget at all
        (dict(time_budget=600.0), None),  # a budget that leaves every unit its iterations
        (dict(time_budget=600.0, refine_pd_samples=0), 2),  # narrowing turned off
    ],
)
def test_pd_takes_every_sample_where_nothing_narrows_it(
    small_model, calibration_data, monkeypatch, changes, more
):
    rows = _remainder_rows(monkeypatch)
    _budget_allows(monkeypatch, more)
    notes = _refined(small_model, calibration_data, **changes)
    assert _learning_rows(rows) == {BATCH}
    assert not any("pd's prediction term on" in n for n in notes)


def test_pd_samples_are_checked():
    with pytest.raises(onnxq.OnnxqError, match="pd samples"):
        onnxq.QuantConfig(refine=True, refine_pd_samples=-1)
