"""The transformer's ops in torch for the mirror (ops.OPS): LayerNormalization, RMSNormalization,
Gelu and Attention, the last three as torch's dynamo exporter writes them at opset 23
(nn.RMSNorm, F.gelu, F.scaled_dot_product_attention). Without them each ran in onnxruntime
without a gradient, so every attention block was cut into units that could not learn through
its normalisation and attention (a small ViT exported at opset 23: 11 of 17 units refined).

Attention covers what exporters write: 3-D inputs with q_num_heads/kv_num_heads or 4-D ones,
grouped key/value heads, a boolean or additive mask, is_causal,
scale, softcap and a key/value cache. Combinations the mirror does not follow (a causal mask
over a cache, the QK product as an output, per-batch key lengths, sliding windows) raise
NotImplementedError: onnxruntime runs the node, as for any op missing from the table.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from onnxq.refine.ops import op


@op("LayerNormalization")
def layer_norm(attrs, x, scale, bias=None):
    """Normalised over the axes from `axis` on (the transformer's LayerNorm); only the first
    output, the others (mean, inverse deviation) are training outputs no export reads."""
    dims = tuple(range(attrs.get("axis", -1) % x.dim(), x.dim()))
    centred = x - x.mean(dim=dims, keepdim=True)
    variance = (centred * centred).mean(dim=dims, keepdim=True)
    y = centred * torch.rsqrt(variance + attrs.get("epsilon", 1e-5)) * scale
    return (y if bias is None else y + bias,)


@op("RMSNormalization")
def rms_norm(attrs, x, scale):
    """x / sqrt(mean(x²) + ε) · scale over the axes from `axis` on."""
    dims = tuple(range(attrs.get("axis", -1) % x.dim(), x.dim()))
    return (x * torch.rsqrt((x * x).mean(dim=dims, keepdim=True) + attrs.get("epsilon", 1e-5)) * scale,)


@op("Gelu")
def gelu(attrs, x):
    tanh = attrs.get("approximate", "none") == "tanh"
    return (F.gelu(x, approximate="tanh" if tanh else "none"),)


UNFOLLOWED = ("qk_matmul_output_mode", "left_window_size", "right_window_size")


@op("Attention")
def attention(attrs, q, k, v, mask=None, past_key=None, past_value=None, *rest, outputs: int = 1):
    """softmax(q·kᵀ·scale (softcapped) + mask)·v per head, as ONNX's Attention (opset 23) and
    onnxruntime compute it; outputs y, and the cache (past and new keys and values) when asked."""
    causal = bool(attrs.get("is_causal", 0))
    if outputs > 3 or any(t is not None for t in rest) or (causal and past_key is not None):
        raise NotImplementedError
    if any(
        attrs.get(name, default) != default for name, default in zip(UNFOLLOWED, (0, -1, -1), strict=True)
    ):
        raise NotImplementedError
    flat = q.dim() == 3
    if flat:
        q = _heads(q, attrs["q_num_heads"])
        k, v = _heads(k, attrs["kv_num_heads"]), _heads(v, attrs["kv_num_heads"])
    if past_key is not None:
        k, v = torch.cat([past_key, k], dim=2), torch.cat([past_value, v], dim=2)
    present_key, present_value = k, v
    if q.shape[1] != k.shape[1]:  # grouped heads: each key/value head serves q_heads/kv_heads
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    scale = attrs.get("scale", 1.0 / math.sqrt(q.shape[-1]))
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    softcap = attrs.get("softcap", 0.0)
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    bias = _bias(mask, causal, scores)
    if bias is None:
        weights = torch.softmax(scores, dim=-1)
    else:  # a row masked whole attends to nothing: zeros, not softmax's NaN (nor NaN gradients)
        nothing = torch.isneginf(bias).all(dim=-1, keepdim=True)
        weights = torch.softmax(torch.where(nothing, torch.zeros_like(scores), scores + bias), dim=-1)
        weights = torch.where(nothing, torch.zeros_like(weights), weights)
    y = torch.matmul(weights, v)
    if flat:
        y = y.transpose(1, 2).reshape(y.shape[0], y.shape[2], -1)
    return (y, present_key, present_value)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[batch, sequence, heads·size] as [batch, heads, sequence, size]."""
    return x.reshape(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


def _bias(mask: torch.Tensor | None, causal: bool, scores: torch.Tensor) -> torch.Tensor | None:
    """The additive bias of a boolean or float mask and of causality."""
    bias = mask
    if mask is not None and mask.dtype == torch.bool:
        bias = torch.zeros(mask.shape, dtype=scores.dtype).masked_fill(~mask, float("-inf"))
    if causal:
        queries, keys = scores.shape[-2:]
        allowed = torch.ones(queries, keys, dtype=torch.bool).tril()
        causal_bias = torch.zeros(queries, keys, dtype=scores.dtype).masked_fill(~allowed, float("-inf"))
        bias = causal_bias if bias is None else bias + causal_bias
    return bias
