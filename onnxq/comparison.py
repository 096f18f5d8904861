"""Float against quantized outputs, run by run: per output (and per part of an output that
concatenates parts of very different magnitudes, a detector's box pixels beside its 0..1
scores) SQNR, cosine, per-sample SQNR and, where the output looks like class scores, top-1
agreement; and whether that agreement is short of WARN_AGREEMENT beyond chance. onnxq.fidelity
(the check after quantizing) and `onnxq eval` both measure with it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from math import exp, lgamma, log

import numpy as np

from onnxq import selections
from onnxq.class_scores import looks_like_scores, rows_descend, topk_values

WARN_AGREEMENT = 0.9  # the check warns below this top-1 agreement
# Outputs this close (SQNR dB; the 8-bit warning threshold, onnxq.fidelity.WARN_SQNR_DB) flip
# top-1 only on near-ties, and there agreement warns only below WARN_AGREEMENT by more than
# chance: where a model agreeing WARN_AGREEMENT of the time would agree this rarely or less. On
# the check's 16 samples 2 flips (87.5 %) are what such a model shows half the time, 3 (81 %) a
# fifth of the time.
CLOSE_SQNR_DB = 20.0
AGREEMENT_CHANCE = 0.25
PART_RATIO = 10.0  # an output splits in two parts where every index of one is this much louder
PART_AXIS_SIZE = 1024  # longest axis searched for such a split


@dataclass(frozen=True)
class OutputFidelity:
    name: str
    sqnr_db: float
    cosine: float
    agreement: float | None  # top-1 agreement where the output is (samples, classes)
    equal: float | None = None  # integer outputs (class ids, indices): share of equal elements
    reshaped: int = 0  # runs whose output shape differs from float's (NMS, thresholds): skipped
    runs: int = 0
    compared: int = 0  # samples behind the agreement (0: unknown, the fraction is taken as it is)
    picked_by: str | None = None  # an output picked by this op's indices: reported, not judged
    picks_for: str | None = None  # a tensor the picked output of this name picks from: judged
    # SQNR of each sample alone: the pooled figure is the loud samples' (mobilenet_v3_small's
    # 20.8 dB hid single samples at 2-10 dB); None where runs did not say how many samples
    sample_median_db: float | None = None
    sample_lowest_db: float | None = None

    @property
    def judged(self) -> bool:
        return self.picked_by is None

    @property
    def disagrees(self) -> bool:
        """Whether top-1 agreement is below WARN_AGREEMENT; for a close output (CLOSE_SQNR_DB),
        by more than its samples' chance."""
        if self.agreement is None or self.agreement >= WARN_AGREEMENT:
            return False
        if not self.compared or self.sqnr_db < CLOSE_SQNR_DB:
            return True
        return _agrees_this_rarely(round(self.agreement * self.compared), self.compared) < AGREEMENT_CHANCE

    def __str__(self) -> str:
        what = f"output {self.name!r}"
        if self.picked_by is not None:
            source = self.picked_by if self.picked_by == selections.PEAK_MASK else f"{self.picked_by} indices"
            what += f" (picked by {source}, where near-ties swap places: not judged)"
        elif self.picks_for is not None:
            what = f"tensor {self.name!r} (what output {self.picks_for!r} is picked from)"
        if self.equal is not None:
            text = f"{what}: equal to float's in {100 * self.equal:.1f} % of elements"
        elif self.runs and self.reshaped == self.runs:  # every run skipped: nothing measured
            text = f"{what}:"
        else:
            text = f"{what}: SQNR {db(self.sqnr_db)}"
            if self.sample_median_db is not None and np.isfinite(self.sqnr_db):  # none beside exact
                text += (
                    f" (per sample: median {db(self.sample_median_db)}, lowest {db(self.sample_lowest_db)})"
                )
            text += f", cosine {self.cosine:.4f}"
            if self.agreement is not None:
                text += f", top-1 agreement {100 * self.agreement:.1f} %"
        if self.reshaped:
            text += (
                f"{';' if text[-1] != ':' else ''} shape differs from float's in {self.reshaped} of "
                f"{self.runs} runs (not compared)"
            )
        return text


def _agrees_this_rarely(agree: int, samples: int) -> float:
    """P(at most `agree` of `samples` agree) for a model that agrees WARN_AGREEMENT of the time
    (summed in logs: binomial coefficients of thousands of samples overflow a float)."""
    p = WARN_AGREEMENT
    log_total = lgamma(samples + 1)
    return sum(
        exp(log_total - lgamma(k + 1) - lgamma(samples - k + 1) + k * log(p) + (samples - k) * log(1 - p))
        for k in range(agree + 1)
    )


def db(value: float) -> str:
    return "exact" if value == float("inf") else f"{value:.1f} dB"


class OutputComparison:
    """compare_outputs fed one run at a time (`onnxq eval` streams batches to several models)."""

    def __init__(self, names: list[str], found: selections.Selections | None = None) -> None:
        self.names = names
        self.sums = {name: TensorSums() for name in names}
        self.found = found or selections.Selections()
        for name in self.found.candidates:  # a tensor picked from by position: no class scores
            if name in self.sums:
                self.sums[name].classes = False

    def add(self, wanted: list[np.ndarray], got: list[np.ndarray], samples: int | None = None) -> None:
        """One run's outputs; `samples`: how many samples the run took, where known."""
        for name, want, have in zip(self.names, wanted, got, strict=True):
            self.sums[name].add(want, have, samples)

    def results(self) -> list[OutputFidelity]:
        picked, candidates = self.found.picked, self.found.candidates
        return [
            dataclasses.replace(result, picked_by=picked.get(name), picks_for=candidates.get(name))
            for name in self.names
            if self.sums[name].runs
            for result in (self.sums[name].result(name), *self.sums[name].part_results(name))
        ]


class TensorSums:
    """Running sums of one tensor's float and quantized values, over batches."""

    def __init__(self) -> None:
        self.signal = self.noise = self.dot = self.quantized = 0.0
        self.agree = self.count = 0
        self.classes = True
        self.sorted_rows, self.width = 0, 0  # rows seen while every row came sorted (TopK's values)
        self.equal = self.elements = self.reshaped = self.runs = 0
        self.integer = False  # class ids, indices: compared element by element, no SQNR
        self.along: dict[int, _AxisSums] = {}  # axis → per-index sums, to split the output in parts
        self.sample_db: list[float] = []  # each sample's SQNR, where runs say how many they hold

    def add(self, want: np.ndarray, got: np.ndarray, samples: int | None = None) -> None:
        """One run's values; `samples`: how many samples the run took, where known."""
        self.runs += 1
        if want.shape != got.shape:
            self.reshaped += 1
            return
        self.classes = self.classes and looks_like_scores(want, samples)
        if want.dtype.kind in "biu":
            self.integer = True
            self.equal += int((want == got).sum())
            self.elements += want.size
            return
        want, got = want.astype(np.float64), got.astype(np.float64)
        error = want - got
        self.signal += float(np.vdot(want, want))
        self.noise += float(np.vdot(error, error))
        self.dot += float(np.vdot(want, got))
        self.quantized += float(np.vdot(got, got))
        if samples and want.ndim and len(want) == samples:
            self.sample_db += _row_sqnr(want, error)
        for axis in _part_axes(want.shape):
            self.along.setdefault(axis, _AxisSums(axis, want.shape[axis])).add(want, got, error)
        scores = want.reshape(len(want), -1) if want.ndim else want.reshape(1, -1)
        self._count_sorted(scores)
        if self.classes:
            self.agree += int((scores.argmax(1) == got.reshape(scores.shape).argmax(1)).sum())
        self.count += len(scores)

    def _count_sorted(self, scores: np.ndarray) -> None:
        if self.sorted_rows < 0:  # an unsorted row seen already
            return
        self.width = scores.shape[1]
        self.sorted_rows = self.sorted_rows + len(scores) if rows_descend(scores) else -1

    def sqnr(self) -> float:
        if self.integer or self.noise == 0:
            return float("inf")
        return 10 * np.log10(self.signal / self.noise) if self.signal > 0 else float("-inf")

    def result(self, name: str) -> OutputFidelity:
        norm = np.sqrt(self.signal * self.quantized)
        cosine = self.dot / norm if norm > 0 else float(self.signal == self.quantized)
        classes = self.classes and not topk_values(self.sorted_rows, self.width)
        agreement = self.agree / self.count if classes and self.count and not self.integer else None
        equal = self.equal / self.elements if self.integer and self.elements else None
        compared = self.count if agreement is not None else 0
        per_sample = np.asarray(self.sample_db) if len(self.sample_db) > 1 and not self.integer else None
        return OutputFidelity(
            name,
            self.sqnr(),
            float(cosine),
            agreement,
            equal,
            self.reshaped,
            self.runs,
            compared,
            sample_median_db=float(np.median(per_sample)) if per_sample is not None else None,
            sample_lowest_db=float(per_sample.min()) if per_sample is not None else None,
        )

    def part_results(self, name: str) -> list[OutputFidelity]:
        """The two parts of the output whose magnitudes differ most, where every index of one
        is PART_RATIO times louder than every index of the other; none otherwise."""
        splits = ((*axis.best_split(), axis) for axis in self.along.values())
        gap, cut, axis = max(splits, key=lambda split: split[0], default=(0.0, 0, None))
        if axis is None or gap < PART_RATIO:
            return []
        return [axis.part(name, start, stop) for start, stop in ((0, cut), (cut, axis.size))]


def _row_sqnr(want: np.ndarray, error: np.ndarray) -> list[float]:
    """SQNR of each sample (row of the batch axis) alone: exact where it has no error."""
    signal = (want * want).reshape(len(want), -1).sum(axis=1)
    noise = (error * error).reshape(len(want), -1).sum(axis=1)
    with np.errstate(divide="ignore"):
        ratio = np.where(noise > 0, signal / np.where(noise > 0, noise, 1), np.inf)
        return [float(v) for v in 10 * np.log10(ratio)]


class _AxisSums:
    """Per-index sums along one axis of an output, for the SQNR and cosine of a slice of it."""

    def __init__(self, axis: int, size: int) -> None:
        self.axis, self.size = axis, size
        self.signal, self.noise, self.dot, self.quantized, self.elements = (np.zeros(size) for _ in range(5))
        self.ragged = False  # outputs of changing length along this axis: no parts there

    def add(self, want: np.ndarray, got: np.ndarray, error: np.ndarray) -> None:
        if want.shape[self.axis] != self.size:
            self.ragged = True
        if self.ragged:
            return
        others = tuple(a for a in range(want.ndim) if a != self.axis)
        self.signal += (want * want).sum(axis=others)
        self.noise += (error * error).sum(axis=others)
        self.dot += (want * got).sum(axis=others)
        self.quantized += (got * got).sum(axis=others)
        self.elements += want.size / self.size

    def best_split(self) -> tuple[float, int]:
        """(gap, cut) for the cut that best separates the indices' log RMS into two groups
        (Otsu's criterion); gap: how many times the quietest index of the loud part is louder
        than the loudest of the quiet part (0 where there is no such cut). Each part holds two
        indices at least, so a lone silent channel (a class that never fires) is no part."""
        if self.ragged or self.size < 4 or not self.elements.any():
            return 0.0, 0
        rms = np.sqrt(self.signal / np.maximum(self.elements, 1))
        level = np.log(np.maximum(rms, 1e-150))
        cuts = np.arange(2, self.size - 1)
        before = np.cumsum(level)[1:-2]
        head, tail = before / cuts, (level.sum() - before) / (self.size - cuts)
        cut = int(cuts[np.argmax(cuts * (self.size - cuts) * (head - tail) ** 2)])
        loud, quiet = sorted((rms[:cut], rms[cut:]), key=lambda part: part.mean(), reverse=True)
        if quiet.max() == 0:
            return 0.0, 0
        return float(loud.min() / quiet.max()), cut

    def part(self, name: str, start: int, stop: int) -> OutputFidelity:
        part = TensorSums()
        part.signal, part.noise = float(self.signal[start:stop].sum()), float(self.noise[start:stop].sum())
        part.dot, part.quantized = float(self.dot[start:stop].sum()), float(self.quantized[start:stop].sum())
        part.classes = False
        where = ", ".join([":"] * self.axis + [f"{start}:{stop}"])
        return part.result(f"{name}[{where}]")


def _part_axes(shape: tuple[int, ...]) -> list[int]:
    """Axes along which an output may concatenate parts: the channel axis, and the last axis of a
    (batch, rows, fields) output (YOLOX: anchors × [box, objectness, classes]); never a spatial
    axis of an image-shaped output."""
    axes = [1] if len(shape) >= 2 else []
    if len(shape) == 3:
        axes.append(2)
    return [a for a in axes if 2 <= shape[a] <= PART_AXIS_SIZE]
