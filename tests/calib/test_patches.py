"""A Conv's patches: numpy's gather against onnxruntime's unfolding, and the sub-grid."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

from onnxq.calib import patches


@settings(max_examples=25, deadline=None)
@given(
    auto_pad=st.sampled_from(["SAME_UPPER", "SAME_LOWER", "VALID", "NOTSET"]),
    stride=st.integers(1, 3),
    dilation=st.integers(1, 2),
    kernel=st.sampled_from([(1, 1), (2, 2), (3, 3), (2, 3)]),
    size=st.tuples(st.integers(5, 9), st.integers(5, 9)),
    kept=st.sampled_from([7, 1024]),
    seed=st.integers(0, 2**16),
)
def test_gathered_patches_equal_onnxruntimes_unfolding(auto_pad, stride, dilation, kernel, size, kept, seed):
    """numpy's gather of a 2-D Conv's patches against onnxruntime's one-hot Conv (the path of
    other ranks), auto_pad resolved as ONNX does (onnxruntime refuses dilations with SAME
    padding): every position, or 7 per sample, the same ones drawn from the same seed."""
    dilation = 1 if auto_pad.startswith("SAME") else dilation
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2, 4, *size)).astype(np.float32)
    weight = np.zeros((4, 2, *kernel), np.float32)
    shape = dict(strides=[stride] * 2, dilations=[dilation] * 2, group=2)
    padding = dict(auto_pad=auto_pad) if auto_pad != "NOTSET" else dict(pads=[1, 0, 2, 1])
    node = helper.make_node("Conv", ["x", "w"], ["y"], **shape, **padding)
    gathered = patches.Unfold(node, weight)
    by_onnxruntime = patches.Unfold(node, weight)
    gathered.keep = by_onnxruntime.keep = kept
    by_onnxruntime.gathers = False
    by_onnxruntime.runner = patches._unfolding_session(kernel, 4, by_onnxruntime.attributes)
    assert gathered.gathers or kernel == (1, 1)
    (expected,) = [patches.copy() for patches in by_onnxruntime(x)]  # views of a reused buffer
    (measured,) = gathered(x)
    np.testing.assert_array_equal(measured, expected)


def test_a_large_map_is_read_on_a_sub_grid_at_every_phase(monkeypatch):
    """Past GRID_ROWS_PER_INPUT patches per input, a sample's patches are every g-th row and
    column's, at a phase drawn per sample: each one is one of the full set's, and over samples
    every position is read."""
    image = np.random.default_rng(0).normal(size=(1, 4, 8, 8)).astype(np.float32)
    x = np.repeat(image, 32, axis=0)
    weight = np.zeros((4, 1, 3, 3), np.float32)  # depthwise: 9 inputs per group
    node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1] * 4, group=4)
    monkeypatch.setattr(patches, "GRID_ROWS_PER_INPUT", None)
    (every,) = [patches[:, :, :64].copy() for patches in patches.Unfold(node, weight)(image)]
    monkeypatch.setattr(patches, "GRID_ROWS_PER_INPUT", 1)  # 16 of 64 positions keep 9 per input
    (grid,) = patches.Unfold(node, weight)(x)
    assert grid.shape == (4, 9, 32 * 16)
    matches = (grid[:, :, :, None] == every[:, :, None, :]).all(axis=1)  # (groups, grid, every)
    assert matches.any(axis=2).all()  # each grid patch is one of the image's patches
    assert matches.any(axis=1).all()  # and every position's patch is read by some sample
