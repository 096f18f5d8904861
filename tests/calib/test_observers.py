"""Streaming observers against numpy computed over all the data at once."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxq.calib.observers import HistogramObserver, MinMaxObserver, ScaleClipObserver


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
