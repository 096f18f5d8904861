"""Peak memory and wall time of `onnxq quantize` on a model whose weights dominate its memory.

The zoo's models hold 1-20 MB of weights, so their peaks are the interpreter, onnxruntime and
activations; a copy of the weights more or less does not show there. This builds a ResNet-50
(25.6 M parameters, 102 MB of float32 weights; random weights, BatchNormalization statistics
measured on photos, exported by torch's TorchScript exporter at opset 17) at 320×320, the size
and depth of the backbones of torchvision's detectors, and runs the default W8A8 `onnxq
quantize` on it in its own process, under GNU time. The model and its data are cached in
~/.cache/onnxq/memory_bench (torch needed to build them once).

    python tools/memory_bench.py [--samples 32] [--runs 1] [--flags "..."]
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import run_onnxq_cli
from zoo_images import centre_crop, normalised, photos
from zoo_torch import measure_batchnorm

CACHE = Path.home() / ".cache" / "onnxq" / "memory_bench"
SIZE = 320
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def resnet50():
    """ResNet-50 as torchvision defines it (v1.5: the stride on the 3×3 conv), 1000 classes."""
    import torch
    from torch import nn

    torch.manual_seed(0)

    class Bottleneck(nn.Module):
        def __init__(self, c_in: int, width: int, stride: int) -> None:
            super().__init__()
            c_out = width * 4
            self.body = nn.Sequential(
                nn.Conv2d(c_in, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                nn.Conv2d(width, c_out, 1, bias=False), nn.BatchNorm2d(c_out),
            )  # fmt: skip
            self.down = (
                nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
                if stride != 1 or c_in != c_out
                else nn.Identity()
            )

        def forward(self, x):
            return torch.relu(self.body(x) + self.down(x))

    layers, c_in = [], 64
    for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for index in range(blocks):
            layers.append(Bottleneck(c_in, width, stride if index == 0 else 1))
            c_in = width * 4
    stem = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    head = [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2048, 1000)]
    return nn.Sequential(*stem, *layers, *head)


def build(samples: int) -> tuple[Path, Path]:
    """The exported model and a calibration .npy of `samples` photos (cached)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    model_path, data_path = CACHE / "resnet50_320.onnx", CACHE / f"calib_{samples}.npy"
    if not data_path.exists():
        images = [centre_crop(image, SIZE * 8 // 7, SIZE) for image, _ in photos("calib", samples, seed=0)]
        np.save(data_path, normalised(images, MEAN, STD))
    if not model_path.exists():
        import torch

        module = resnet50()
        data = np.load(data_path)
        measure_batchnorm(module, [data[i : i + 8] for i in range(0, len(data), 8)])
        tmp = model_path.with_suffix(".tmp")
        torch.onnx.export(
            module, (torch.from_numpy(data[:1]),), str(tmp), input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False,
        )  # fmt: skip
        tmp.replace(model_path)
    return model_path, data_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=32, help="calibration photos")
    parser.add_argument("--runs", type=int, default=1, help="runs of the same command")
    parser.add_argument("--flags", default="", help="more `onnxq quantize` flags, one string")
    args = parser.parse_args()
    model_path, data_path = build(args.samples)
    weights_mb = model_path.stat().st_size / 2**20
    flags = shlex.split(args.flags)
    print(f"model {model_path} ({weights_mb:.0f} MiB), {args.samples} samples, flags {flags}")
    for run in range(args.runs):
        _, seconds, peak_mb = run_onnxq_cli(model_path, data_path, flags)
        ratio = peak_mb / weights_mb
        print(f"run {run + 1}: {seconds:.1f} s, peak {peak_mb:.0f} MiB ({ratio:.1f}× the file)")


if __name__ == "__main__":
    main()
