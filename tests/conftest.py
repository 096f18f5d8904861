"""Small models exported from torch, shared by the tests, and the location of ../shared."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import onnx
import pytest

SHARED = Path(__file__).resolve().parent.parent.parent / "shared"


@pytest.fixture(autouse=True)
def brief_speed_comparisons(monkeypatch):
    """The suite checks what the speed comparison decides, not how fast models run: two short
    rounds instead of four settled ones keep its many quantize calls quick."""
    from onnxq import speed

    monkeypatch.setattr(speed, "ROUNDS", 2)
    monkeypatch.setattr(speed, "SETTLE_SECONDS", 0.02)
    monkeypatch.setattr(speed, "BLOCK_SECONDS", 0.05)


def export(
    module,
    example,
    *,
    keep_bn: bool = False,
    dynamic_batch: bool = True,
    outputs=("logits",),
    opset: int = 17,
    inputs=("input",),
    dynamic_axes: dict | None = None,
) -> onnx.ModelProto:
    """Export a torch module (eval mode) with the TorchScript exporter, as users' files are made.
    `example` is one tensor, or a tuple of them, one per name in `inputs`; `dynamic_axes` as
    torch takes them (default: the batch axis of every input and output)."""
    import torch

    module.eval()
    buffer = io.BytesIO()
    torch.onnx.export(
        module,
        example if isinstance(example, tuple) else (example,),
        buffer,
        input_names=list(inputs),
        output_names=list(outputs),
        dynamic_axes=dynamic_axes
        or ({name: {0: "batch"} for name in (*inputs, *outputs)} if dynamic_batch else None),
        opset_version=opset,
        training=torch.onnx.TrainingMode.PRESERVE if keep_bn else torch.onnx.TrainingMode.EVAL,
        do_constant_folding=not keep_bn,
        dynamo=False,
    )
    return onnx.load_from_string(buffer.getvalue())


def randomise_batchnorm(module, seed: int = 0) -> None:
    """Non-trivial running statistics and affine parameters, so folding is really exercised."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    for layer in module.modules():
        if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm):
            n = layer.num_features
            layer.running_mean.copy_(torch.randn(n, generator=generator) * 0.5)
            layer.running_var.copy_(torch.rand(n, generator=generator) * 2 + 0.1)
            layer.weight.data.copy_(torch.randn(n, generator=generator))
            layer.bias.data.copy_(torch.randn(n, generator=generator) * 0.2)


def small_cnn():
    """Conv-BN-ReLU, MaxPool, a residual Add, ReLU6, global pooling and a Linear head."""
    import torch
    from torch import nn

    class SmallCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
            self.pool = nn.MaxPool2d(2)
            self.branch = nn.Sequential(
                nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU6()
            )
            self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
            self.head = nn.Linear(16, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.pool(self.stem(x))
            x = torch.relu(x + self.depthwise(self.branch(x)))
            return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    torch.manual_seed(0)
    model = SmallCNN()
    randomise_batchnorm(model)
    return model


@pytest.fixture(scope="session")
def small_model() -> onnx.ModelProto:
    """SmallCNN exported with BatchNormalization folded by the exporter."""
    import torch

    return export(small_cnn(), torch.zeros(1, 3, 16, 16))


@pytest.fixture(scope="session")
def small_model_bn() -> onnx.ModelProto:
    """SmallCNN exported with its BatchNormalization nodes kept."""
    import torch

    return export(small_cnn(), torch.zeros(1, 3, 16, 16), keep_bn=True)


@pytest.fixture(scope="session")
def calibration_data() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((48, 3, 16, 16)).astype(np.float32)


@pytest.fixture
def small_model_path(tmp_path, small_model) -> Path:
    path = tmp_path / "small.onnx"
    onnx.save(small_model, path)
    return path


def needs_shared(*parts: str) -> Path:
    """A path under ../shared, skipping the test where it is absent (a user's machine)."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not available")
    return path


def deployed_graph(model: onnx.ModelProto, folder) -> onnx.GraphProto:
    """The graph onnxruntime runs for `model` at its default level: which ops its QDQ fusions
    turned into integer kernels, and which stayed float."""
    from onnxq.io import session

    optimized = Path(folder) / "optimized.onnx"
    session(model, optimized_path=str(optimized))
    return onnx.load(optimized).graph
