"""Layers read a residual sum through their own quantizer: the Adds keep --addend-bits, the layers
A bits, and the float model is unchanged."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnxq
from onnxq.config import QuantConfig
from onnxq.io import session, to_ir
from onnxq.passes.split_addend_reads import is_layer_read, split_addend_reads
from onnxq.quant.plan import plan_quantization
from tests.conftest import export

LAYERS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


def residual_model() -> onnx.ModelProto:
    """A stem and two ResNet basic blocks with identity shortcuts: each block's input is read by
    its first conv and by its Add."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
            self.conv2 = nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(x + self.conv2(torch.relu(self.conv1(x))))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.blocks = nn.Sequential(Block(), Block())
            self.head = nn.Linear(8, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.blocks(torch.relu(self.stem(x)))
            return self.head(y.mean((2, 3)))

    torch.manual_seed(0)
    return export(Net(), torch.zeros(1, 3, 12, 12))


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return residual_model()


def _inputs() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((40, 3, 12, 12)).astype(np.float32)


def test_each_block_input_is_split_and_the_float_outputs_match(model):
    split, count = split_addend_reads(model, LAYERS)
    assert count == 2  # the stem's output and the first block's output; the second's goes to the head
    identities = [n for n in split.graph.node if n.op_type == "Identity"]
    assert len(identities) == 2 and all(is_layer_read(n.name) for n in identities)
    readers = {n.input[0]: n.op_type for n in split.graph.node if n.op_type == "Conv"}
    assert sum(name.startswith("onnxq_layer_read/") for name in readers) == 2
    assert not any(n.op_type == "Identity" for n in model.graph.node)  # its input is not changed
    x = _inputs()[:4]
    want = session(model, optimize=False).run(None, {"input": x})[0]
    got = session(split, optimize=False).run(None, {"input": x})[0]
    np.testing.assert_array_equal(got, want)


def test_the_plan_gives_the_sum_addend_bits_and_the_layers_a_bits(model):
    split, _ = split_addend_reads(model, LAYERS)
    plan = plan_quantization(to_ir(split).graph, QuantConfig(weight_bits=4, activation_bits=4))
    copies = [name for name in plan.activations if is_layer_read(name)]
    assert len(copies) == 2
    for copy in copies:
        source = next(n.input[0] for n in split.graph.node if n.output[0] == copy)
        root = plan.activations[plan.root(_planned(plan, source, split))]
        assert (root.bits, plan.activations[copy].bits, plan.activations[copy].shares) == (8, 4, None)


def test_where_the_adds_cannot_widen_the_layers_share_the_quantizer(model):
    """addend_bits 4: the Identity's quantizer shares the tensor's, so quantizing twice is exact."""
    split, _ = split_addend_reads(model, LAYERS)
    plan = plan_quantization(to_ir(split).graph, QuantConfig(weight_bits=4, activation_bits=4, addend_bits=4))
    copies = [spec for name, spec in plan.activations.items() if is_layer_read(name)]
    assert copies and all(spec.shares is not None and spec.bits == 4 for spec in copies)


def _planned(plan, tensor: str, model: onnx.ModelProto) -> str:
    """The activation a tensor is planned under: an absorbed Relu's output is its producer's."""
    if tensor in plan.activations:
        return tensor
    producer = next(n for n in model.graph.node if tensor in n.output)
    return producer.input[0]


def _widths_read(model: onnx.ModelProto, op_type: str) -> list[str]:
    """For each input of each `op_type` node that comes from a DequantizeLinear: 'narrow' where a
    Clip precedes its QuantizeLinear (a width under 8 bits), else '8'."""
    producer = {o: n for n in model.graph.node for o in n.output}
    widths = []
    for node in model.graph.node:
        if node.op_type != op_type:
            continue
        for name in node.input[:1] if op_type == "Conv" else node.input:
            dequantize = producer.get(name)
            if dequantize is None or dequantize.op_type != "DequantizeLinear":
                continue
            before = producer.get(producer[dequantize.input[0]].input[0])
            widths.append("narrow" if before is not None and before.op_type == "Clip" else "8")
    return widths


@pytest.mark.parametrize("addend_bits", [8, 4])
def test_quantized_adds_read_addend_bits_and_convs_a_bits(model, addend_bits):
    config = QuantConfig(
        weight_bits=4, activation_bits=4, addend_bits=addend_bits, speed_check=False, fidelity_fallback=False
    )
    result = onnxq.quantize(model, _inputs(), config)
    adds = _widths_read(result.model, "Add")
    convs = _widths_read(result.model, "Conv")
    assert len(adds) == 4 and convs.count("narrow") >= 4
    assert set(adds) == ({"8"} if addend_bits == 8 else {"narrow"})
    assert set(convs[1:]) == {"narrow"}  # every conv after the 8-bit first layer reads 4 bits
    copies = [n for n in result.model.graph.node if n.op_type == "Identity" and is_layer_read(n.name)]
    assert len(copies) == (2 if addend_bits == 8 else 0)
    x = _inputs()[:8]
    want = session(model).run(None, {"input": x})[0]
    got = session(result.model).run(None, {"input": x})[0]
    sqnr = 10 * np.log10(np.sum(want**2) / np.sum((got - want) ** 2))
    assert sqnr > 10


def test_eight_bit_activations_split_nothing(model):
    result = onnxq.quantize(model, _inputs(), QuantConfig(speed_check=False, fidelity_fallback=False))
    assert not any(n.op_type == "Identity" for n in result.model.graph.node)


@pytest.mark.parametrize(("flag", "copies"), [("--split-sums", 2), ("--no-split-sums", 0)])
def test_the_command_line_switch(tmp_path, model, flag, copies):
    from click.testing import CliRunner

    from onnxq.cli import main

    source, target, calib = tmp_path / "net.onnx", tmp_path / "net.q.onnx", tmp_path / "calib.npy"
    onnx.save(model, source)
    np.save(calib, _inputs())
    args = ["quantize", source, "-o", target, "--calib", calib, "--w-bits", "4", "--a-bits", "4", flag]
    result = CliRunner().invoke(main, [str(a) for a in [*args, "--no-speed-check"]])
    assert result.exit_code == 0, result.output
    saved = onnx.load(target)
    assert sum(n.op_type == "Identity" and is_layer_read(n.name) for n in saved.graph.node) == copies
