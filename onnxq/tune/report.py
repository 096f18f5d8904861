"""The saved model's fidelity report, and `--min-sqnr`'s error."""

from __future__ import annotations

import onnx

from onnxq import fidelity
from onnxq.calib.data import Batch
from onnxq.config import QuantConfig
from onnxq.errors import OnnxqError
from onnxq.fidelity import Fidelity
from onnxq.tune.candidate import Candidate


def final_report(
    float_model: onnx.ModelProto,
    best: Candidate,
    samples: list[Batch],
    held_back: bool,
    config: QuantConfig,
    measured: Fidelity | None = None,
) -> Fidelity:
    """The saved model's fidelity (`measured` when already known); the layers that lose most
    when it falls short; an error below `config.min_sqnr` (scripted use: nothing is saved)."""
    report = measured or fidelity.measure(float_model, best.model, samples, config.lowest_bits)
    report.held_back = held_back
    below = config.min_sqnr is not None and report.min_sqnr < config.min_sqnr
    if report.poor or below:
        report.worst_layers = fidelity.worst_layers(float_model, best.model, best.layers, samples)
    if config.layer_report:
        report.layers = fidelity.layer_errors(float_model, best.model, best.layers, samples)
    if below:
        worst = f"; loses most: {report.worst_layers[0][0]}" if report.worst_layers else ""
        raise OnnxqError(
            f"output SQNR {report.min_sqnr:.1f} dB is below --min-sqnr {config.min_sqnr:g} dB{worst}"
        )
    return report
