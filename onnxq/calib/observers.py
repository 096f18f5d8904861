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


# Once this many values are in, only the tails are binned value by value: the bins between the
# quantiles holding TAIL_MARGIN times the clipped tail at each end (at most MAX_BINNED_SHARE of
# the values) keep one count for all of them. 99.999 %: the outer 1 % at each end is binned.
TAIL_MARGIN = 1000.0
MAX_BINNED_SHARE = 0.25
MIN_VALUES_FOR_MIDDLE = 1 << 16


class HistogramObserver:
    """Symmetric histogram over [-R, R] whose R doubles as larger values arrive.

    Doubling R merges bins pairwise, so counts stay exact at the current resolution;
    the percentile range clips each tail at `percentile` (e.g. 99.999 % of values kept on each side).

    Only the tails decide that range. Once MIN_VALUES_FOR_MIDDLE values are in, the bins between
    the quantiles holding TAIL_MARGIN times the clipped tail at each end keep one count for all
    of them (the middle): each later value is compared with the middle's edges and only those
    outside it are binned one by one (bincount over every value took three quarters of the
    observer's time on MobileNetV2). The range is then the one every value binned would give.
    Only where later data is so much quieter that a clipped tail reaches into the middle does
    it stop at the middle's edge: wider than the percentile's, never narrower.
    `binned_tails=False` bins every value.

    >>> obs = HistogramObserver(percentile=99.0)
    >>> obs.update(np.linspace(0.0, 1.0, 10001, dtype=np.float32))
    >>> low, high = obs.range()
    >>> round(low, 2), round(high, 2)
    (0.01, 0.99)
    """

    def __init__(self, percentile: float, bins: int = 4096, binned_tails: bool = True) -> None:
        self.percentile = percentile
        self.bins = bins
        self.limit = 0.0
        self.counts = np.zeros(bins, np.int64)  # every bin's count, 0 in the middle's bins
        self.extremes = MinMaxObserver()
        self.tail = (100.0 - percentile) / 100.0  # share of the values clipped at each end
        self.binned_tails = binned_tails and self.tail > 0
        self.middle: tuple[int, int] | None = None  # first and last bin counted as one, once set
        self.middle_count = 0
        self._thresholds: dict[tuple[float, int], np.float32] = {}  # (limit, bin) → _least_reaching

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
        if self.middle is not None and finite:
            self._bin_tails(values, low, high)
            return
        index = self._index(values)
        if not finite:  # fmax/fmin, not clip: a NaN goes to the first bin, not to a negative index
            np.fmax(index, 0, out=index)
            np.fmin(index, self.bins - 1, out=index)
        self._bin(index)
        if self.middle is None:
            self._set_middle()
        else:  # a batch with NaN or infinity, binned value by value: the middle's bins into its count
            self._merge_into_middle()

    def _index(self, values: np.ndarray) -> np.ndarray:
        """Bin positions in float32, in place: widening every activation to float64 and two
        int64 copies took a third of MobileNetV2's calibration; float32 moves a value lying
        within its rounding of a bin edge (about one in 10⁴) to the neighbouring bin."""
        scale, offset = self._affine()
        index = np.multiply(values, scale, out=scratch(values.shape))
        index += offset
        return index

    def _affine(self) -> tuple[np.float32, np.float32]:
        """Scale and offset of the bin positions, in float32 as _index computes them."""
        return np.float32(self.bins / (2.0 * self.limit)), np.float32(self.bins / 2)

    def _bin(self, index: np.ndarray) -> None:
        """Every value into its bin: finite values within ±limit land in [0, bins]; truncation
        sends a rounding below 0 to bin 0, and the one index past the last bin (a value at
        +limit) is folded into it."""
        bins = scratch(index.shape, np.intp)
        np.copyto(bins, index, casting="unsafe")
        counts = np.bincount(bins, minlength=self.bins)
        self.counts += counts[: self.bins]
        self.counts[-1] += counts[self.bins :].sum()

    def _bin_tails(self, values: np.ndarray, low: float, high: float) -> None:
        """The values beyond the middle's two edge bins binned one by one; the edge bins (a
        ReLU's zeros fill one) and the middle counted. Each set is found by comparing the values
        with the least value whose bin position reaches a bin, so no bin position is computed
        for the rest, and a side the batch's extremes do not reach is not compared at all."""
        first, last = self.middle
        outer_low, inner_low, inner_high, outer_high = map(
            self._least_reaching, (first - 1, first, last + 1, last + 2)
        )
        mask = scratch(values.shape, np.bool_)
        below = values[np.less(values, outer_low, out=mask)] if low < outer_low else values[:0]
        up_to_edge = np.count_nonzero(np.less(values, inner_low, out=mask)) if low < inner_low else 0
        above = values[np.greater_equal(values, outer_high, out=mask)] if high >= outer_high else values[:0]
        from_edge = (
            np.count_nonzero(np.greater_equal(values, inner_high, out=mask)) if high >= inner_high else 0
        )
        self._bin(self._index(np.concatenate([below, above])))
        self.counts[first - 1] += up_to_edge - below.size
        self.counts[last + 1] += from_edge - above.size
        self.middle_count += values.size - up_to_edge - from_edge

    def _least_reaching(self, position: int) -> np.float32:
        """The least float32 value whose bin position (_index's float32 arithmetic, which never
        decreases as the value grows) is at least `position`: exactly the values below it have
        positions below `position`. Bisection over float32 values in their order (many values
        round to one position near the offset, so stepping from an estimate can take millions)."""
        key = (self.limit, position)
        if key not in self._thresholds:
            scale, offset = self._affine()
            low, high = _ordinal(np.float32(-np.finfo(np.float32).max)), _ordinal(np.finfo(np.float32).max)
            with np.errstate(over="ignore"):  # the largest values' positions overflow to infinity
                while high - low > 1:  # position(low's value) < position <= position(high's value)
                    middle = (low + high) // 2
                    if _float32(middle) * scale + offset >= position:
                        high = middle
                    else:
                        low = middle
            self._thresholds[key] = _float32(high)
        return self._thresholds[key]

    def _merge_into_middle(self) -> None:
        """The counts of the middle's bins moved into its one count."""
        first, last = self.middle
        self.middle_count += int(self.counts[first : last + 1].sum())
        self.counts[first : last + 1] = 0

    def _set_middle(self) -> None:
        """The middle's bins, where enough values are in: those between the quantiles that
        hold TAIL_MARGIN times the clipped tail at each end (at least one bin each side)."""
        total = int(self.counts.sum())
        if not self.binned_tails or total < MIN_VALUES_FOR_MIDDLE:
            return
        share = min(TAIL_MARGIN * self.tail, MAX_BINNED_SHARE) * total
        cumulative = np.cumsum(self.counts)
        first = max(int(np.searchsorted(cumulative, share, side="left")) + 1, 1)
        last = min(int(np.searchsorted(cumulative, total - share, side="right")) - 1, self.bins - 2)
        if first > last:
            return
        self.middle = (first, last)
        self._merge_into_middle()

    def range(self) -> tuple[float, float]:
        low, high = self.extremes.range()
        counts = self.counts
        if self.middle is not None:  # the middle's count in its first bin: the sums outside it are exact
            counts = counts.copy()
            counts[self.middle[0]] += self.middle_count
        total = counts.sum()
        if total == 0:
            return low, high
        tail = total * (100.0 - self.percentile) / 100.0
        cumulative = np.cumsum(counts)
        edges = np.linspace(-self.limit, self.limit, self.bins + 1)
        top = np.searchsorted(cumulative, total - tail, side="left")
        bottom = np.searchsorted(cumulative, tail, side="right")
        if self.middle is not None:  # a cut inside the middle: its edge, the wider side
            first, last = self.middle
            top = max(top, last) if top >= first else top
            bottom = min(bottom, first) if bottom <= last else bottom
        upper = edges[min(top + 1, self.bins)]
        lower = edges[bottom]
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
        if self.middle is not None:  # a bin merged with one of the middle's joins the middle
            self.middle = tuple(quarter + edge // 2 for edge in self.middle)
            self._merge_into_middle()


def _ordinal(value: np.float32) -> int:
    """An integer that orders float32 values as their values do (−0 and +0 both 0)."""
    bits = int(np.float32(value).view(np.int32))
    return bits if bits >= 0 else -(bits & 0x7FFFFFFF)


def _float32(ordinal: int) -> np.float32:
    """The float32 value of an _ordinal."""
    bits = ordinal if ordinal >= 0 else -ordinal | 0x80000000
    return np.array(bits, np.uint32).view(np.float32)[()]


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

    def spans(self) -> np.ndarray | None:
        """The range per channel: its maximum."""
        return self.maxima

    def range(self) -> tuple[float, float]:
        top = 0.0 if self.maxima is None else float(self.maxima.max())
        return -top, top


CHANNEL_BINS = 256  # histogram bins per channel of ChannelRangeObserver


class ChannelRangeObserver:
    """Per channel along `axis`, where a uniform quantizer of `levels` steps over [0, c] would
    clip |x| at least expected squared error (cross-layer equalization's channel ranges at
    4-bit activations and narrower). A channel's maximum is a poor range at few levels:
    MobileNetV2's ReLU6 channels reach 6 on a few values while most of them sit near 0, and
    equalizing by maxima left every channel as badly clipped by the tensor's range as the
    widest one.

    Each channel keeps a histogram of |x| over [0, top), top doubling (neighbouring bins merged)
    when a larger value comes. The error of clipping at c: the rounding noise of the values below
    it, (c / levels)² / 12 each, and (|x| - c)² for those above (signed tensors get half the
    levels: their scale spans both signs).

    >>> obs = ChannelRangeObserver(axis=1, levels=15)
    >>> tail = np.random.default_rng(0).exponential(1.0, 10000)  # a long tail: max about 9
    >>> x = np.stack([tail, np.linspace(0, 3, 10000)])[None].astype(np.float32)  # (1, 2, 10000)
    >>> obs.update(x)
    >>> [round(float(v), 2) for v in obs.maxima], [round(float(r), 2) for r in obs.spans()]
    ([8.72, 3.0], [6.03, 2.91])
    """

    def __init__(self, axis: int, levels: int, bins: int = CHANNEL_BINS):
        self.axis, self.levels, self.bins = axis, levels, bins
        self.maxima: np.ndarray | None = None
        self.tops = np.zeros(0)
        self.counts = np.zeros((0, bins))
        self.signed = False

    def update(self, array: np.ndarray) -> None:
        moved = np.moveaxis(array, self.axis, 0)
        flat = moved.reshape(moved.shape[0], -1)
        if not flat.size:
            return
        self.signed |= bool(flat.min() < 0)
        values = np.abs(flat)
        current = values.max(axis=1).astype(np.float64)
        if self.maxima is None:
            self.maxima = current
            self.tops = np.where(current > 0, current, 1.0)
            self.counts = np.zeros((len(current), self.bins))
        else:
            self.maxima = np.maximum(self.maxima, current)
            self._widen(current)
        index = (values * (self.bins / self.tops)[:, None].astype(np.float32)).astype(np.int64)
        np.minimum(index, self.bins - 1, out=index)
        index += (np.arange(len(index)) * self.bins)[:, None]
        self.counts += np.bincount(index.ravel(), minlength=self.counts.size).reshape(self.counts.shape)

    def _widen(self, current: np.ndarray) -> None:
        """Double the top of every channel `current` exceeds, merging neighbouring bins."""
        for channel in np.flatnonzero(current >= self.tops):
            while current[channel] >= self.tops[channel]:
                merged = self.counts[channel].reshape(-1, 2).sum(axis=1)
                self.counts[channel] = 0.0
                self.counts[channel, : len(merged)] = merged
                self.tops[channel] *= 2

    def spans(self) -> np.ndarray | None:
        """The clipping point per channel, never above its maximum (0 for a channel never off 0)."""
        if self.maxima is None:
            return None
        steps = self.levels / 2 if self.signed else self.levels
        centres = (np.arange(self.bins) + 0.5) / self.bins  # in units of each channel's top
        clips = np.arange(1, self.bins + 1) / self.bins  # clip at each bin's upper edge
        counts = self.counts
        within = np.cumsum(counts, axis=1)
        # Σ over the bins above each clip of n, n·v and n·v² (suffix sums, excluding the bin)
        above = [np.cumsum((counts * centres**p)[:, ::-1], axis=1)[:, ::-1] for p in range(3)]
        above = [np.concatenate([a[:, 1:], np.zeros((len(a), 1))], axis=1) for a in above]
        clipping = above[2] - 2 * clips * above[1] + clips**2 * above[0]
        error = within * (clips / steps) ** 2 / 12 + clipping
        best = clips[np.argmin(error, axis=1)] * self.tops
        return np.where(self.maxima > 0, np.minimum(best, self.maxima), 0.0)
