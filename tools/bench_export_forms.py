"""Refinement on one network as torch's exporters write it: TorchScript with a free batch, dynamo
from a channels-last example (its as_strided views, onnxq/passes/strided_views.py), and dynamo
with the batch fixed at one (torch's default today; onnxq/refine/free_batch.py). Writes the
section "export-forms" of BENCHMARKS.md.

The network is ../shared's ResNet-20 (CIFAR-10): its TorchScript file as shipped, and its weights
loaded into the same network written torchvision-style (in-place ReLUs, AdaptiveAvgPool2d, option
A shortcuts) and exported here by torch's dynamo exporter, which matches the shipped file to 3e-6
in the logits. Each form is quantized by `onnxq quantize` in its own process at W4A4 with the mse
scale search and `--refine` (iterations per unit as given), on the protocol's calibration images,
and scored on test-1017.

    .venv/bin/python tools/bench_export_forms.py [--iters 100] [--out BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # this checkout's onnxq: bench.py puts it first on the path

SECTION = "export-forms"
REFINED = re.compile(r"refined (\d+) of (\d+) units .* in ([\d.]+) s")


def resnet20_module(source: onnx.ModelProto):
    """The shipped ResNet-20's weights in a torchvision-style module (eval mode)."""
    import torch
    from onnx import numpy_helper
    from torch import nn
    from torch.nn import functional as F

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(cin, cout, 3, stride, 1), nn.Conv2d(cout, cout, 3, 1, 1)
            self.relu = nn.ReLU(inplace=True)
            self.pad = cout // 4 if stride != 1 or cin != cout else 0

        def forward(self, x):
            out = self.conv2(self.relu(self.conv1(x)))
            out += F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad)) if self.pad else x
            return self.relu(out)

    class ResNet(nn.Module):
        def __init__(self, per_stage: int) -> None:
            super().__init__()
            self.conv1, self.relu = nn.Conv2d(3, 16, 3, 1, 1), nn.ReLU(inplace=True)
            blocks, cin = [], 16
            for cout, stride in ((16, 1), (32, 2), (64, 2)):
                for i in range(per_stage):
                    blocks.append(Block(cin, cout, stride if i == 0 else 1))
                    cin = cout
            self.blocks, self.avgpool = nn.Sequential(*blocks), nn.AdaptiveAvgPool2d((1, 1))
            self.linear = nn.Linear(64, 10)

        def forward(self, x):
            return self.linear(torch.flatten(self.avgpool(self.blocks(self.relu(self.conv1(x)))), 1))

    weights = {t.name: numpy_helper.to_array(t) for t in source.graph.initializer}
    convs = [node for node in source.graph.node if node.op_type == "Conv"]
    module = ResNet((len(convs) - 1) // 6).eval()
    layers = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        for layer, node in zip(layers, convs, strict=True):
            layer.weight.copy_(torch.from_numpy(weights[node.input[1]].copy()))
            layer.bias.copy_(torch.from_numpy(weights[node.input[2]].copy()))
        module.linear.weight.copy_(torch.from_numpy(weights["linear.weight"].copy()))
        module.linear.bias.copy_(torch.from_numpy(weights["linear.bias"].copy()))
    return module


def dynamo_export(module, target: Path, *, free_batch: bool) -> None:
    import torch

    if free_batch:  # an image read HWC and permuted: the exporter writes as_strided after pooling
        example = torch.zeros(2, 32, 32, 3).permute(0, 3, 1, 2)
        shapes = {"x": {0: torch.export.Dim("batch", min=1, max=1024)}}
    else:  # torch's defaults: the batch of the example, one image
        example, shapes = torch.zeros(1, 3, 32, 32), None
    torch.onnx.export(
        module, (example,), str(target), input_names=["input"], output_names=["logits"],
        dynamic_shapes=shapes, dynamo=True, external_data=False,
    )  # fmt: skip


def quantize(path: Path, calib: np.ndarray, iters: int) -> tuple[onnx.ModelProto, float, float, str]:
    """`onnxq quantize` in its own process: the model, wall s, peak MB and its refinement line."""
    flags = [
        "--w-bits",
        "4",
        "--a-bits",
        "4",
        "--calib-method",
        "mse",
        "--refine",
        "--refine-iters",
        str(iters),
    ]
    model, seconds, peak, notes = bench.run_onnxq_cli_notes(path, calib, flags)
    found = REFINED.search(notes)
    refined = f"{found[1]} of {found[2]} units in {found[3]} s" if found else "no refinement line"
    return model, seconds, peak, refined


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=100, help="refinement iterations per unit")
    parser.add_argument("--out", default=str(bench.ROOT / "BENCHMARKS.md"))
    args = parser.parse_args()
    shipped = bench.model_path("resnet20_cifar10")
    split = bench.cifar_split(bench.LOW_BIT_SAMPLES)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        module = resnet20_module(onnx.load(shipped))
        forms = {"TorchScript, free batch (the shipped file)": shipped}
        for label, free, name in (
            ("dynamo, free batch, channels-last example (as_strided)", True, "dynamo_free.onnx"),
            ("dynamo, batch fixed at 1 (torch's defaults)", False, "dynamo_static.onnx"),
        ):
            dynamo_export(module, Path(folder) / name, free_batch=free)
            forms[label] = Path(folder) / name
        reference = bench.logits(onnx.load(shipped), split.x)
        float_top1 = 100 * float((reference.argmax(1) == split.y).mean())
        for label, path in forms.items():
            print(f"  {label}", flush=True)
            model, seconds, peak, refined = quantize(path, split.calib, args.iters)
            top1, agreement, kl = bench.score(model, split, reference)
            rows.append((label, 100 * top1, 100 * agreement, kl, refined, seconds, peak))
            print(f"    {100 * top1:.2f} %, {refined}, {seconds:.0f} s", flush=True)
    lines = [
        "## Refinement on the forms torch's exporters write "
        f"(resnet20_cifar10, float top-1 {float_top1:.2f} %)",
        "",
        f"`tools/bench_export_forms.py --iters {args.iters}`: W4A4, mse scale search, `--refine` at "
        f"{args.iters} iterations per unit, otherwise at its defaults; {bench.LOW_BIT_SAMPLES} CIFAR-10 "
        "training images, test-1017; one draw. calib. s is the `onnxq quantize` process's wall time on "
        "2 cores, peak MB its peak resident memory.",
        "",
        "| export | top-1 % | agreement % | KL | refinement | calib. s | peak MB |",
        "| --- | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    lines += [
        f"| {r[0]} | {r[1]:.2f} | {r[2]:.2f} | {r[3]:.4f} | {r[4]} | {r[5]:.1f} | {r[6]:.0f} |" for r in rows
    ]
    bench.write_section(Path(args.out), SECTION, "\n".join(lines) + "\n", bench.machine_description())


if __name__ == "__main__":
    main()
