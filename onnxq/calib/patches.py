"""The patches a Conv's output values read, as the rows of GPTQ's input correlations.

H = Σ x xᵀ over a Conv's inputs sums one x per output value: the input channels and kernel
positions it reads (its patch). A 2-D Conv's patches are gathered by numpy from a strided view of
its padded input; other ranks are cut by onnxruntime (a Conv with one-hot kernels). Large maps
are read on a sub-grid or at random positions: neighbouring patches overlap and tell H little
more than one of them. Patches are written into one reused buffer (onnxq.calib.scratch).
"""

from __future__ import annotations

import numpy as np
import onnx
from numpy.lib.stride_tricks import sliding_window_view
from onnx import helper, numpy_helper

from onnxq.calib.scratch import scratch
from onnxq.io import session

UNFOLD_BYTES = 64 << 20  # largest patch tensor one onnxruntime run writes
# Patches kept per sample: H is a mean over positions, and a random subset of a large map estimates
# it well at a fraction of the d² products. 16384 = 128², above every map of a 224-pixel classifier
# (MobileNetV2's largest is 112²), so only detector-sized inputs are subsampled. Fewer did not pay
# on held-out data (BENCHMARKS.md "GPTQ's patches per sample"): at least 1024 per sample, or 8 per
# input correlated, lowered the zoo's mean worst SQNR 19.09 → 18.99 dB and took MobileNetV2 27-28 s
# against 25-26 s, as indexing chosen positions costs more per patch than copying every window.
MAX_POSITIONS = 16384
# Patches a gathered map keeps per sample, per input H correlates, at least: a map with more is
# read on a regular sub-grid (every g-th row and column, g dividing both, at a random phase per
# sample, so every position is read as often). Neighbouring patches overlap and tell H little
# more than one of them: MobileNetV2's first depthwise convs read 12544 patches of 9 inputs per
# sample and took about 40 % of GPTQ's time. On held-out data 64 was as good as every position
# (BENCHMARKS.md "GPTQ's patches on a sub-grid"); 16 lost 1-4 dB on two zoo models. None: every
# position.
GRID_ROWS_PER_INPUT: int | None = 64


class Unfold:
    """A Conv's input cut into the patches its output values read, up to MAX_POSITIONS random
    ones per sample. A 2-D Conv's are gathered by numpy (onnxruntime's one-hot Conv below took
    most of GPTQ's time on MobileNetV2, and wrote every patch of a detector's map to keep a
    few); other ranks are cut by onnxruntime, a Conv with one-hot kernels and the layer's own
    strides, pads, dilations and auto_pad, one kernel position per output channel, and
    subsampled after."""

    def __init__(self, node: onnx.NodeProto, weight: np.ndarray):
        self.groups = _group_count(node)
        channels = weight.shape[1] * self.groups
        self.kernel = tuple(weight.shape[2:])
        positions = int(np.prod(self.kernel))
        self.depth = weight.shape[1] * positions
        self.keep = MAX_POSITIONS
        keep = {"strides", "pads", "dilations", "auto_pad"}
        self.attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name in keep}
        self.pointwise = positions == 1 and _reads_in_place(self.attributes)  # patches: the input itself
        self.gathers = len(self.kernel) == 2 and not self.pointwise
        self.expansion = positions
        self.rng = np.random.default_rng(0)  # the same patches on every run: the same file
        if not self.gathers and not self.pointwise:
            self.runner = _unfolding_session(self.kernel, channels, self.attributes)

    def __call__(self, batch: np.ndarray):
        """(groups, d, rows) patch matrices, every sample's patches side by side, a few samples
        at a time. One product per group over all of them: a product per sample (tried first)
        left a d×d result per sample to sum, 20 times its input on MobileNetV2's 7×7 maps of 960
        channels, and took ten times as long there. The matrices are views of one reused buffer
        (onnxq.calib.scratch), or of the input itself (one sample of a pointwise conv): each is
        read before the next is made."""
        per_sample = max(1, batch[0].size * self.expansion * 4)
        step = max(1, UNFOLD_BYTES // per_sample)
        for start in range(0, len(batch), step):
            part = batch[start : start + step]
            if self.gathers:
                yield self._gathered(part)
                continue
            patches = part if self.pointwise else self.runner.run(None, {"x": part})[0]
            samples = patches.shape[0]
            patches = patches.reshape(samples, self.groups, self.depth, -1)
            if patches.shape[3] > self.keep:
                chosen = np.stack([self._positions(patches.shape[3]) for _ in range(samples)])
                patches = np.take_along_axis(patches, chosen[:, None, None, :], axis=3)
            yield _side_by_side(patches)

    def _positions(self, total: int) -> np.ndarray:
        """Sorted random output positions of one sample, `keep` of them, or all."""
        if total <= self.keep:
            return np.arange(total)
        return np.sort(self.rng.choice(total, self.keep, replace=False))

    def _gathered(self, part: np.ndarray) -> np.ndarray:
        """(groups, d, rows) patches of a 2-D Conv, d in the weight's order (input channel,
        kernel row, kernel column). A map with no more positions than are kept is copied from a
        strided view of every window at once (six times cheaper per patch than indexing), on a
        sub-grid where it has more than GRID_ROWS_PER_INPUT per input; a larger one is indexed
        at each sample's chosen positions."""
        (kh, kw), (sh, sw) = self.kernel, self.attributes.get("strides", [1, 1])
        dh, dw = self.attributes.get("dilations", [1, 1])
        top, left, bottom, right = _pads_2d(self.attributes, part.shape[2:], self.kernel)
        padded = np.pad(part, ((0, 0), (0, 0), (top, bottom), (left, right)))
        out_h = (padded.shape[2] - dh * (kh - 1) - 1) // sh + 1
        out_w = (padded.shape[3] - dw * (kw - 1) - 1) // sw + 1
        samples, channels = part.shape[:2]
        if out_h * out_w <= self.keep:
            span = (dh * (kh - 1) + 1, dw * (kw - 1) + 1)
            windows = sliding_window_view(padded, span, axis=(2, 3))[:, :, ::sh, ::sw, ::dh, ::dw]
            windows = windows[:, :, :out_h, :out_w]  # (samples, channels, out_h, out_w, kh, kw)
            step = self._grid_step(out_h, out_w)
            if step == 1:
                patches = scratch((channels, kh, kw, samples, out_h, out_w))
                np.copyto(patches, windows.transpose(1, 4, 5, 0, 2, 3))
                return patches.reshape(self.groups, self.depth, -1)
            patches = scratch((channels, kh, kw, samples, out_h // step, out_w // step))
            for index, phase in enumerate(self.rng.integers(step, size=(samples, 2))):
                grid = windows[index, :, phase[0] :: step, phase[1] :: step]
                np.copyto(patches[:, :, :, index], grid.transpose(0, 3, 4, 1, 2))
            return patches.reshape(self.groups, self.depth, -1)
        # Offsets into each channel's flattened padded map: one np.take per sample. Indexing the
        # map by row and column arrays instead built a transposed result and copied it again,
        # 40 times slower (2.7 s against 0.07 s for 16 samples of a 32-channel 3×3 conv on a
        # 640×640 detector's 320² map).
        width = padded.shape[3]
        kernel = (np.arange(kh) * dh * width)[:, None, None] + (np.arange(kw) * dw)[None, :, None]
        flat = padded.reshape(samples, channels, -1)
        patches = scratch((self.groups, self.depth, samples, self.keep))
        gathered = np.empty((channels, kh * kw * self.keep), padded.dtype)
        for index, sample in enumerate(flat):
            rows, columns = np.divmod(self._positions(out_h * out_w), out_w)
            offsets = (kernel + (rows * sh * width + columns * sw)).reshape(-1)  # (kh, kw, positions)
            np.take(sample, offsets, axis=1, out=gathered, mode="clip")
            patches[:, :, index] = gathered.reshape(self.groups, self.depth, -1)
        return patches.reshape(self.groups, self.depth, -1)

    def _grid_step(self, height: int, width: int) -> int:
        """The largest g dividing both sides that leaves GRID_ROWS_PER_INPUT patches per input
        per sample (1: every position)."""
        if GRID_ROWS_PER_INPUT is None:
            return 1
        least = GRID_ROWS_PER_INPUT * self.depth
        steps = [g for g in range(2, 9) if height % g == 0 and width % g == 0]
        return max((g for g in steps if (height // g) * (width // g) >= least), default=1)


def _side_by_side(patches: np.ndarray) -> np.ndarray:
    """(samples, groups, d, positions) as (groups, d, samples·positions), on the reused buffer."""
    samples, groups, depth, positions = patches.shape
    if samples == 1:
        return patches[0]
    joined = scratch((groups, depth, samples, positions))
    np.copyto(joined, patches.transpose(1, 2, 0, 3))
    return joined.reshape(groups, depth, -1)


def _pads_2d(attributes: dict, spatial: tuple[int, ...], kernel: tuple[int, ...]) -> tuple[int, ...]:
    """(top, left, bottom, right) a 2-D Conv pads its input with, auto_pad resolved as ONNX does."""
    auto_pad = attributes.get("auto_pad", b"NOTSET")  # onnx gives strings as bytes
    if auto_pad == b"NOTSET":
        top, left, bottom, right = attributes.get("pads", [0, 0, 0, 0])
        return top, left, bottom, right
    if auto_pad == b"VALID":
        return 0, 0, 0, 0
    strides, dilations = attributes.get("strides", [1, 1]), attributes.get("dilations", [1, 1])
    begins, ends = [], []
    for size, k, stride, dilation in zip(spatial, kernel, strides, dilations, strict=True):
        out = -(-size // stride)
        total = max(0, (out - 1) * stride + (k - 1) * dilation + 1 - size)
        small, large = total // 2, total - total // 2
        upper = auto_pad == b"SAME_UPPER"
        begins.append(small if upper else large)
        ends.append(large if upper else small)
    return begins[0], begins[1], ends[0], ends[1]


def _unfolding_session(kernel: tuple[int, ...], channels: int, attributes: dict):
    """onnxruntime's session of a Conv whose one-hot kernels copy each patch into channels."""
    positions = int(np.prod(kernel))
    one_hot = np.tile(
        np.eye(positions, dtype=np.float32).reshape(positions, 1, *kernel),
        (channels, 1) + (1,) * len(kernel),
    )
    conv = helper.make_node("Conv", ["x", "k"], ["patches"], group=channels, **attributes)
    graph = helper.make_graph(
        [conv],
        "unfold",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("patches", onnx.TensorProto.FLOAT, None)],
        [numpy_helper.from_array(one_hot, "k")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    return session(model, arena=False)


def _reads_in_place(attributes: dict) -> bool:
    """Whether a 1×1 kernel with these attributes reads every input position once, unpadded."""
    return (
        all(v == 1 for v in attributes.get("strides", [1]))
        and not any(attributes.get("pads", [0]))
        and attributes.get("auto_pad", b"NOTSET") in (b"NOTSET", b"VALID")  # onnx gives strings as bytes
    )


def _group_count(node: onnx.NodeProto) -> int:
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == "group"), 1)
