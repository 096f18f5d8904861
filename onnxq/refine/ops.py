"""ONNX operators in torch, as onnxruntime computes them, so gradients can flow through a model.

One function per op type: `fn(attrs, *inputs) -> tuple of outputs`. Integer tensors (shapes,
indices) are torch int64 tensors too; ops without an entry here are run by onnxruntime without a
gradient (see mirror.py), so a table miss costs refinement of one block, never correctness.
Here: layers, elementwise ops, pooling and reductions; shape_ops.py and transformer_ops.py add
theirs to the same table (OPS).
"""

from __future__ import annotations

import math
from collections.abc import Callable

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


def ints(t) -> list[int]:
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


def reduce_axes(attrs, x, axes_input):
    axes = attrs.get("axes") if axes_input is None else ints(axes_input)
    return None if axes is None or len(axes) == 0 else [a % x.dim() for a in axes]


def _reduce(fn):
    def reduce(attrs, x, axes=None):
        dims = reduce_axes(attrs, x, axes)
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


from onnxq.refine import shape_ops, transformer_ops  # noqa: E402, F401  (register their ops)
