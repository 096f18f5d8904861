"""`--refine` kept only where it leaves the outputs no further from float than the search alone.

Refinement learns each unit towards the float model's tensors at the unit's own outputs. Where
those tensors are features whose errors the outputs weigh very differently, a unit can lower its
own loss and still move an output away: on a YOLOv8n detector (W4, 100 iterations per unit, on
16 calibration samples) refinement lifted the boxes from 26.6 to 30.6 dB on held-out calibration
samples and lowered the class scores from 5.9 to 5.0 dB, below the scale search alone
(tools/bench_detector_refine.py). So the model built without refinement's integers and steps is
measured beside the refined one on the check's samples, and replaces it where its lowest output
is MIN_GAIN_DB closer to float: a user who asked for `--refine` never gets a model that the
scale search alone beats by the check's own measure.
"""

from __future__ import annotations

import onnx

from onnxq import fidelity
from onnxq.calib.data import Batch
from onnxq.config import QuantConfig
from onnxq.tune.candidate import Candidate

# The search's model must be this much closer to float (lowest output SQNR, dB) to replace the
# refined one: the check's samples are few, and without held-back samples they are the ones
# refinement learned on.
MIN_GAIN_DB = 0.5


def keep_refinement(
    float_model: onnx.ModelProto,
    refined: Candidate,
    searched: Candidate,
    samples: list[Batch],
    config: QuantConfig,
    held_back: bool = True,
) -> tuple[bool, list[str]]:
    """Whether the refined model stays (else the search's replaces it), and a note saying why;
    `held_back`: whether `samples` were kept from calibration (else refinement learned on them)."""
    with_it, without = (
        fidelity.measure(float_model, candidate.model, samples, config.lowest_bits)
        for candidate in (refined, searched)
    )
    figures = (
        f"lowest output SQNR {with_it.min_sqnr:.1f} dB refined, {without.min_sqnr:.1f} dB from the "
        f"scale search alone, on {with_it.samples} "
        + ("held-back samples" if held_back else "samples refinement learned on (too few to hold any back)")
    )
    if without.min_sqnr < with_it.min_sqnr + MIN_GAIN_DB:
        return True, [f"refinement kept: {figures}"]
    where = f" (at {with_it.lowest.name})" if with_it.lowest is not None else ""
    return False, [
        f"refinement undone: it left the outputs further from float than the scale search alone{where}: "
        f"{figures}; the saved model has the search's integers and steps"
    ]
