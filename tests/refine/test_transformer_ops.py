"""The mirror's transformer ops (refine/transformer_ops.py) compute what onnxruntime computes:
RMSNormalization and Attention as torch's dynamo exporter writes them at opset 23."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

torch = pytest.importorskip("torch")

from onnxq.refine.mirror import Mirror  # noqa: E402
from tests.refine.test_ops import assert_mirror_matches, graph_model, rng, single_node  # noqa: E402


@settings(max_examples=10, deadline=None)
@given(st.integers(1, 3), st.integers(2, 6), st.sampled_from([-1, -2, 1]), st.integers(0, 10**6))
def test_rms_normalization_matches(batch, features, axis, seed):
    r = rng(seed)
    x = (r.standard_normal((batch, 5, features)) * 3 + 1).astype(np.float32)
    scale = r.standard_normal(x.shape[axis:]).astype(np.float32)
    model = single_node("RMSNormalization", {"x": x}, {"s": scale}, opset=23, axis=axis, epsilon=1e-5)
    assert_mirror_matches(model, {"x": x})


@settings(max_examples=20, deadline=None)
@given(
    flat=st.booleans(),
    kv_heads=st.sampled_from([1, 2]),
    group=st.sampled_from([1, 2]),
    lengths=st.sampled_from([(4, 4), (3, 5)]),
    mask=st.sampled_from([None, "bool", "float"]),
    causal=st.booleans(),
    softcap=st.sampled_from([0.0, 2.0]),
    scale=st.sampled_from([None, 0.3]),
    seed=st.integers(0, 10**6),
)
def test_attention_matches(flat, kv_heads, group, lengths, mask, causal, softcap, scale, seed):
    """3-D and 4-D inputs, grouped key/value heads, boolean and additive masks, causality,
    softcap and scale."""
    r = rng(seed)
    heads, size, (queries, keys) = kv_heads * group, 4, lengths
    if flat:
        q = r.standard_normal((2, queries, heads * size)).astype(np.float32)
        k, v = (r.standard_normal((2, keys, kv_heads * size)).astype(np.float32) for _ in range(2))
        attrs = {"q_num_heads": heads, "kv_num_heads": kv_heads}
    else:
        q = r.standard_normal((2, heads, queries, size)).astype(np.float32)
        k, v = (r.standard_normal((2, kv_heads, keys, size)).astype(np.float32) for _ in range(2))
        attrs = {}
    feeds = {"q": q, "k": k, "v": v}
    if mask == "bool":
        allowed = r.random((queries, keys)) > 0.3
        allowed[:, 0] = True  # no row masked whole
        feeds["m"] = allowed
    elif mask == "float":
        feeds["m"] = r.standard_normal((1, 1, queries, keys)).astype(np.float32)
    attrs |= {"is_causal": int(causal), "softcap": softcap} | ({"scale": scale} if scale else {})
    assert_mirror_matches(single_node("Attention", feeds, {}, opset=23, **attrs), feeds)


def test_attention_with_a_key_value_cache_returns_it():
    r = rng(0)
    q = r.standard_normal((2, 2, 3, 4)).astype(np.float32)
    k, v = (r.standard_normal((2, 2, 3, 4)).astype(np.float32) for _ in range(2))
    past_k, past_v = (r.standard_normal((2, 2, 5, 4)).astype(np.float32) for _ in range(2))
    feeds = {"q": q, "k": k, "v": v, "m": np.zeros((3, 8), np.float32), "pk": past_k, "pv": past_v}
    assert_mirror_matches(single_node("Attention", feeds, {}, outputs=3, opset=23), feeds)


def test_attention_returning_its_qk_product_runs_in_onnxruntime():
    r = rng(1)
    q, k, v = (r.standard_normal((1, 2, 3, 4)).astype(np.float32) for _ in range(3))
    node = helper.make_node("Attention", ["q", "k", "v"], ["y0", "", "", "y1"], qk_matmul_output_mode=1)
    model = graph_model([node], {"q": q, "k": k, "v": v}, {}, outputs=2, opset=23)
    mirror = Mirror(model)
    with torch.no_grad():
        got = mirror({n: torch.from_numpy(a) for n, a in {"q": q, "k": k, "v": v}.items()}, quantized=False)
    assert not mirror.nodes[0].in_torch
    scores = q @ k.transpose(0, 1, 3, 2) / 2.0
    np.testing.assert_allclose(got[1].numpy(), scores, atol=1e-5)


def test_attention_over_a_row_masked_whole_is_zero_with_finite_gradients():
    """A padding query that may attend to no key: onnxruntime gives zeros; the mirror the same,
    and gradients without NaN, which would spread to every weight learned through it."""
    r = rng(2)
    q, k, v = (r.standard_normal((1, 2, 3, 4)).astype(np.float32) for _ in range(3))
    allowed = np.ones((3, 3), bool)
    allowed[1] = False
    feeds = {"q": q, "k": k, "v": v, "m": allowed}
    model = single_node("Attention", feeds, {}, opset=23)
    assert_mirror_matches(model, feeds)
    mirror = Mirror(model)
    inputs = {n: torch.from_numpy(a).requires_grad_(a.dtype == np.float32) for n, a in feeds.items()}
    (y,) = mirror(inputs, quantized=False)
    assert torch.all(y[:, :, 1] == 0)
    y.sum().backward()
    assert all(torch.isfinite(inputs[n].grad).all() for n in ("q", "k", "v"))
