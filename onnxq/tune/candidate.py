"""What the tuning steps pass around: a QDQ model with the plan it was built from, and how to
build another."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import onnx

from onnxq.quant.plan import QuantPlan, Replan


@dataclass
class Candidate:
    """A QDQ model, the plan it was built from, and its layers' (node, input, output) tensors."""

    model: onnx.ModelProto
    plan: QuantPlan
    layers: list[tuple[str, str, str]]


Ranges = dict[str, tuple[float, float]]  # observed activation → its clipping range
Build = Callable[[QuantPlan], Candidate]


@dataclass(frozen=True)
class Rebuild:
    """How the tuning steps make and check models from the same calibration: a builder per set
    of activation ranges, the plan again with layers kept float, and the check a model other
    than the first must pass before it is reported."""

    builder: Callable[[Ranges], Build]
    replan: Replan
    validate: Callable[[onnx.ModelProto], None]
