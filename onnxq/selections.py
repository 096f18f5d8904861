"""Outputs picked by indices (TopK, ArgMax, NonMaxSuppression): judged by what they pick from.

A detector that exports its post-process picks its top-k boxes by score. Where candidates are
near-tied, quantization noise far below any visible change swaps their places, and the picked
output, compared position by position, looks broken: an SSD-style head whose decoded boxes kept
94.4 dB picked them with 41 % of its top-50 indices changed (98.8 % of the same set) and scored
7.2 dB, which set off the fidelity warning and the fallback for nothing. So such an output is
reported but not judged; what it picks from (TopK's scores, the boxes GatherElements reads) is
judged in its place, and those tensors are fetched as extra outputs of both models.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx

from onnxq.calib.runner import with_outputs
from onnxq.passes.infer_types import typed_structure

# op type → positions of its outputs that are indices chosen by comparing float values (an
# ArgMax over int64 token ids, as CLIP's text encoder picks its end token, is exact: not one)
INDEX_OUTPUTS = {"TopK": (1,), "ArgMax": (0,), "ArgMin": (0,), "NonMaxSuppression": (0,)}
# Equal(MaxPool(x), x): where x peaks locally, the in-graph NMS of a CenterNet-style heat map. A
# near-flat neighbourhood's peak moves with noise far below any visible change, so what the mask
# keeps is picked like TopK's indices: a CenterNet export's masked heat map scored 12 dB while its
# top-20 scores kept 71 dB. Only this idiom: an Equal elsewhere (Swin's shifted-window mask) may
# sit upstream of everything, and would leave nothing judged.
PEAK_MASK = "MaxPool peaks"


@dataclass(frozen=True)
class Selections:
    """Graph outputs picked by indices, and the float tensors they pick from."""

    picked: dict[str, str] = field(default_factory=dict)  # output → the op whose indices pick it
    candidates: dict[str, str] = field(default_factory=dict)  # tensor → the picked output it feeds


def find(model: onnx.ModelProto) -> Selections:
    """The model's outputs that depend on an index output (INDEX_OUTPUTS), and for each, the
    float tensors the nodes on that dependency read that do not depend on one themselves (not
    constants, graph inputs or outputs)."""
    graph = model.graph
    if not any(node.op_type in INDEX_OUTPUTS or node.op_type == "Equal" for node in graph.node):
        return Selections()
    floats = _float_tensors(typed_structure(model).graph)
    picked_by = _picked_tensors(graph, floats)
    outputs = [o.name for o in graph.output if o.name in picked_by]
    if not outputs:
        return Selections()
    # constants and inputs are exact, and an output is judged as one already
    known = {t.name for t in graph.initializer} | {v.name for v in [*graph.input, *graph.output]}
    producers = {name: node for node in graph.node for name in node.output}
    candidates: dict[str, str] = {}
    for output in outputs:
        for name in _read_on_the_way(output, producers, picked_by):
            if name in floats and name not in known and name not in picked_by:
                candidates.setdefault(name, output)
    return Selections({o: picked_by[o] for o in outputs}, candidates)


def judged_model(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """The model also returning its candidate tensors, and the tensors whose fidelity is judged:
    its outputs not picked by indices, then the candidates (for runs of the tunable graph)."""
    found = find(model)
    extra = fetchable(found, model)
    outputs = [o.name for o in model.graph.output]
    judged = [name for name in outputs if name not in found.picked]
    return with_candidates(model, extra), [*judged, *extra]  # candidates are never outputs


def fetchable(selections: Selections, *models: onnx.ModelProto) -> list[str]:
    """The candidate tensors every one of `models` computes (a QDQ model keeps float tensors'
    names; one renamed or folded away is left out)."""
    computed = [{name for node in model.graph.node for name in node.output} for model in models]
    return [name for name in selections.candidates if all(name in names for names in computed)]


def with_candidates(model: onnx.ModelProto, tensors: list[str]) -> onnx.ModelProto:
    """The model also returning `tensors` (the model itself where there are none)."""
    return with_outputs(model, tensors) if tensors else model


def _picked_tensors(graph: onnx.GraphProto, floats: set[str]) -> dict[str, str]:
    """Each tensor that depends on an index output of an op comparing float values, or on a peak
    mask (PEAK_MASK) → the op type (or PEAK_MASK) of the first such op behind it (nodes in
    topological order, as ONNX requires)."""
    picked: dict[str, str] = {}
    producers: dict[str, onnx.NodeProto] = {}
    for node in graph.node:
        source = next((picked[name] for name in node.input if name in picked), None)
        if source is not None:
            picked.update(dict.fromkeys((o for o in node.output if o), source))
        compares_floats = bool(node.input) and node.input[0] in floats
        for position in INDEX_OUTPUTS.get(node.op_type, ()) if compares_floats else ():
            if position < len(node.output) and node.output[position]:
                picked.setdefault(node.output[position], node.op_type)
        if compares_floats and _peak_mask(node, producers):
            picked.setdefault(node.output[0], PEAK_MASK)
        producers.update(dict.fromkeys(node.output, node))
    return picked


def _peak_mask(node: onnx.NodeProto, producers: dict[str, onnx.NodeProto]) -> bool:
    """Equal(MaxPool(x), x), either way round."""
    if node.op_type != "Equal" or len(node.input) != 2:
        return False
    pairs = (node.input, node.input[::-1])
    return any(
        (pool := producers.get(one)) is not None and pool.op_type == "MaxPool" and pool.input[0] == other
        for one, other in pairs
    )


def _read_on_the_way(output: str, producers: dict[str, onnx.NodeProto], picked: dict[str, str]) -> list[str]:
    """The inputs of the nodes that carry indices to `output`, and of the index ops themselves,
    walking back from it through picked tensors only."""
    seen, stack, read = set(), [output], []
    while stack:
        node = producers.get(stack.pop())
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        for name in node.input:
            if not name:
                continue
            read.append(name)
            if name in picked:
                stack.append(name)
    return list(dict.fromkeys(read))


def _float_tensors(graph: onnx.GraphProto) -> set[str]:
    infos = [*graph.value_info, *graph.input, *graph.output]
    return {info.name for info in infos if info.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
