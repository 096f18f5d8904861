"""A model left float for speed because equalization's moves kept its HardSwish nodes off their
integer kernels is quantized again without those moves (onnxq.pipeline's retry)."""

from __future__ import annotations

import numpy as np
import pytest

import onnxq
from onnxq import speed
from tests.test_speed import deep_hardswish_cnn, quantize_timed


def test_a_model_left_float_because_equalization_kept_its_hardswish_off_integer_kernels_is_retried(
    monkeypatch,
):
    """Equalization's move beside the HardSwish (made here at any spread) keeps it off integer
    kernels, and every plan runs slower than float; quantized again without the move, the
    HardSwish runs as QLinearAdd and QLinearMul and the model faster than float: that is kept."""
    from onnxq.passes import equalize
    from onnxq.passes.integer_hardswish import integer_hardswishes

    monkeypatch.setattr(equalize, "INTEGER_SPREAD", 1.0)
    result = quantize_timed(monkeypatch, deep_hardswish_cnn(), [[1.0, 2.0], [1.0, 2.0, 1.9], [1.0, 0.8]])
    assert result.quantized_nodes > 0
    assert integer_hardswishes(result.model) == 1
    assert result.notes[0].startswith("speed: the first plan ran slower than float, and 1 of equalization's")
    assert not any(note.startswith("warning: nothing is quantized") for note in result.notes)
    assert not any(note.startswith("equalized the channels") for note in result.notes)


def test_a_retried_model_below_min_sqnr_leaves_the_float_model_standing(monkeypatch):
    """--min-sqnr refuses the retried quantized model; the first run's float model met it, so
    it is saved, and the notes give the error."""
    from onnxq.passes import equalize

    monkeypatch.setattr(equalize, "INTEGER_SPREAD", 1.0)
    answers = iter([[1.0, 2.0], [1.0, 2.0, 1.9], [1.0, 0.8]])
    monkeypatch.setattr(speed, "compare", lambda models, feed: next(answers))
    data = np.random.default_rng(0).standard_normal((32, 3, 8, 8)).astype(np.float32)
    result = onnxq.quantize(deep_hardswish_cnn(), data, onnxq.QuantConfig(min_sqnr=100.0))
    assert result.quantized_nodes == 0
    assert result.fidelity.min_sqnr > 100
    assert "is below --min-sqnr 100 dB" in result.notes[-1] and result.notes[-1].endswith("left float")


@pytest.mark.parametrize("rewinds", [False, True], ids=["one-shot", "rewinds"])
def test_a_calibration_reader_is_read_again_for_the_retry_only_where_it_rewinds(monkeypatch, rewinds):
    """A reader without `rewind` is read once: the model left float for speed stays float. One
    with `rewind` (onnxruntime's CalibrationDataReader may have it) is rewound and read again."""
    from onnxq.passes import equalize

    data = np.random.default_rng(0).standard_normal((32, 3, 8, 8)).astype(np.float32)

    class OneShot:
        def __init__(self) -> None:
            self.start()

        def start(self) -> None:
            self.items = iter([{"input": data[i : i + 8]} for i in range(0, len(data), 8)])

        def get_next(self):
            return next(self.items, None)

    class Rewinding(OneShot):
        def rewind(self) -> None:
            self.start()

    monkeypatch.setattr(equalize, "INTEGER_SPREAD", 1.0)
    answers = iter([[1.0, 2.0], [1.0, 2.0, 1.9], *([[1.0, 0.8]] if rewinds else [])])  # one more ends it
    monkeypatch.setattr(speed, "compare", lambda models, feed: next(answers))
    reader = Rewinding() if rewinds else OneShot()
    result = onnxq.quantize(deep_hardswish_cnn(), reader, onnxq.QuantConfig())
    assert (result.quantized_nodes > 0) == rewinds
    assert any("quantized again" in note for note in result.notes) == rewinds
