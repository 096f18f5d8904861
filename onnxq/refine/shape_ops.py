"""ONNX operators in torch for the mirror (ops.OPS), continued: what moves, picks and reshapes
tensors (Concat, Split, Slice, Reshape, Resize, Gather, ...) and the ops of detector and
segmentation heads and samplers (ArgMax, TopK, DepthToSpace, CumSum, Einsum, GridSample).
Integer tensors (shapes, indices) are torch int64 tensors, as in ops.py.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
from onnx import helper

from onnxq.refine.ops import OPS, ints, op, reduce_axes

# ----------------------------------------------------------------------------- shapes


@op("Concat")
def concat(attrs, *xs):
    return (torch.cat([x for x in xs if x is not None], dim=attrs["axis"]),)


@op("Split")
def split(attrs, x, sizes=None, *, outputs: int = 1):
    axis = attrs.get("axis", 0) % x.dim()
    if sizes is None:
        sizes = attrs.get("split")
    if sizes is None:
        parts = attrs.get("num_outputs", outputs)
        chunk = -(-x.shape[axis] // parts)
        sizes = [min(chunk, x.shape[axis] - i * chunk) for i in range(parts)]
    return tuple(torch.split(x, ints(sizes), dim=axis))


@op("Slice")
def slice_(attrs, x, starts, ends, axes=None, steps=None):
    starts, ends = ints(starts), ints(ends)
    axes = ints(axes) if axes is not None else list(range(len(starts)))
    steps = ints(steps) if steps is not None else [1] * len(starts)
    index = [slice(None)] * x.dim()
    flips = []
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        axis %= x.dim()
        size = x.shape[axis]
        if step > 0:
            start, end = (max(0, min(size, v + size if v < 0 else v)) for v in (start, end))
            index[axis] = slice(start, end, step)
        else:  # torch has no negative steps: take the reversed range, then flip
            start = max(-1, min(size - 1, start + size if start < 0 else start))
            end = max(-1, min(size - 1, end + size if end < 0 else end))
            index[axis] = slice(end + 1, start + 1)
            flips.append((axis, -step))
    y = x[tuple(index)]
    for axis, step in flips:
        y = torch.flip(y, [axis])
        if step != 1:
            y = y[tuple([slice(None)] * axis + [slice(None, None, step)])]
    return (y,)


@op("Reshape")
def reshape(attrs, x, shape):
    shape = ints(shape)
    if not attrs.get("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return (x.reshape(shape),)


@op("Flatten")
def flatten(attrs, x):
    axis = attrs.get("axis", 1)
    axis = axis + x.dim() if axis < 0 else axis
    lead = int(np.prod(x.shape[:axis])) if axis else 1
    return (x.reshape(lead, -1),)


@op("Transpose")
def transpose(attrs, x):
    perm = attrs.get("perm", list(reversed(range(x.dim()))))
    return (x.permute(*perm),)


@op("Squeeze")
def squeeze(attrs, x, axes=None):
    dims = reduce_axes(attrs, x, axes)
    if dims is None:
        return (x.squeeze(),)
    for d in sorted(dims, reverse=True):
        x = x.squeeze(d)
    return (x,)


@op("Unsqueeze")
def unsqueeze(attrs, x, axes=None):
    axes = attrs.get("axes") if axes is None else ints(axes)
    rank = x.dim() + len(axes)
    for d in sorted(a % rank for a in axes):
        x = x.unsqueeze(d)
    return (x,)


@op("Pad")
def pad(attrs, x, pads=None, value=None, axes=None):
    pads = ints(pads) if pads is not None else list(attrs["pads"])
    mode = attrs.get("mode", "constant")
    rank = x.dim()
    axes = [a % rank for a in ints(axes)] if axes is not None else list(range(rank))
    begin, end = pads[: len(axes)], pads[len(axes) :]
    full = {a: (b, e) for a, b, e in zip(axes, begin, end, strict=True)}
    torch_pads = []
    for axis in reversed(range(rank)):
        torch_pads += list(full.get(axis, (0, 0)))
    while len(torch_pads) > 2 and torch_pads[-2:] == [0, 0]:
        torch_pads = torch_pads[:-2]
    if mode == "constant":
        fill = float(value.reshape(-1)[0]) if value is not None and value.numel() else 0.0
        return (F.pad(x, torch_pads, value=fill),)
    torch_mode = {"reflect": "reflect", "edge": "replicate", "wrap": "circular"}[mode]
    return (F.pad(x, torch_pads, mode=torch_mode),)


@op("Resize")
def resize(attrs, x, roi=None, scales=None, sizes=None):
    mode = attrs.get("mode", "nearest")
    transform = attrs.get("coordinate_transformation_mode", "half_pixel")
    if sizes is not None and sizes.numel():
        size = ints(sizes)[2:]
    else:
        factors = [float(s) for s in scales.tolist()][2:]
        size = [math.floor(d * f) for d, f in zip(x.shape[2:], factors, strict=True)]
    if mode == "nearest":
        nearest = attrs.get("nearest_mode", "round_prefer_floor")
        integral = all(s % d == 0 for s, d in zip(size, x.shape[2:], strict=True))
        if (transform == "asymmetric" and nearest == "floor") or (integral and transform != "align_corners"):
            return (F.interpolate(x, size=size, mode="nearest"),)
        raise NotImplementedError(f"Resize nearest with {transform}/{nearest} at non-integer scales")
    if mode == "linear" and x.dim() in (3, 4, 5):
        torch_mode = {3: "linear", 4: "bilinear", 5: "trilinear"}[x.dim()]
        if transform == "align_corners":
            return (F.interpolate(x, size=size, mode=torch_mode, align_corners=True),)
        if transform in ("half_pixel", "pytorch_half_pixel"):
            return (F.interpolate(x, size=size, mode=torch_mode, align_corners=False),)
    raise NotImplementedError(f"Resize {mode} with {transform}")


@op("Upsample")
def upsample(attrs, x, scales):
    size = [int(d * float(f)) for d, f in zip(x.shape[2:], scales.tolist()[2:], strict=True)]
    return (F.interpolate(x, size=size, mode="nearest"),)


@op("Shape")
def shape(attrs, x):
    dims = torch.tensor(list(x.shape), dtype=torch.int64)
    start, end = attrs.get("start", 0), attrs.get("end")
    return (dims[start:end],)


@op("Size")
def size(attrs, x):
    return (torch.tensor(x.numel(), dtype=torch.int64),)


@op("Gather")
def gather(attrs, x, indices):
    axis = attrs.get("axis", 0) % x.dim()
    index = torch.where(indices < 0, indices + x.shape[axis], indices).long()
    y = torch.index_select(x, axis, index.reshape(-1))
    return (y.reshape((*x.shape[:axis], *index.shape, *x.shape[axis + 1 :])),)


@op("Expand")
def expand(attrs, x, shape):
    return (x.expand(torch.broadcast_shapes(x.shape, tuple(ints(shape)))),)


@op("Tile")
def tile(attrs, x, repeats):
    return (x.repeat(*ints(repeats)),)


@op("Where")
def where(attrs, condition, a, b):
    return (torch.where(condition.bool(), a, b),)


@op("Not")
def logical_not(attrs, x):
    return (~x.bool(),)


@op("Range")
def arange(attrs, start, limit, delta):
    return (torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype),)


@op("ConstantOfShape")
def constant_of_shape(attrs, shape):
    value = attrs.get("value")  # float32 zero when absent
    fill = torch.as_tensor(np.asarray(value)) if value is not None else torch.zeros(1)
    return (fill.reshape(-1)[0].expand(*ints(shape)).clone(),)


@op("Cast")
def cast(attrs, x):

    dtype = torch.from_numpy(np.zeros(0, helper.tensor_dtype_to_np_dtype(attrs["to"]))).dtype
    return (x.to(dtype),)


@op("Min")
def minimum(attrs, *xs):
    return (functools.reduce(torch.minimum, xs),)


@op("Max")
def maximum(attrs, *xs):
    return (functools.reduce(torch.maximum, xs),)


@op("Sum")
def total(attrs, *xs):
    return (functools.reduce(torch.add, xs),)


@op("Mean")
def mean(attrs, *xs):
    return (OPS["Sum"](attrs, *xs)[0] / len(xs),)


@op("ArgMax")
def argmax(attrs, x):
    axis, keep = attrs.get("axis", 0), bool(attrs.get("keepdims", 1))
    return (torch.argmax(x, dim=axis, keepdim=keep),)


@op("DepthToSpace")
def depth_to_space(attrs, x):
    block = attrs["blocksize"]
    mode = attrs.get("mode", "DCR")
    n, c, h, w = x.shape
    if mode == "CRD":
        return (F.pixel_shuffle(x, block),)
    y = x.reshape(n, block, block, c // block**2, h, w).permute(0, 3, 4, 1, 5, 2)
    return (y.reshape(n, c // block**2, h * block, w * block),)


# ----------------------------------------------------------------------------- heads and samplers


@op("CumSum")
def cumsum(attrs, x, axis):
    axis, reverse = int(axis.reshape(-1)[0]) % x.dim(), bool(attrs.get("reverse", 0))
    ordered = x.flip(axis) if reverse else x
    total = torch.cumsum(ordered, axis)
    if attrs.get("exclusive", 0):
        total = total - ordered
    return (total.flip(axis) if reverse else total,)


@op("TopK")
def top_k(attrs, x, k):
    largest, ordered = bool(attrs.get("largest", 1)), bool(attrs.get("sorted", 1))
    values, indices = torch.topk(x, int(k.reshape(-1)[0]), attrs.get("axis", -1), largest, ordered)
    return values, indices.long()


@op("Einsum")
def einsum(attrs, *operands):
    return (torch.einsum(attrs["equation"], *operands),)


GRID_MODES = {
    "linear": "bilinear",
    "bilinear": "bilinear",
    "nearest": "nearest",
    "cubic": "bicubic",
    "bicubic": "bicubic",
}


@op("GridSample")
def grid_sample(attrs, x, grid):
    mode = GRID_MODES.get(attrs.get("mode", "linear"))  # opset 16 says bilinear, 20 linear
    if mode is None or (mode == "bicubic" and x.dim() != 4):
        raise NotImplementedError  # onnxruntime runs it
    padding = attrs.get("padding_mode", "zeros")
    corners = bool(attrs.get("align_corners", 0))
    return (F.grid_sample(x, grid, mode=mode, padding_mode=padding, align_corners=corners),)


@op("AffineGrid")
def affine_grid(attrs, theta, size):
    return (F.affine_grid(theta, ints(size), align_corners=bool(attrs.get("align_corners", 0))),)
