"""A MixNet block as torch exports it: a SiLU, its channels split into groups that depthwise convs
of different kernel sizes read, concatenated, and one BatchNormalization over the concatenation.
At 8 bits onnxruntime runs all of it on integers: the BatchNorm folds slice by slice into the
convs, and the Split shares its input's scale (an int8 Split), where a float Split would need a
QuantizeLinear per group and would leave the SiLU before it float."""

from __future__ import annotations

import numpy as np
import onnx

import onnxq
from onnxq.passes.infer_types import typed_ir
from onnxq.quant.plan import plan_quantization
from tests.conftest import deployed_graph, export, randomise_batchnorm


def mixed_block() -> onnx.ModelProto:
    import torch
    from torch import nn

    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 12, 3, padding=1)
            self.small = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
            self.large = nn.Conv2d(4, 4, 5, padding=2, groups=4, bias=False)
            self.bn = nn.BatchNorm2d(12)
            self.head = nn.Conv2d(12, 6, 1)

        def forward(self, x):
            a, b = torch.split(nn.functional.silu(self.stem(x)), [8, 4], dim=1)
            return self.head(nn.functional.silu(self.bn(torch.cat([self.small(a), self.large(b)], dim=1))))

    torch.manual_seed(0)
    module = Mixed()
    randomise_batchnorm(module, seed=1)
    return export(module, torch.zeros(1, 3, 12, 12), keep_bn=True)


def test_a_split_after_a_quantized_tensor_shares_its_scale():
    graph = typed_ir(mixed_block()).graph
    plan = plan_quantization(graph, onnxq.QuantConfig())
    (split,) = [n for n in graph if n.op_type == "Split"]
    assert split.name in plan.quantized_nodes
    roots = {plan.root(v.name) for v in split.outputs}
    assert roots == {plan.root(split.inputs[0].name)}


def test_the_whole_block_runs_on_integer_kernels(tmp_path):
    data = np.random.default_rng(0).standard_normal((16, 3, 12, 12)).astype(np.float32)
    config = onnxq.QuantConfig(fidelity_fallback=False, speed_check=False)
    result = onnxq.quantize(mixed_block(), data, config)
    nodes = deployed_graph(result.model, tmp_path).node
    ops = [n.op_type for n in nodes]
    assert {"BatchNormalization", "Sigmoid", "Mul", "Concat"}.isdisjoint(ops)  # integer kernels
    assert ops.count("QLinearConv") == 3  # the head, whose output is the model's, stays float
    producers = {o: n.op_type for n in nodes for o in n.output}
    splits = [n for n in nodes if n.op_type == "Split"]
    assert splits and all(producers[n.input[0]] == "QLinearMul" for n in splits)
    assert result.fidelity is not None and result.fidelity.min_sqnr > 25
