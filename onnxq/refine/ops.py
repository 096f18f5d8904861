"""ONNX operators in torch, as onnxruntime computes them, so gradients can flow through a model.

One function per op type: `fn(attrs, *inputs) -> tuple of outputs`. Integer tensors (shapes,
indices) are torch int64 tensors too; ops without an entry here are run by onnxruntime without a
gradient (see mirror.py), so a table miss costs refinement of one block, never correctness.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

Op = Callable[..., tuple]
OPS: dict[str, Op] = {}


def op(*names: str):
    def register(fn: Op) -> Op:
        for name in names:
            OPS[name] = fn
        return fn

    return register


def _ints(t) -> list[int]:
    return [int(v) for v in (t.tolist() if isinstance(t, torch.Tensor) else t)]


# ----------------------------------------------------------------------------- layers


def _conv_padding(attrs: dict, x: torch.Tensor, kernel: list[int], strides, dilations):
    """Explicit (begin..., end...) pads, resolving auto_pad as onnxruntime does."""
    spatial = len(kernel)
    auto = attrs.get("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads_begin, pads_end = [], []
        for i in range(spatial):
            size = x.shape[2 + i]
            out = -(-size // strides[i])
            total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size)
            small, large = total // 2, total - total // 2
            pads_begin.append(small if auto == "SAME_UPPER" else large)
            pads_end.append(large if auto == "SAME_UPPER" else small)
        return pads_begin + pads_end
    if auto == "VALID":
        return [0] * (2 * spatial)
    return list(attrs.get("pads", [0] * (2 * spatial)))


def _pad_input(x: torch.Tensor, pads: list[int], value: float = 0.0) -> tuple[torch.Tensor, list[int]]:
    """Pads torch can take as symmetric (one per axis), applying the rest with F.pad."""
    spatial = len(pads) // 2
    begin, end = pads[:spatial], pads[spatial:]
    if begin == end:
        return x, begin
    extra = []
    for b, e in zip(reversed(begin), reversed(end), strict=True):
        extra += [b, e]
    return F.pad(x, extra, value=value), [0] * spatial


@op("Conv")
def conv(attrs, x, w, b=None):
    kernel = list(w.shape[2:])
    strides = list(attrs.get("strides", [1] * len(kernel)))
    dilations = list(attrs.get("dilations", [1] * len(kernel)))
    x, padding = _pad_input(x, _conv_padding(attrs, x, kernel, strides, dilations))
    if x.dim() == 4:
        # oneDNN's depthwise and 1×1 convs run forward and backward 2.5–3× faster on CPU with
        # channels-last inputs; outputs keep the layout, so a chain of convs converts once. A
        # strided 1×1 conv is the exception: torch 2.13's backward of one on a channels-last
        # input with fewer than 16 channels (stride 2: FastViT's stem) corrupts the heap.
        strided_pointwise = kernel == [1, 1] and any(s > 1 for s in strides)
        x = x.contiguous(memory_format=torch.contiguous_format if strided_pointwise else torch.channels_last)
    fn = (F.conv1d, F.conv2d, F.conv3d)[len(kernel) - 1]
    return (fn(x, w, b, strides, padding, dilations, attrs.get("group", 1)),)


@op("ConvTranspose")
def conv_transpose(attrs, x, w, b=None):
    spatial = w.dim() - 2
    strides = list(attrs.get("strides", [1] * spatial))
    dilations = list(attrs.get("dilations", [1] * spatial))
    pads = list(attrs.get("pads", [0] * (2 * spatial)))
    output_padding = list(attrs.get("output_padding", [0] * spatial))
    fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[spatial - 1]
    y = fn(x, w, b, strides, 0, output_padding, attrs.get("group", 1), dilations)
    crop = [slice(None), slice(None)]
    for i in range(spatial):
        crop.append(slice(pads[i], y.shape[2 + i] - pads[spatial + i]))
    return (y[tuple(crop)],)


@op("Gemm")
def gemm(attrs, a, b, c=None):
    a = a.transpose(0, 1) if attrs.get("transA", 0) else a
    b = b.transpose(0, 1) if attrs.get("transB", 0) else b
    y = attrs.get("alpha", 1.0) * (a @ b)
    return (y if c is None else y + attrs.get("beta", 1.0) * c,)


@op("MatMul")
def matmul(attrs, a, b):
    return (torch.matmul(a, b),)


# ----------------------------------------------------------------------------- elementwise

UNARY = {
    "Relu": F.relu,
    "Sigmoid": torch.sigmoid,
    "Tanh": torch.tanh,
    "Exp": torch.exp,
    "Log": torch.log,
    "Sqrt": torch.sqrt,
    "Reciprocal": torch.reciprocal,
    "Neg": torch.neg,
    "Abs": torch.abs,
    "Erf": torch.erf,
    "Floor": torch.floor,
    "Ceil": torch.ceil,
    "Softplus": F.softplus,
    "Mish": F.mish,
    "Sin": torch.sin,  # sine position embeddings (DETR's, computed from the mask)
    "Cos": torch.cos,
    "Atan": torch.atan,
    "Sign": torch.sign,
    "Round": torch.round,  # half to even, as ONNX
    "IsNaN": torch.isnan,
}
BINARY = {
    "Add": torch.add,
    "Sub": torch.sub,
    "Mul": torch.mul,
    "Pow": torch.pow,
    "Equal": torch.eq,
    "Less": torch.lt,
    "Greater": torch.gt,
    "LessOrEqual": torch.le,
    "GreaterOrEqual": torch.ge,
    "And": torch.logical_and,
    "Or": torch.logical_or,
    "Xor": torch.logical_xor,
}
for _name, _fn in UNARY.items():
    OPS[_name] = lambda attrs, x, fn=_fn: (fn(x),)
for _name, _fn in BINARY.items():
    OPS[_name] = lambda attrs, a, b, fn=_fn: (fn(a, b),)


@op("Div")
def div(attrs, a, b):
    if not a.is_floating_point() and not b.is_floating_point():
        return (torch.div(a, b, rounding_mode="trunc"),)
    return (a / b,)


@op("Clip")
def clip(attrs, x, low=None, high=None):
    low = _scalar(attrs.get("min") if low is None else low)
    high = _scalar(attrs.get("max") if high is None else high)
    if x.is_floating_point() and isinstance(low, float) and isinstance(high, float) and low <= high:
        # One fused op: maximum then minimum with tensor bounds cost ReLU6 7× more forward and
        # backward, a third of MobileNetV2's refinement time.
        return (F.hardtanh(x, low, high),)
    if low is not None:
        x = torch.maximum(x, torch.as_tensor(low, dtype=x.dtype))
    if high is not None:
        x = torch.minimum(x, torch.as_tensor(high, dtype=x.dtype))
    return (x,)


def _scalar(bound):
    """A bound of one value as a Python float; a tensor of several (or None) as it is."""
    if isinstance(bound, torch.Tensor) and bound.numel() == 1 and bound.is_floating_point():
        return float(bound)
    return float(bound) if isinstance(bound, int | float) else bound


@op("HardSigmoid")
def hard_sigmoid(attrs, x):
    return (torch.clamp(attrs.get("alpha", 0.2) * x + attrs.get("beta", 0.5), 0.0, 1.0),)


@op("HardSwish")
def hard_swish(attrs, x):
    return (x * torch.clamp(x / 6.0 + 0.5, 0.0, 1.0),)


@op("LeakyRelu")
def leaky_relu(attrs, x):
    return (F.leaky_relu(x, attrs.get("alpha", 0.01)),)


@op("Elu")
def elu(attrs, x):
    return (F.elu(x, attrs.get("alpha", 1.0)),)


@op("PRelu")
def prelu(attrs, x, slope):
    """x where x ≥ 0, else slope·x, as a sum: torch's CPU `where` on a data-dependent mask ran
    about twenty times slower than an elementwise op (see quantizers.blend)."""
    return (torch.clamp_min(x, 0) + slope * torch.clamp_max(x, 0),)


@op("Identity", "Dropout")
def identity(attrs, x, *rest):
    return (x,)


@op("Softmax")
def softmax(attrs, x):
    return (torch.softmax(x, attrs.get("axis", -1)),)


@op("LogSoftmax")
def log_softmax(attrs, x):
    return (torch.log_softmax(x, attrs.get("axis", -1)),)


@op("BatchNormalization")
def batch_norm(attrs, x, scale, bias, mean, var):
    return (F.batch_norm(x, mean, var, scale, bias, False, 0.0, attrs.get("epsilon", 1e-5)),)


@op("InstanceNormalization")
def instance_norm(attrs, x, scale, bias):
    return (F.instance_norm(x, weight=scale, bias=bias, eps=attrs.get("epsilon", 1e-5)),)


# ----------------------------------------------------------------------------- pooling


def _pool_padding(attrs, x, kernel, strides):
    return _conv_padding(attrs, x, kernel, strides, [1] * len(kernel))


@op("GlobalAveragePool")
def global_average_pool(attrs, x):
    return (x.mean(dim=tuple(range(2, x.dim())), keepdim=True),)


@op("GlobalMaxPool")
def global_max_pool(attrs, x):
    return (x.amax(dim=tuple(range(2, x.dim())), keepdim=True),)


@op("AveragePool")
def average_pool(attrs, x):
    kernel = list(attrs["kernel_shape"])
    strides = list(attrs.get("strides", [1] * len(kernel)))
    pads = _pool_padding(attrs, x, kernel, strides)
    include = bool(attrs.get("count_include_pad", 0))
    ceil_mode = bool(attrs.get("ceil_mode", 0))
    x, padding = _pad_input(x, pads) if include else (x, None)
    if padding is None:
        spatial = len(kernel)
        if pads[:spatial] != pads[spatial:]:
            raise NotImplementedError("asymmetric AveragePool pads without count_include_pad")
        padding = pads[:spatial]
    fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[len(kernel) - 1]
    return (fn(x, kernel, strides, padding, ceil_mode, include),)


@op("MaxPool")
def max_pool(attrs, x):
    kernel = list(attrs["kernel_shape"])
    strides = list(attrs.get("strides", [1] * len(kernel)))
    dilations = list(attrs.get("dilations", [1] * len(kernel)))
    x, padding = _pad_input(x, _pool_padding(attrs, x, kernel, strides), value=-math.inf)
    fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[len(kernel) - 1]
    return (fn(x, kernel, strides, padding, dilations, bool(attrs.get("ceil_mode", 0))),)


def _axes(attrs, x, axes_input):
    axes = attrs.get("axes") if axes_input is None else _ints(axes_input)
    return None if axes is None or len(axes) == 0 else [a % x.dim() for a in axes]


def _reduce(fn):
    def reduce(attrs, x, axes=None):
        dims = _axes(attrs, x, axes)
        if dims is None and attrs.get("noop_with_empty_axes", 0):
            return (x,)
        dims = list(range(x.dim())) if dims is None else dims
        return (fn(x, dims, bool(attrs.get("keepdims", 1))),)

    return reduce


OPS["ReduceMean"] = _reduce(lambda x, d, k: x.mean(dim=d, keepdim=k))
OPS["ReduceSum"] = _reduce(lambda x, d, k: x.sum(dim=d, keepdim=k))
OPS["ReduceMax"] = _reduce(lambda x, d, k: x.amax(dim=d, keepdim=k))
OPS["ReduceMin"] = _reduce(lambda x, d, k: x.amin(dim=d, keepdim=k))
OPS["ReduceL2"] = _reduce(lambda x, d, k: torch.sqrt((x * x).sum(dim=d, keepdim=k)))
OPS["ReduceSumSquare"] = _reduce(lambda x, d, k: (x * x).sum(dim=d, keepdim=k))


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
    return tuple(torch.split(x, _ints(sizes), dim=axis))


@op("Slice")
def slice_(attrs, x, starts, ends, axes=None, steps=None):
    starts, ends = _ints(starts), _ints(ends)
    axes = _ints(axes) if axes is not None else list(range(len(starts)))
    steps = _ints(steps) if steps is not None else [1] * len(starts)
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
    shape = _ints(shape)
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
    dims = _axes(attrs, x, axes)
    if dims is None:
        return (x.squeeze(),)
    for d in sorted(dims, reverse=True):
        x = x.squeeze(d)
    return (x,)


@op("Unsqueeze")
def unsqueeze(attrs, x, axes=None):
    axes = attrs.get("axes") if axes is None else _ints(axes)
    rank = x.dim() + len(axes)
    for d in sorted(a % rank for a in axes):
        x = x.unsqueeze(d)
    return (x,)


@op("Pad")
def pad(attrs, x, pads=None, value=None, axes=None):
    pads = _ints(pads) if pads is not None else list(attrs["pads"])
    mode = attrs.get("mode", "constant")
    rank = x.dim()
    axes = [a % rank for a in _ints(axes)] if axes is not None else list(range(rank))
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
        size = _ints(sizes)[2:]
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
    return (x.expand(torch.broadcast_shapes(x.shape, tuple(_ints(shape)))),)


@op("Tile")
def tile(attrs, x, repeats):
    return (x.repeat(*_ints(repeats)),)


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
    return (fill.reshape(-1)[0].expand(*_ints(shape)).clone(),)


@op("Cast")
def cast(attrs, x):
    from onnx import helper

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
    return (F.affine_grid(theta, _ints(size), align_corners=bool(attrs.get("align_corners", 0))),)


from onnxq.refine import transformer_ops  # noqa: E402, F401  (registers the transformer ops)
