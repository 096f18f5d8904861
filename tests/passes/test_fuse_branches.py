"""Branch fusion is exact on every re-parameterizable block family exported from torch, and refuses
what it cannot merge exactly, leaving the model's outputs unchanged."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxq.passes.simplify import max_relative_difference
from onnxq.prepare import fuse
from tests.conftest import export, randomise_batchnorm

torch = pytest.importorskip("torch")
nn = torch.nn

TOLERANCE = 1e-4  # of the output's magnitude, at ORT_DISABLE_ALL


def conv_bn(cin, cout, kernel, stride=1, padding=None, groups=1, dilation=1):
    padding = tuple(k // 2 * dilation for k in kernel) if padding is None else padding
    conv = nn.Conv2d(cin, cout, kernel, stride, padding, dilation, groups, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(cout))


class Block(nn.Module):
    """relu(sum of branches(x)), the sum written in the order and nesting given by `nest`."""

    def __init__(self, branches, identity=None, nest=False):
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.identity = identity  # "bn", "bare" or None

        self.identity_bn = nn.BatchNorm2d(branches[0][0].out_channels if identity == "bn" else 1)
        self.nest = nest

    def forward(self, x):
        terms = [branch(x) for branch in self.branches]
        if self.identity == "bn":
            terms.append(self.identity_bn(x))
        elif self.identity == "bare":
            terms.append(x)
        if self.nest:  # a + (b + (c + ...)), the reverse of the usual chain
            total = terms[-1]
            for term in reversed(terms[:-1]):
                total = term + total
        else:
            total = terms[0]
            for term in terms[1:]:
                total = total + term
        return torch.relu(total)


class ChannelAffine(nn.Module):
    """x · γ + β written as Mul and Add nodes (a BatchNorm some exporters emit as arithmetic)."""

    def __init__(self, channels):
        super().__init__()
        self.gamma = nn.Parameter(torch.randn(channels, 1, 1))
        self.beta = nn.Parameter(torch.randn(channels, 1, 1))

    def forward(self, x):
        return x * self.gamma + self.beta


def _sequential_1x1_kxk(cin, cout, bias):
    return nn.Sequential(nn.Conv2d(cin, cout, 1, bias=bias), *conv_bn(cout, cout, (3, 3)))


def _average_branch(channels, bias):
    return nn.Sequential(
        nn.Conv2d(channels, channels, 1, bias=bias),
        nn.AvgPool2d(3, 1, 1, count_include_pad=True),
        nn.BatchNorm2d(channels),
    )


def family(name):
    """(module, input, op types after fusion) for each block family."""
    c = 8
    x = torch.zeros(1, c, 10, 10)
    if name == "repvgg":
        return Block([conv_bn(c, c, (3, 3)), conv_bn(c, c, (1, 1))], "bn"), x, ["Conv", "Relu"]
    if name == "repvgg_stride2":
        branches = [conv_bn(c, 16, (3, 3), 2), conv_bn(c, 16, (1, 1), 2)]
        return Block(branches), x, ["Conv", "Relu"]
    if name == "acnet":
        branches = [conv_bn(c, c, (3, 3)), conv_bn(c, c, (1, 3)), conv_bn(c, c, (3, 1))]
        return Block(branches, nest=True), x, ["Conv", "Relu"]
    if name == "mobileone_depthwise":
        branches = [conv_bn(c, c, (3, 3), groups=c) for _ in range(3)] + [conv_bn(c, c, (1, 1), groups=c)]
        return Block(branches, "bn"), x, ["Conv", "Relu"]
    if name == "mobileone_pointwise":
        return Block([conv_bn(c, 8, (1, 1)) for _ in range(4)], "bn"), x, ["Conv", "Relu"]
    if name == "grouped":
        return (
            Block([conv_bn(c, c, (3, 3), groups=2), conv_bn(c, c, (1, 1), groups=2)], "bn"),
            x,
            [
                "Conv",
                "Relu",
            ],
        )
    if name == "dilated":
        branches = [conv_bn(c, c, (3, 3), dilation=2), conv_bn(c, c, (1, 1))]
        return Block(branches, "bare"), x, ["Conv", "Relu"]
    if name == "bare_identity":
        return Block([conv_bn(c, c, (3, 3))], "bare"), x, ["Conv", "Relu"]
    if name == "dbb":
        branches = [
            conv_bn(c, c, (3, 3)),
            conv_bn(c, c, (1, 1)),
            _average_branch(c, bias=False),
            _sequential_1x1_kxk(c, c, bias=False),
        ]
        return Block(branches), x, ["Conv", "Relu"]
    if name == "channel_affine":
        branches = [nn.Sequential(nn.Conv2d(c, c, 3, padding=1), ChannelAffine(c)), conv_bn(c, c, (1, 1))]
        return Block(branches, "bn"), x, ["Conv", "Relu"]
    raise ValueError(name)


FAMILIES = [
    "repvgg",
    "repvgg_stride2",
    "acnet",
    "mobileone_depthwise",
    "mobileone_pointwise",
    "grouped",
    "dilated",
    "bare_identity",
    "dbb",
    "channel_affine",
]


def _sample(example, seed=0):
    shape = (3, *example.shape[1:])
    return {"input": np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 2}


def _op_types(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


@pytest.mark.parametrize("keep_bn", [False, True], ids=["bn_folded_by_exporter", "bn_kept"])
@pytest.mark.parametrize("name", FAMILIES)
def test_block_family_fuses_exactly_into_one_conv(name, keep_bn):
    torch.manual_seed(0)
    module, example, deployed = family(name)
    randomise_batchnorm(module, seed=1)
    model = export(module, example, keep_bn=keep_bn)
    result = fuse(model, simplify_first=False)
    assert _op_types(result.model) == deployed, result.fused.refused
    assert not result.fused.refused
    assert max_relative_difference(model, result.model, _sample(example)) <= TOLERANCE


def test_simplified_export_fuses_the_same(tmp_path):
    torch.manual_seed(0)
    module, example, deployed = family("repvgg")
    randomise_batchnorm(module)
    model = export(module, example)
    result = fuse(model)
    assert _op_types(result.model) == deployed
    assert max_relative_difference(model, result.model, _sample(example)) <= TOLERANCE


def test_report_counts_branches_and_parameters():
    torch.manual_seed(0)
    module, example, _ = family("repvgg")
    randomise_batchnorm(module)
    (block,) = fuse(export(module, example, keep_bn=True), simplify_first=False).fused.merged
    assert sorted(block.branches) == ["1x1 Conv", "3x3 Conv", "BatchNormalization"]
    assert block.parameters_after == 8 * 8 * 9 + 8
    assert block.parameters_before == 8 * 8 * 9 + 8 + 8 * 8 + 8 + 4 * 8  # two folded biases, a BN


class Tapped(nn.Module):
    """The 1x1 branch's output is also read by a Mul after the block."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)

    def forward(self, x):
        side = self.b(x)
        return torch.relu(self.a(x) + side) * side


class Shared(nn.Module):
    """Two Conv nodes reading one weight initializer (different biases, so no CSE merges them)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.b.weight = self.a.weight

    def forward(self, x):
        return torch.relu(self.a(x) + self.b(x) + x)


class Pair(nn.Module):
    def __init__(self, first, second):
        super().__init__()
        self.first, self.second = first, second

    def forward(self, x):
        return torch.relu(self.first(x) + self.second(x))


def refusal(name):
    """(module, input, words the reason must contain)."""
    x8 = torch.zeros(1, 8, 9, 9)
    if name == "tapped":
        return Tapped(), x8, "read elsewhere"
    if name == "strides":  # both give 1x1 outputs on a 3x3 input
        return Pair(nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 1, stride=3)), torch.zeros(1, 8, 3, 3), "strides"
    if name == "dilations":
        return Pair(nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=2, dilation=2)), x8, "dilation"
    if name == "groups":
        return Pair(nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.Conv2d(8, 8, 1)), x8, "groups"
    if name == "biased_1x1_then_padded_3x3":
        return Pair(_sequential_1x1_kxk(8, 8, bias=True), nn.Conv2d(8, 8, 3, padding=1)), x8, "border"
    if name == "average_pool_excluding_pad":
        pool = nn.AvgPool2d(3, 1, 1, count_include_pad=False)
        return Pair(nn.Sequential(nn.Conv2d(8, 8, 1), pool), nn.Conv2d(8, 8, 3, padding=1)), x8, "border"
    raise ValueError(name)


@pytest.mark.parametrize(
    "name",
    [
        "tapped",
        "strides",
        "dilations",
        "groups",
        "biased_1x1_then_padded_3x3",
        "average_pool_excluding_pad",
    ],
)
def test_refuses_what_it_cannot_merge_exactly(name):
    torch.manual_seed(0)
    module, example, reason = refusal(name)
    model = export(module, example)
    result = fuse(model, simplify_first=False)
    assert not result.fused.merged
    assert any(reason in why for why in result.fused.refused.values()), result.fused.refused
    assert max_relative_difference(model, result.model, _sample(example)) <= 1e-6


class TiedIdentities(nn.Module):
    """Two MobileOne-style blocks (3x3 conv, 1x1 conv and an identity BatchNorm, summed) whose
    identity BatchNorms share their scale and shift, as an exporter stores fresh ones' ones and
    zeros once for all of them (a timm MobileOne-S0 export kept 35 such branches unmerged)."""

    def __init__(self):
        super().__init__()
        self.k1, self.p1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)
        self.k2, self.p2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)
        self.bn2.weight, self.bn2.bias = self.bn1.weight, self.bn1.bias

    def forward(self, x):
        x = torch.relu(self.k1(x) + self.p1(x) + self.bn1(x))
        return torch.relu(self.k2(x) + self.p2(x) + self.bn2(x))


@pytest.mark.parametrize("module", [Shared, TiedIdentities])
def test_branches_whose_weights_other_nodes_share_merge_exactly(module):
    """Merging reads the constants and leaves them to whoever else reads them."""
    torch.manual_seed(0)
    block = module()
    randomise_batchnorm(block)
    example = torch.zeros(1, 8, 9, 9)
    model = export(block, example, keep_bn=True)
    result = fuse(model, simplify_first=False)
    assert not result.fused.refused
    assert "BatchNormalization" not in {n.op_type for n in result.model.graph.node}
    assert len(result.fused.merged) == (1 if module is Shared else 2)
    assert max_relative_difference(model, result.model, _sample(example)) <= TOLERANCE


def test_partial_merge_keeps_the_refused_branch():
    """A branch whose output is read elsewhere stays beside the Conv merged from the others."""

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
            self.bn = nn.BatchNorm2d(8)

        def forward(self, x):
            shared = self.b(x)
            return torch.relu(self.a(x) + self.bn(x) + shared), shared

    torch.manual_seed(0)
    module = Mixed()
    randomise_batchnorm(module)
    example = torch.zeros(1, 8, 6, 6)
    buffer_model = export(module, example, outputs=("logits", "side"))
    result = fuse(buffer_model, simplify_first=False)
    assert len(result.fused.merged) == 1
    assert sorted(result.fused.merged[0].branches) == ["3x3 Conv", "BatchNormalization"]
    assert max_relative_difference(buffer_model, result.model, _sample(example)) <= TOLERANCE


@st.composite
def branch_layouts(draw):
    """Random branch sets that sum to the same shape: kernels, dilation, stride, groups, identity."""
    stride = draw(st.sampled_from([1, 2]))
    dilation = draw(st.sampled_from([1, 2]))
    groups = draw(st.sampled_from([1, 2, 4]))
    kernels = draw(
        st.lists(st.sampled_from([(1, 1), (3, 3), (1, 3), (3, 1), (5, 5), (1, 5)]), min_size=1, max_size=3)
    )
    identity = stride == 1 and draw(st.booleans())
    return kernels, stride, dilation, groups, identity


@settings(max_examples=25, deadline=None)
@given(layout=branch_layouts(), seed=st.integers(0, 2**16))
def test_random_branch_layouts_fuse_exactly(layout, seed):
    kernels, stride, dilation, groups, identity = layout
    torch.manual_seed(seed)
    branches = [
        conv_bn(8, 8, k, stride, tuple(d // 2 * dilation for d in k), groups, dilation if max(k) > 1 else 1)
        for k in kernels
    ]
    if len(branches) == 1 and not identity:
        branches.append(conv_bn(8, 8, (1, 1), stride))
        groups_differ = groups != 1
    else:
        groups_differ = False
    module = Block(branches, "bn" if identity else None)
    randomise_batchnorm(module, seed=seed)
    example = torch.zeros(1, 8, 9, 9)
    model = export(module, example, keep_bn=bool(seed % 2))
    result = fuse(model, simplify_first=False)
    assert max_relative_difference(model, result.model, _sample(example, seed)) <= TOLERANCE
    if not groups_differ:
        assert _op_types(result.model) == ["Conv", "Relu"], result.fused.refused


def test_fuses_when_the_shared_input_has_no_shape_information():
    """The branches read an intermediate tensor the exporter gave no value_info: channels come from
    the weights (a Conv's input channels, a BatchNormalization's scale)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def init(name, *shape, positive=False):
        array = rng.random(shape) + 0.5 if positive else rng.standard_normal(shape)
        return numpy_helper.from_array(array.astype(np.float32), name)

    nodes = [
        helper.make_node("Relu", ["input"], ["r"]),
        helper.make_node("BatchNormalization", ["r", "g", "b", "m", "v"], ["n"]),
        helper.make_node("Conv", ["n", "w1", "b1"], ["a"]),
        helper.make_node("Conv", ["r", "w3"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["a", "c"], ["s"]),
        helper.make_node("Add", ["s", "r"], ["logits"]),
    ]
    initializers = [
        init("g", 4),
        init("b", 4),
        init("m", 4),
        init("v", 4, positive=True),
        init("w3", 4, 4, 3, 3),
        init("w1", 4, 4, 1, 1),
        init("b1", 4),
    ]
    graph = helper.make_graph(
        nodes,
        "no_shapes",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4, 6, 6])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4, 6, 6])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    result = fuse(model, simplify_first=False)
    assert _op_types(result.model) == ["Relu", "Conv"], result.fused.refused
    sample = {"input": rng.standard_normal((2, 4, 6, 6)).astype(np.float32)}
    assert max_relative_difference(model, result.model, sample) <= TOLERANCE
