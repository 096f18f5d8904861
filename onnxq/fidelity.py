"""How closely the quantized model follows the float one, measured before anything is saved.

Run on calibration samples held back from calibration, at onnxruntime's default optimization
level (the integer kernels users deploy). Per output: SQNR, cosine and, where the output looks
like class scores, top-1 agreement. An output that concatenates parts of very different
magnitudes (a detector's box pixels beside its 0..1 scores) is also measured per part: the
whole-output SQNR is the large part's, and a score map that lost most of its signal would hide
behind it. When an output falls short, the layers that lose most are
found by comparing every layer's float and quantized output tensors (the simulated QDQ graph):
a layer's loss is how far its output's SQNR falls below that of its input.
The per-output arithmetic, shared with `onnxq eval`, is onnxq.comparison.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxq import selections
from onnxq.calib import frontier
from onnxq.calib.data import Batch
from onnxq.calib.runner import fixed_batch
from onnxq.comparison import (  # noqa: F401  (AGREEMENT_CHANCE, WARN_AGREEMENT: the check's limits)
    AGREEMENT_CHANCE,
    CLOSE_SQNR_DB,
    WARN_AGREEMENT,
    OutputComparison,
    OutputFidelity,
    TensorSums,
    db,
)
from onnxq.errors import float_model_overflows
from onnxq.io import run, session
from onnxq.validate import first_not_finite

HELD_BACK = 16  # samples kept out of calibration for the check
MIN_CALIBRATION = 64  # below this many samples nothing is held back: the check runs in-sample
# warn below this output SQNR (all-8-bit plans, lower widths) or below WARN_AGREEMENT top-1 agreement
WARN_SQNR_DB = {8: CLOSE_SQNR_DB, 0: 8.0}
LAYER_SAMPLES = 4  # samples the per-layer search for the culprits runs on
WORST_LAYERS = 3
# What the warning suggests below 8 bits without --refine (BENCHMARKS.md "Rounding refinement
# against issue 14's targets"; the mse search instead of the default ranges moved MobileNetV2 W4A8
# only from KL 0.151 to 0.144 on held-out calibration images, ResNet-20 not at all)
REFINE_HINT = (
    "  --refine learns each weight's rounding and the activation steps by gradient (pip install "
    "'onnxq[refine]'; minutes to tens of minutes on a CPU): MobileNetV2 W4A4 62.0 → 69.4 % top-1"
)
# Said where the check ran in-sample: the range rule, the fallback and the switches were chosen on
# those samples too. YOLOv8n (NudeNet) at W8A8 on 16 images: scores 20.0 dB in-sample, 8.4 dB on
# its other 16 calibration images (BENCHMARKS.md "What learned rounding does to 8-bit detectors").
IN_SAMPLE_CAUTION = (
    f"fidelity check in-sample: the plan was chosen on these samples, so the figures above flatter it; "
    f"{MIN_CALIBRATION} or more samples hold {HELD_BACK} back for a check on samples it never saw"
)
EXACT_DB = 60.0  # an input this close to float counts as exact when ranking the falls


@dataclass
class Fidelity:
    samples: int
    held_back: bool  # False: measured on calibration samples (too few to hold any back)
    outputs: list[OutputFidelity]
    threshold_db: float
    worst_layers: list[tuple[str, float, float]] = field(default_factory=list)  # layer, dB in, dB out
    layers: list[tuple[str, float, float]] = field(default_factory=list)  # every layer (--layer-report)

    @property
    def judged(self) -> list[OutputFidelity]:
        """The outputs and tensors the check judges (not those picked by indices)."""
        return [o for o in self.outputs if o.judged]

    @property
    def min_sqnr(self) -> float:
        return min((o.sqnr_db for o in self.judged), default=float("inf"))

    @property
    def lowest(self) -> OutputFidelity | None:
        """The judged output (or output part, or candidate tensor) furthest from float."""
        return min(self.judged, key=lambda o: o.sqnr_db, default=None)

    @property
    def lowest_agreement(self) -> float | None:
        agreements = [o.agreement for o in self.judged if o.agreement is not None]
        return min(agreements) if agreements else None

    @property
    def disagrees(self) -> bool:
        """Whether some output's top-1 agreement is below WARN_AGREEMENT (beyond chance where
        its output is close: 16 samples cannot tell 87.5 % from 90 %, and a false alarm also
        sets off the fallback)."""
        return any(o.disagrees for o in self.judged)

    @property
    def poor(self) -> bool:
        return self.min_sqnr < self.threshold_db or self.disagrees

    def lines(self) -> list[str]:
        where = "held-back samples" if self.held_back else "calibration samples (too few to hold any back)"
        lines = [f"fidelity on {self.samples} {where}: {text}" for text in self._described()]
        if not self.held_back and self.min_sqnr < float("inf"):
            lines.append(IN_SAMPLE_CAUTION)
        return lines

    def _described(self) -> list[str]:
        """Each output; of the tensors a picked output picks from, only the lowest and how many
        more (a torchvision detector's per-level NMS gathers from a dozen of them)."""
        texts, shown = [], set()
        for output in self.outputs:
            if output.picks_for is None:
                texts.append(str(output))
                continue
            if output.picks_for in shown:
                continue
            shown.add(output.picks_for)
            group = [o for o in self.outputs if o.picks_for == output.picks_for]
            lowest = min(group, key=lambda o: o.sqnr_db)
            texts.append(
                str(lowest) + (f" (the lowest of {len(group)} such tensors)" if len(group) > 1 else "")
            )
        return texts

    def warnings(self, suggest_refine: bool = False) -> list[str]:
        """The warning and the culprits; `suggest_refine`: widths below 8 bits without --refine,
        where learned rounding is what helped (at 8 bits no option did better than the
        defaults on the zoo: the mse search lowered the lowest output SQNR on 6 of 7 models)."""
        if not self.poor:
            return []
        measured = f"lowest output SQNR {self.min_sqnr:.1f} dB"
        if self.disagrees:  # name what set the warning off
            measured += f", top-1 agreement {100 * self.lowest_agreement:.1f} %"
        text = [
            f"warning: the quantized model departs from the float model ({measured}; warned below "
            f"{self.threshold_db:g} dB or {100 * WARN_AGREEMENT:g} % agreement): check it on your own "
            "data before deploying"
        ]
        text += [
            f"  loses most: {layer} (SQNR of its input {db(before)}, of its output {after:.1f} dB)"
            for layer, before, after in self.worst_layers
        ]
        if suggest_refine:
            text.append(REFINE_HINT)
        return text


class HoldBack:
    """Delays a stream by its last batches, which it keeps for the fidelity check.

    Streams have no length up front: the last batches holding at least HELD_BACK samples are
    withheld; if the stream ends with fewer than MIN_CALIBRATION samples, they are handed on
    after all (calibration needs them more) and the check runs in-sample.
    """

    def __init__(self) -> None:
        self.batches: list[Batch] = []
        self.held_back = False

    def split(self, stream: Iterable[Batch]) -> Iterator[Batch]:
        queue: list[Batch] = []
        total = 0
        for batch in stream:
            queue.append(batch)
            total += frontier.count(batch)
            while len(queue) > 1 and sum(frontier.count(b) for b in queue[1:]) >= HELD_BACK:
                yield queue.pop(0)
        if total < MIN_CALIBRATION:
            yield from queue
        else:
            self.held_back = True
        self.batches = queue


def measure(
    float_model: onnx.ModelProto, quantized: onnx.ModelProto, samples: list[Batch], lowest_bits: int
) -> Fidelity:
    """Per-output SQNR, cosine and agreement of `quantized` against `float_model` on `samples`;
    outputs picked by indices are reported, and what they pick from is judged in their place
    (onnxq.selections: fetching those tensors may keep onnxruntime from fusing their producers)."""
    found = selections.find(float_model)
    extra = selections.fetchable(found, float_model, quantized)
    reference = session(float_model, outputs=extra)
    deployed = session(quantized, outputs=extra)
    graph_outputs = [o.name for o in float_model.graph.output]
    names = [*graph_outputs, *extra]  # candidates are never outputs
    fixed = fixed_batch(float_model) is not None
    batches = first_samples(samples, None, whole=fixed)
    comparison = OutputComparison(names, found)
    for batch in batches:
        wanted = run(reference, batch, names)
        if (overflowing := first_not_finite(graph_outputs, wanted)) is not None:
            raise float_model_overflows(overflowing)  # no SQNR to report against
        comparison.add(wanted, run(deployed, batch, names), frontier.count(batch))
    outputs = comparison.results()
    threshold = WARN_SQNR_DB[8] if lowest_bits >= 8 else WARN_SQNR_DB[0]
    return Fidelity(sum(frontier.count(b) for b in samples), False, outputs, threshold)


def worst_layers(
    float_model: onnx.ModelProto,
    quantized: onnx.ModelProto,
    layers: list[tuple[str, str, str]],
    samples: list[Batch],
    count: int = WORST_LAYERS,
) -> list[tuple[str, float, float]]:
    """The layers (node, input tensor, output tensor) whose output SQNR falls most below their
    input's, on a few samples, comparing float tensors of the float and the QDQ graph."""
    losses = [
        (node, before, after)
        for node, before, after in layer_errors(float_model, quantized, layers, samples)
        if np.isfinite(after) and after < before
    ]
    losses.sort(key=lambda item: item[2] - min(item[1], EXACT_DB))  # largest fall first
    return losses[:count]


def layer_errors(
    float_model: onnx.ModelProto,
    quantized: onnx.ModelProto,
    layers: list[tuple[str, str, str]],
    samples: list[Batch],
) -> list[tuple[str, float, float]]:
    """(node, SQNR of its input, SQNR of its output) for every layer in `layers` whose tensors
    both graphs hold, in their order, on the first LAYER_SAMPLES samples: the error each layer
    receives and what it passes on (the per-layer report, and the culprits of a poor model)."""
    both = _tensor_names(float_model) & _tensor_names(quantized)
    layers = [layer for layer in layers if layer[1] in both and layer[2] in both]
    tensors = sorted({t for _, source, target in layers for t in (source, target)})
    sums = {t: TensorSums() for t in tensors}
    reference = session(float_model, outputs=tensors, optimize=False)
    simulated = session(quantized, outputs=tensors, optimize=False)
    fixed = fixed_batch(float_model) is not None
    for batch in first_samples(samples, LAYER_SAMPLES, whole=fixed):
        for name, want, got in zip(
            tensors, run(reference, batch, tensors), run(simulated, batch, tensors), strict=True
        ):
            sums[name].add(want, got)
    return [(node, sums[source].sqnr(), sums[target].sqnr()) for node, source, target in layers]


def compare_outputs(
    names: list[str],
    runs: Iterable[tuple[list[np.ndarray], list[np.ndarray]]],
    found: selections.Selections | None = None,
) -> list[OutputFidelity]:
    """Fidelity of each output, and of its parts, over (float outputs, quantized outputs) runs;
    `found`: which of them are picked by indices, and which are what those pick from."""
    comparison = OutputComparison(names, found)
    for wanted, got in runs:
        comparison.add(wanted, got)
    return comparison.results()


def first_samples(batches: list[Batch], limit: int | None, whole: bool) -> Iterator[Batch]:
    """Up to `limit` samples (None: all), one at a time, so that a run holds one sample's
    tensors (a 640×640 detector's are large), or whole batches where the batch size is fixed."""
    taken = 0
    for batch in batches:
        for start in [0] if whole else range(frontier.count(batch)):
            if limit is not None and taken >= limit:
                return
            part = batch if whole else {k: v[start : start + 1] for k, v in batch.items()}
            taken += frontier.count(part)
            yield part


def _tensor_names(model: onnx.ModelProto) -> set[str]:
    return {i.name for i in model.graph.input} | {o for n in model.graph.node for o in n.output}
