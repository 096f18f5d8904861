"""Where an activation's range may stop below: a tensor that only a SiLU or a HardSwish reads keeps
nothing of its far negative values, so its Q/DQ range need not reach them (the plan's floors)."""

from __future__ import annotations

from dataclasses import replace

import onnx_ir as ir

from onnxq.passes.graph_utils import computed_values
from onnxq.quant.specs import QuantPlan

# x·σ(x) moves by under 8·σ(-8) < 0.003 below -8; HardSwish is exactly 0 below -3
SILU_FLOOR = -8.0
HARDSWISH_FLOOR = -3.0


def floor_flattened_ranges(graph: ir.Graph, plan: QuantPlan) -> None:
    """Activations that only a SiLU (Sigmoid and Mul of the same tensor) or a HardSwish reads keep
    nothing of their far negative values: their range stops at the floor. Pre-SiLU Conv outputs
    of detectors reach -60 to -186 while the SiLU makes all of it about 0 (yolov8n's second Conv:
    [-186, 141] → [-8, 141], half the step)."""
    values = computed_values(graph)
    for name, spec in list(plan.activations.items()):
        value = values.get(spec.tensor)
        if spec.shares is None and spec.observed == spec.tensor and value is not None:
            floor = _flattening_floor(value)
            if floor is not None:
                plan.activations[name] = replace(spec, floor=floor)


def _flattening_floor(value: ir.Value) -> float | None:
    users = [user for user, _ in value.uses()]
    if value.is_graph_output() or any(user.domain != "" for user in users):
        return None
    if [user.op_type for user in users] == ["HardSwish"]:
        return HARDSWISH_FLOOR
    if sorted(user.op_type for user in users) != ["Mul", "Sigmoid"]:
        return None
    sigmoid = next(user for user in users if user.op_type == "Sigmoid")
    mul = next(user for user in users if user.op_type == "Mul")
    return (
        SILU_FLOOR
        if {v.name for v in mul.inputs if v is not None} == {value.name, sigmoid.outputs[0].name}
        else None
    )
