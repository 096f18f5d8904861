"""Streaming observers against numpy computed over all the data at once."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxq.calib.observers import (
    ChannelRangeObserver,
    HistogramObserver,
    MinMaxObserver,
    ScaleClipObserver,
)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), batches=st.integers(1, 6), spread=st.floats(0.01, 100.0))
def test_histogram_clips_at_most_the_tail_and_is_tight_to_one_bin(seed, batches, spread):
    rng = np.random.default_rng(seed)
    parts = [rng.standard_normal(5000).astype(np.float32) * spread * (1 + i) for i in range(batches)]
    observer = HistogramObserver(percentile=99.9)
    for part in parts:
        observer.update(part)
    data = np.concatenate(parts).astype(np.float64)
    low, high = observer.range()
    width = 2 * observer.limit / observer.bins
    tail = data.size * 0.001
    slack = 1  # a value on a bin edge may fall either side in float arithmetic
    assert (data < low).sum() <= tail + slack
    assert (data > high).sum() <= tail + slack
    assert (data < low + width).sum() > tail - slack
    assert (data > high - width).sum() > tail - slack
    assert observer.counts.sum() == data.size


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), peak=st.floats(1e-3, 1e3))
def test_histogram_bins_agree_with_numpys_and_keep_both_extremes(seed, peak):
    """Every value in the bin numpy's histogram puts it in, up to float32 rounding at an edge; the
    values at ±limit in the first and last bins (the one index past the last is folded back)."""
    rng = np.random.default_rng(seed)
    data = np.concatenate([rng.uniform(-peak, peak, 20000), [-peak, peak]]).astype(np.float32)
    observer = HistogramObserver(percentile=99.0)
    observer.update(data)
    expected, _ = np.histogram(data.astype(np.float64), observer.bins, (-observer.limit, observer.limit))
    assert observer.counts.sum() == data.size
    assert np.abs(observer.counts - expected).sum() <= 2 * 10  # a few values on bin edges move
    assert observer.counts[0] >= 1 and observer.counts[-1] >= 1


def test_a_nan_lands_in_the_first_bin_without_moving_the_range():
    observer = HistogramObserver(percentile=100.0)
    observer.update(np.array([0.5, np.nan, -1.0, 2.0], np.float32))
    assert observer.counts.sum() == 4 and observer.counts[0] >= 1
    assert observer.extreme_range() == (-1.0, 2.0)


def test_histogram_at_100_percent_is_min_max():
    observer = HistogramObserver(percentile=100.0)
    data = np.array([-3.0, 0.5, 7.25], np.float32)
    observer.update(data)
    assert observer.range() == (-3.0, 7.25)


def test_min_max_over_batches():
    observer = MinMaxObserver()
    for part in (np.array([1.0, 2.0]), np.array([-4.0, 0.0]), np.array([9.0])):
        observer.update(part)
    assert observer.range() == (-4.0, 9.0)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), batches=st.integers(1, 5), k=st.floats(0.5, 64.0), shift=st.floats(-2, 2))
def test_scaleclip_streams_to_k_times_mean_absolute_value(seed, batches, k, shift):
    """Batch by batch, the range is numpy's min/max clipped at ±K·mean|A| over all the data."""
    rng = np.random.default_rng(seed)
    parts = [(rng.standard_normal(3000) ** 3 + shift).astype(np.float32) for _ in range(batches)]
    observer = ScaleClipObserver(k)
    for part in parts:
        observer.update(part)
    data = np.concatenate(parts).astype(np.float64)
    alpha = k * np.abs(data).mean()
    low, high = observer.range()
    np.testing.assert_allclose(low, max(data.min(), -alpha), rtol=1e-9)
    np.testing.assert_allclose(high, min(data.max(), alpha), rtol=1e-9)


def test_scaleclip_keeps_a_one_sided_range_one_sided():
    observer = ScaleClipObserver(2.0)
    observer.update(np.array([0.0, 0.0, 1.0, 9.0], np.float32))
    assert observer.range() == (0.0, 5.0)


def _stream(seed: int, kind: str, growth: float, batches: int) -> list[np.ndarray]:
    """Batches of 40 000 values of one kind of activation, each `growth` times the last."""
    rng = np.random.default_rng(seed)
    parts = []
    for index in range(batches):
        values = rng.standard_normal(40_000) * growth**index
        if kind == "relu":
            values = np.maximum(values, 0)
        elif kind == "relu6":  # an atom at the top as well
            values = np.clip(values * 4, 0, 6)
        elif kind == "silu":
            values = values * 0.5 * (1 + np.tanh(values / 2))  # x·sigmoid(x), without overflow
        elif kind == "cubic":  # long tails both sides
            values = values**3
        parts.append(values.astype(np.float32))
    return parts


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    kind=st.sampled_from(["relu", "relu6", "silu", "cubic", "gaussian"]),
    growth=st.floats(0.7, 4.0),
    batches=st.integers(3, 6),
    percentile=st.sampled_from([99.999, 99.99]),
)
def test_binning_only_the_tails_gives_the_range_every_value_binned_gives(
    seed, kind, growth, batches, percentile
):
    """Once the middle holds one count, the range is that of a histogram that bins every value,
    through doublings of the limit and batches up to 1.4 times quieter each."""
    tails, every = HistogramObserver(percentile), HistogramObserver(percentile, binned_tails=False)
    for part in _stream(seed, kind, growth, batches):
        tails.update(part)
        every.update(part)
    assert tails.middle is not None  # the later batches went through the tails alone
    assert tails.range() == every.range()
    assert tails.extreme_range() == every.extreme_range()
    first, last = tails.middle  # every bin outside the middle as counted value by value
    expected = every.counts.copy()
    assert tails.middle_count == expected[first : last + 1].sum()
    expected[first : last + 1] = 0
    np.testing.assert_array_equal(tails.counts, expected)


def test_data_quieter_than_the_middle_allows_widens_the_range_never_narrows_it():
    """A loud first batch sets the middle wide; 200 quiet ones then put 1 % of all values inside it."""
    loud, quiet = np.concatenate(_stream(0, "gaussian", 1.0, 2)) * 100, _stream(1, "gaussian", 1.0, 200)
    tails, every = HistogramObserver(99.0), HistogramObserver(99.0, binned_tails=False)
    for part in [loud, *quiet]:
        tails.update(part)
        every.update(part)
    low, high = tails.range()
    expected_low, expected_high = every.range()
    assert low <= expected_low and high >= expected_high
    assert (low, high) != (expected_low, expected_high)  # the cut fell inside the middle


def test_a_nan_batch_after_the_middle_is_set_keeps_the_counts_and_the_range():
    parts = _stream(3, "relu", 1.0, 3)
    parts[2][::1000] = np.nan
    tails, every = HistogramObserver(99.999), HistogramObserver(99.999, binned_tails=False)
    for part in parts:
        tails.update(part)
        every.update(part)
    assert tails.middle is not None
    assert tails.range() == every.range()
    assert tails.counts.sum() + tails.middle_count == sum(part.size for part in parts)


@settings(max_examples=50, deadline=None)
@given(limit=st.floats(1e-6, 1e6), position=st.integers(1, 4095))
def test_the_least_value_reaching_a_bin_is_where_the_bin_positions_cross_it(limit, position):
    observer = HistogramObserver(99.999)
    observer.limit = limit
    threshold = observer._least_reaching(position)
    below = np.nextafter(threshold, np.float32(-np.inf))
    positions = observer._index(np.array([below, threshold], np.float32))
    assert positions[0] < position <= positions[1]


def _clipping_error(values: np.ndarray, clip: float, steps: float) -> float:
    """The error ChannelRangeObserver minimises, on the values themselves: rounding noise below
    the clip, the distance to it above."""
    inside = values <= clip
    return float(inside.sum() * (clip / steps) ** 2 / 12 + ((values[~inside] - clip) ** 2).sum())


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    batches=st.integers(1, 5),
    bits=st.sampled_from([2, 4, 6]),
    signed=st.booleans(),
)
def test_channel_clipping_points_are_as_good_as_numpys_best_on_all_the_data(seed, batches, bits, signed):
    rng = np.random.default_rng(seed)
    scales = np.array([0.01, 1.0, 30.0])
    # each batch wider than the last, so that the histograms' tops double and merge bins
    parts = [
        (rng.laplace(0.0, 1.0, (2, 3, 700)) if signed else rng.exponential(1.0, (2, 3, 700)))
        * scales[None, :, None]
        * (1 + 2 * i)
        for i in range(batches)
    ]
    observer = ChannelRangeObserver(axis=1, levels=2**bits - 1)
    for part in parts:
        observer.update(part.astype(np.float32))
    spans = observer.spans()
    steps = (2**bits - 1) / (2 if signed else 1)
    for channel in range(3):
        values = np.abs(np.concatenate([p[:, channel].ravel() for p in parts]))
        assert observer.maxima[channel] == np.float32(values.max())
        grid = np.linspace(values.max() / 400, values.max(), 400)
        best = min(_clipping_error(values, clip, steps) for clip in grid)
        assert 0 < spans[channel] <= values.max()
        # within a few per cent of the best clip: the histogram holds each value to a bin
        assert _clipping_error(values, spans[channel], steps) <= 1.05 * best


def test_a_channel_never_off_zero_has_no_span():
    observer = ChannelRangeObserver(axis=0, levels=15)
    observer.update(np.stack([np.zeros(50), np.linspace(-1.0, 2.0, 50)]).astype(np.float32))
    observer.update(np.stack([np.zeros(50), np.linspace(0.0, 9.0, 50)]).astype(np.float32))
    assert observer.spans()[0] == 0.0 and 0 < observer.spans()[1] <= 9.0
    assert observer.signed and observer.counts[1].sum() == 100
