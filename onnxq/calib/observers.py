"""Streaming range observers: each sees one batch at a time and keeps a fixed-size summary.

No observer keeps activations, so calibration memory does not grow with the number of samples.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from onnxq.calib.scratch import scratch


class Observer(Protocol):
    def update(self, values: np.ndarray) -> None: ...

    def range(self) -> tuple[float, float]: ...


class MinMaxObserver:
    """Running minimum and maximum."""

    def __init__(self) -> None:
        self.low, self.high = np.inf, -np.inf

    def update(self, values: np.ndarray) -> None:
        if values.size:
            self.include(float(values.min()), float(values.max()))

    def include(self, low: float, high: float) -> None:
        """A batch's own minimum and maximum, already computed."""
        self.low, self.high = min(self.low, low), max(self.high, high)

    def range(self) -> tuple[float, float]:
        return (0.0, 0.0) if self.low > self.high else (self.low, self.high)


class HistogramObserver:
    """Symmetric histogram over [-R, R] whose R doubles as larger values arrive.

    Doubling R merges bins pairwise, so counts stay exact at the current resolution;
    the percentile range clips each tail at `percentile` (e.g. 99.999 % of values kept on each side).

    >>> obs = HistogramObserver(percentile=99.0)
    >>> obs.update(np.linspace(0.0, 1.0, 10001, dtype=np.float32))
    >>> low, high = obs.range()
    >>> round(low, 2), round(high, 2)
    (0.01, 0.99)
    """

    def __init__(self, percentile: float, bins: int = 4096) -> None:
        self.percentile = percentile
        self.bins = bins
        self.limit = 0.0
        self.counts = np.zeros(bins, np.int64)
        self.extremes = MinMaxObserver()

    def update(self, values: np.ndarray) -> None:
        values = values.ravel()
        if not values.size:
            return
        low, high = float(values.min()), float(values.max())  # NaN where any value is NaN
        finite = np.isfinite(low) and np.isfinite(high)
        if not finite and np.isnan(low):  # the range of the values that are numbers
            numbers = values[~np.isnan(values)]
            low, high = (float(numbers.min()), float(numbers.max())) if numbers.size else (np.inf, -np.inf)
        self.extremes.include(low, high)
        if self.extremes.low > self.extremes.high:  # nothing but NaN so far: no range to bin in
            self.counts[0] += values.size
            return
        peak = max(abs(self.extremes.low), abs(self.extremes.high))
        if self.limit == 0.0:
            self.limit = peak if peak > 0 else 1e-8
        while peak > self.limit:
            self._double()
        # bin positions in float32, in place: widening every activation to float64 and two int64
        # copies took a third of MobileNetV2's calibration; float32 moves a value lying within
        # its rounding of a bin edge (about one in 10⁴) to the neighbouring bin
        index = np.multiply(values, np.float32(self.bins / (2.0 * self.limit)), out=scratch(values.shape))
        index += np.float32(self.bins / 2)
        if not finite:  # fmax/fmin, not clip: a NaN goes to the first bin, not to a negative index
            np.fmax(index, 0, out=index)
            np.fmin(index, self.bins - 1, out=index)
        # finite values within ±limit land in [0, bins]; truncation sends a rounding below 0 to
        # bin 0, and the one index past the last bin (a value at +limit) is folded into it
        bins = scratch(values.shape, np.intp)
        np.copyto(bins, index, casting="unsafe")
        counts = np.bincount(bins, minlength=self.bins)
        self.counts += counts[: self.bins]
        self.counts[-1] += counts[self.bins :].sum()

    def range(self) -> tuple[float, float]:
        low, high = self.extremes.range()
        total = self.counts.sum()
        if total == 0:
            return low, high
        tail = total * (100.0 - self.percentile) / 100.0
        cumulative = np.cumsum(self.counts)
        edges = np.linspace(-self.limit, self.limit, self.bins + 1)
        upper = edges[min(np.searchsorted(cumulative, total - tail, side="left") + 1, self.bins)]
        lower = edges[np.searchsorted(cumulative, tail, side="right")]
        return max(low, float(lower)), min(high, float(upper))

    def extreme_range(self) -> tuple[float, float]:
        """The min-max range of the same values."""
        return self.extremes.range()

    def _double(self) -> None:
        merged = self.counts.reshape(-1, 2).sum(axis=1)
        self.counts = np.zeros(self.bins, np.int64)
        quarter = self.bins // 4
        self.counts[quarter : quarter + merged.size] = merged
        self.limit *= 2.0


class ScaleClipObserver:
    """GDRQ's Scale-Clip for activations: the range clipped at α = K·mean|A|.

    The mean of |A| moves little with a few outliers, so α follows the bulk of the values; K is
    large (activations' tails move with the data) and chosen per bit width on calibration data.

    >>> obs = ScaleClipObserver(k=4.0)
    >>> obs.update(np.array([0.0, 1.0, 1.0, 1.0, 2.0, 100.0], np.float32))
    >>> obs.range()
    (0.0, 70.0)
    """

    def __init__(self, k: float) -> None:
        self.k = k
        self.extremes = MinMaxObserver()
        self.total, self.count = 0.0, 0

    def update(self, values: np.ndarray) -> None:
        self.extremes.update(values)
        self.total += float(np.abs(values, dtype=np.float64).sum())
        self.count += values.size

    def range(self) -> tuple[float, float]:
        low, high = self.extremes.range()
        if not self.count:
            return low, high
        alpha = self.k * self.total / self.count
        return max(low, -alpha), min(high, alpha)


class ChannelMaxObserver:
    """Largest |x| per channel along `axis` (cross-layer equalization's channel ranges)."""

    def __init__(self, axis: int = 1):
        self.axis = axis
        self.maxima: np.ndarray | None = None

    def update(self, array: np.ndarray) -> None:
        moved = np.moveaxis(np.abs(array), self.axis, 0)
        current = moved.reshape(moved.shape[0], -1).max(axis=1).astype(np.float64)
        self.maxima = current if self.maxima is None else np.maximum(self.maxima, current)

    def range(self) -> tuple[float, float]:
        top = 0.0 if self.maxima is None else float(self.maxima.max())
        return -top, top
