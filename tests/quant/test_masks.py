"""Attention masks (-inf or -1e9 added to the scores) stay float; the layers around them quantize."""

from __future__ import annotations

import io

import numpy as np
import onnx

import onnxq
from onnxq.io import session
from onnxq.quant import masks


class _Attention:
    """One self-attention block over (batch, tokens, 16) with a padding mask added to the scores:
    built in the graph from a 0/1 input (Where(mask, 0, -inf)) or given as a float input (-1e9
    where padded)."""

    @staticmethod
    def module(additive: bool):
        import torch
        from torch import nn

        class Block(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.qkv, self.out = nn.Linear(16, 48), nn.Linear(16, 4)

            def forward(self, x, mask):
                q, k, v = self.qkv(x).chunk(3, dim=-1)
                scores = q @ k.transpose(1, 2) / 4.0
                if additive:
                    scores = scores + mask[:, None, :]
                else:  # as transformers builds it: Where(mask, 0, -inf), added to the scores
                    padded = mask[:, None, :] < 0.5
                    scores = scores + torch.where(padded, float("-inf"), 0.0)
                return self.out((torch.softmax(scores, -1) @ v).mean(1))

        torch.manual_seed(0)
        return Block().eval()

    @staticmethod
    def export(additive: bool) -> onnx.ModelProto:
        import torch

        return _export_with_mask(_Attention.module(additive), torch.zeros(1, 6, 16), torch.ones(1, 6))

    @staticmethod
    def data(additive: bool, count: int = 48) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(0)
        keep = np.ones((count, 6), np.float32)
        keep[:, 4:] = 0.0  # the last two tokens are padding
        mask = np.where(keep > 0, 0.0, -1e9).astype(np.float32) if additive else keep
        return {"x": rng.standard_normal((count, 6, 16)).astype(np.float32), "mask": mask}


def _export_with_mask(module, x, mask) -> onnx.ModelProto:
    """A module of (x, mask) → logits, exported by TorchScript with a dynamic batch."""
    import torch

    buffer = io.BytesIO()
    torch.onnx.export(
        module,
        (x, mask),
        buffer,
        input_names=["x", "mask"],
        output_names=["logits"],
        dynamic_axes={"x": {0: "n"}, "mask": {0: "n"}},
        opset_version=17,
        dynamo=False,
    )
    return onnx.load_from_string(buffer.getvalue())


def _check(additive: bool) -> None:
    model, data = _Attention.export(additive), _Attention.data(additive)
    result = onnxq.quantize(model, data, onnxq.QuantConfig(speed_check=False))
    if not additive:  # found from the constant before planning
        kept = [name for name, why in result.float_nodes.items() if why == masks.REASON]
        assert kept, result.float_nodes
    softmax_inputs = {n.input[0] for n in result.model.graph.node if n.op_type == "Softmax"}
    rounded = {n.input[0] for n in result.model.graph.node if n.op_type == "QuantizeLinear"}
    assert rounded.isdisjoint({"mask", *softmax_inputs})
    assert result.quantized_nodes > 0
    sample = {k: v[:8] for k, v in data.items()}
    want = session(model).run(None, sample)[0].astype(np.float64)
    got = session(result.model).run(None, sample)[0].astype(np.float64)
    assert 10 * np.log10((want**2).sum() / ((want - got) ** 2).sum()) > 25.0


def test_a_mask_built_from_an_infinite_constant_stays_float():
    """Found from the -inf constant, before any data is seen (the searched calibrations never
    observe min-max ranges)."""
    from onnxq.passes.infer_types import typed_ir

    graph = typed_ir(_Attention.export(additive=False)).graph
    assert masks.unbounded_tensors(graph)
    _check(additive=False)


def test_an_additive_mask_given_as_input_stays_float():
    """-1e9 where padded, added to the scores: no constant shows it; only the float Softmax reads
    the sum, so no pair rounds it."""
    from onnxq.passes.infer_types import typed_ir

    graph = typed_ir(_Attention.export(additive=True)).graph
    assert not masks.unbounded_tensors(graph)
    _check(additive=True)


def test_a_layer_reading_a_masked_input_stays_float_once_its_range_is_observed():
    """A -1e9 mask added to features a Linear reads: no constant shows it, the observed range of
    the sum does, and the Linear stays float while the one before it quantizes."""
    import torch
    from torch import nn

    class Masked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.head = nn.Linear(6, 6), nn.Linear(6, 3)

        def forward(self, x, mask):
            return self.head(self.embed(x) + mask)

    torch.manual_seed(0)
    model = _export_with_mask(Masked().eval(), torch.zeros(1, 6), torch.zeros(1, 6))
    rng = np.random.default_rng(0)
    mask = np.where(rng.random((48, 6)) < 0.3, -1e9, 0.0).astype(np.float32)
    data = {"x": rng.standard_normal((48, 6)).astype(np.float32), "mask": mask}
    result = onnxq.quantize(model, data, onnxq.QuantConfig(speed_check=False, fidelity_fallback=False))
    kept = [name for name, why in result.float_nodes.items() if why == masks.REASON]
    assert kept and result.quantized_nodes > 0
    sample = {k: v[:8] for k, v in data.items()}
    want = session(model).run(None, sample)[0]
    assert np.isfinite(session(result.model).run(None, sample)[0]).all() and np.isfinite(want).all()


def test_an_infinite_bound_or_padding_under_a_maxpool_marks_nothing_downstream():
    """Max(x, -inf) is x (jax2tf's softmax writes it: magika); -inf padding is gone after the
    MaxPool it feeds. Neither may keep the layers after it float."""
    from onnx import TensorProto, helper, numpy_helper

    from onnxq.io import to_ir

    minus_inf = numpy_helper.from_array(np.array([-np.inf], np.float32), "minus_inf")
    pads = numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads")
    nodes = [
        helper.make_node("Max", ["x", "minus_inf"], ["bounded"]),
        helper.make_node("Pad", ["bounded", "pads", "minus_inf"], ["padded"]),
        helper.make_node("MaxPool", ["padded"], ["pooled"], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["pooled"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 4])],
        [minus_inf, pads],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    assert masks.unbounded_tensors(to_ir(model).graph) == {"padded"}
