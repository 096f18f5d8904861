"""A fixed-batch model's mirror, run on many samples at once where its batch is baked into Reshape
targets only.

torch.onnx.export, dynamo by default since torch 2.9, fixes the batch at the example's (one image)
unless told otherwise, and writes `flatten` as Reshape(x, [1, 64]). The mirror then runs one sample
at a time (Mirror.fixed_batch): correct, but refining a static export of ResNet-20 took 212 s
against 46 s for the same network with a free batch (W4A4, 100 iterations per unit).

Every constant Reshape target leaves its leading entry to the data: -1 (what the other entries
leave; the dynamo exporter sets allowzero, so 0 would mean an empty axis), or, where another entry
is -1 already and the leading one is the batch N that the data leads with, 0 (the data's leading
dimension, allowzero unset); every input's batch becomes a dimension variable. A tensor the batch
does not reach keeps its size, so -1 gives it the same shape; one whose batch is folded with what
follows (a transformer's [N·heads, tokens, size]) gets it scaled by the batch, as it should. The
copy is used only if onnxruntime, given two runs' samples at once, returns each run's outputs as
the fixed model does on that run alone: a batch baked in anywhere else (an Expand to [1, …]
concatenated with the data, a Split of the batch) fails that check, and the mirror keeps running N
samples at a time. For batch N the copy computes what the model computes, so what is learned on it
holds for the model.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from onnxq.calib.runner import fixed_batch, leading_size
from onnxq.io import session
from onnxq.passes.infer_types import typed_structure

BATCH = "onnxq_batch"  # the dimension variable the copy's inputs take
RTOL = 1e-4  # two samples at once against one at a time: float rounding apart


def freed_batch(model: onnx.ModelProto, samples: dict[str, np.ndarray]) -> onnx.ModelProto | None:
    """A copy of a fixed-batch `model` whose batch is free, checked on `samples`; None where the
    batch is free already, baked in elsewhere, or there are too few samples to check."""
    batch = fixed_batch(model)
    inputs = [i for i in model.graph.input if i.name in samples]
    if batch is None or not inputs or any(len(samples[i.name]) < 2 * batch for i in inputs):
        return None
    if any(leading_size(info) != batch for info in inputs):
        return None
    freed = onnx.ModelProto()
    freed.CopyFrom(model)
    _free_reshapes(freed, batch)  # perhaps none: the batch may be baked into the inputs alone
    for info in [*freed.graph.input, *freed.graph.output]:
        if info.name in samples or leading_size(info) == batch:
            dim = info.type.tensor_type.shape.dim[0]
            dim.Clear()
            dim.dim_param = BATCH
    del freed.graph.value_info[:]  # inferred for batch N
    return freed if _same_outputs(model, freed, samples, batch) else None


def _free_reshapes(model: onnx.ModelProto, batch: int) -> None:
    """Constant Reshape targets with their leading entry left to the data: -1 where no other entry
    is -1 (the batch, or the batch folded with what follows, as a transformer's [N·heads, t, d]),
    else 0 where the entry is the batch and the data leads with it."""
    leading = {info.name: leading_size(info) for info in _infos(typed_structure(model).graph)}
    constants = {tensor.name: tensor for tensor in model.graph.initializer}
    freed = 0
    for node in model.graph.node:
        if node.op_type != "Reshape" or node.domain or len(node.input) < 2 or node.input[1] not in constants:
            continue
        target = numpy_helper.to_array(constants[node.input[1]]).copy()
        if target.ndim != 1 or not target.size or target[0] in (-1, 0):
            continue
        copies = not any(a.name == "allowzero" and a.i for a in node.attribute)  # 0: the data's dim
        if -1 not in target and (copies or 0 not in target):
            target[0] = -1  # for a tensor the batch does not reach, the same: its size is fixed
        elif copies and target[0] == batch and leading.get(node.input[0]) == batch:
            target[0] = 0
        else:
            continue
        name = f"{node.input[1]}/{BATCH}/{freed}"
        model.graph.initializer.append(numpy_helper.from_array(target, name))
        node.input[1] = name
        freed += 1


def _infos(graph: onnx.GraphProto) -> list[onnx.ValueInfoProto]:
    return [*graph.input, *graph.value_info, *graph.output]


def _same_outputs(model: onnx.ModelProto, freed: onnx.ModelProto, samples, batch: int) -> bool:
    """Whether `freed` gives, on 2·batch samples at once, what `model` gives on each batch."""
    first = {name: np.ascontiguousarray(value[: 2 * batch]) for name, value in samples.items()}
    try:
        together = session(freed, optimize=False).run(None, first)
    except Exception:  # onnxruntime raises several private exception types: baked in elsewhere
        return False
    fixed = session(model, optimize=False)
    runs = [fixed.run(None, {k: v[i * batch : (i + 1) * batch] for k, v in first.items()}) for i in (0, 1)]
    for position, joint in enumerate(together):
        parts = [np.asarray(run[position]) for run in runs]
        if parts[0].ndim == 0 or parts[0].shape[0] != batch:
            return False  # an output without the batch axis: no way to tell the runs apart
        expected = np.concatenate(parts)
        joint = np.asarray(joint)
        if joint.shape != expected.shape or joint.dtype != expected.dtype:
            return False
        if joint.dtype.kind == "f":
            scale = max(float(np.abs(expected).max(initial=0.0)), 1e-30)
            if not np.allclose(joint, expected, rtol=RTOL, atol=RTOL * scale, equal_nan=True):
                return False
        elif not np.array_equal(joint, expected):
            return False
    return True
