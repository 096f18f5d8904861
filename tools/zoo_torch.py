"""The zoo's models defined here in torch and exported by torch's two ONNX exporters
(tools/build_zoo.py): YOLOv8-, MobileNetV3- and DB-style networks with random weights whose
BatchNormalization statistics are measured on real images, so activations have realistic ranges.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _torch():
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(2)
    return torch


def measure_batchnorm(module, batches: list) -> None:
    """Running statistics of every BatchNormalization from real images (train mode, exact average)."""
    torch = _torch()
    for layer in module.modules():
        if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm):
            layer.reset_running_stats()
            layer.momentum = None
    module.train()
    with torch.no_grad():
        for batch in batches:
            module(torch.from_numpy(batch))
    module.eval()


def yolov8_module(nc: int = 80):
    """YOLOv8n as ultralytics builds it: C2f/SPPF backbone, PAN neck, decoupled head with DFL.

    The head decodes in the graph like an ultralytics export: anchors from the feature maps' shapes
    (Shape/Gather/Range), DFL softmax + 1×1 conv, dist2bbox, × stride, concatenated with sigmoid
    class scores into one [N, 4+nc, anchors] output."""
    torch = _torch()
    from torch import nn

    class Conv(nn.Module):
        def __init__(self, c1, c2, k=1, s=1):
            super().__init__()
            self.conv = nn.Conv2d(c1, c2, k, s, k // 2, bias=False)
            self.bn = nn.BatchNorm2d(c2, eps=1e-3, momentum=0.03)
            self.act = nn.SiLU()

        def forward(self, x):
            return self.act(self.bn(self.conv(x)))

    class Bottleneck(nn.Module):
        def __init__(self, c1, c2, shortcut=True):
            super().__init__()
            self.cv1, self.cv2 = Conv(c1, c2, 3), Conv(c2, c2, 3)
            self.add = shortcut and c1 == c2

        def forward(self, x):
            return x + self.cv2(self.cv1(x)) if self.add else self.cv2(self.cv1(x))

    class C2f(nn.Module):
        def __init__(self, c1, c2, n=1, shortcut=False):
            super().__init__()
            self.c = c2 // 2
            self.cv1 = Conv(c1, 2 * self.c, 1)
            self.cv2 = Conv((2 + n) * self.c, c2, 1)
            self.m = nn.ModuleList(Bottleneck(self.c, self.c, shortcut) for _ in range(n))

        def forward(self, x):
            y = list(self.cv1(x).split((self.c, self.c), 1))
            y.extend(m(y[-1]) for m in self.m)
            return self.cv2(torch.cat(y, 1))

    class SPPF(nn.Module):
        def __init__(self, c1, c2, k=5):
            super().__init__()
            self.cv1, self.cv2 = Conv(c1, c1 // 2), Conv(c1 // 2 * 4, c2)
            self.m = nn.MaxPool2d(k, 1, k // 2)

        def forward(self, x):
            y = [self.cv1(x)]
            y.extend(self.m(y[-1]) for _ in range(3))
            return self.cv2(torch.cat(y, 1))

    class DFL(nn.Module):
        def __init__(self, c1=16):
            super().__init__()
            self.conv = nn.Conv2d(c1, 1, 1, bias=False).requires_grad_(False)
            self.conv.weight.data[:] = torch.arange(c1, dtype=torch.float).view(1, c1, 1, 1)
            self.c1 = c1

        def forward(self, x):
            b, _, a = x.shape
            return self.conv(x.view(b, 4, self.c1, a).transpose(2, 1).softmax(1)).view(b, 4, a)

    class Detect(nn.Module):
        def __init__(self, nc, ch):
            super().__init__()
            self.nc, self.reg_max, self.stride = nc, 16, (8.0, 16.0, 32.0)
            self.no = nc + 4 * self.reg_max
            c2, c3 = max(16, ch[0] // 4, 4 * self.reg_max), max(ch[0], min(nc, 100))
            self.cv2 = nn.ModuleList(
                nn.Sequential(Conv(x, c2, 3), Conv(c2, c2, 3), nn.Conv2d(c2, 4 * self.reg_max, 1)) for x in ch
            )
            self.cv3 = nn.ModuleList(
                nn.Sequential(Conv(x, c3, 3), Conv(c3, c3, 3), nn.Conv2d(c3, nc, 1)) for x in ch
            )
            self.dfl = DFL(self.reg_max)
            for a, b, s in zip(self.cv2, self.cv3, self.stride, strict=True):  # ultralytics' bias_init
                a[-1].bias.data[:] = 1.0
                b[-1].bias.data[:] = float(np.log(5 / nc / (640 / s) ** 2))

        def forward(self, xs):
            shape = xs[0].shape
            xs = [torch.cat((self.cv2[i](x), self.cv3[i](x)), 1) for i, x in enumerate(xs)]
            points, strides = [], []
            for x, stride in zip(xs, self.stride, strict=True):  # ultralytics' make_anchors
                _, _, h, w = x.shape
                sx = torch.arange(end=w, dtype=x.dtype) + 0.5
                sy = torch.arange(end=h, dtype=x.dtype) + 0.5
                sy, sx = torch.meshgrid(sy, sx, indexing="ij")
                points.append(torch.stack((sx, sy), -1).view(-1, 2))
                strides.append(torch.full((h * w, 1), stride, dtype=x.dtype))
            anchors, stride_tensor = torch.cat(points).transpose(0, 1), torch.cat(strides).transpose(0, 1)
            x_cat = torch.cat([x.view(shape[0], self.no, -1) for x in xs], 2)
            box, cls = x_cat.split((self.reg_max * 4, self.nc), 1)
            lt, rb = self.dfl(box).chunk(2, 1)
            x1y1, x2y2 = anchors.unsqueeze(0) - lt, anchors.unsqueeze(0) + rb
            dbox = torch.cat(((x1y1 + x2y2) / 2, x2y2 - x1y1), 1) * stride_tensor
            return torch.cat((dbox, cls.sigmoid()), 1)

    class YOLOv8(nn.Module):
        def __init__(self):
            super().__init__()
            self.b = nn.ModuleList(
                [
                    Conv(3, 16, 3, 2),
                    Conv(16, 32, 3, 2),
                    C2f(32, 32, 1, True),
                    Conv(32, 64, 3, 2),
                    C2f(64, 64, 2, True),
                    Conv(64, 128, 3, 2),
                    C2f(128, 128, 2, True),
                    Conv(128, 256, 3, 2),
                    C2f(256, 256, 1, True),
                    SPPF(256, 256),
                ]
            )
            self.up = nn.Upsample(scale_factor=2.0, mode="nearest")
            self.h12, self.h15 = C2f(384, 128), C2f(192, 64)
            self.d16, self.h18 = Conv(64, 64, 3, 2), C2f(192, 128)
            self.d19, self.h21 = Conv(128, 128, 3, 2), C2f(384, 256)
            self.detect = Detect(nc, (64, 128, 256))

        def forward(self, x):
            saved = []
            for layer in self.b:
                x = layer(x)
                saved.append(x)
            p4 = self.h12(torch.cat((self.up(x), saved[6]), 1))
            p3 = self.h15(torch.cat((self.up(p4), saved[4]), 1))
            p4 = self.h18(torch.cat((self.d16(p3), p4), 1))
            p5 = self.h21(torch.cat((self.d19(p4), x), 1))
            return self.detect([p3, p4, p5])

    return YOLOv8()


def mobilenet_v3_module():
    """MobileNetV3-Small as torchvision builds it (HardSwish, SE with HardSigmoid), NHWC input."""
    torch = _torch()
    from torch import nn

    def cbn(cin, cout, k, s, groups, act):
        return [
            nn.Conv2d(cin, cout, k, s, (k - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            act(),
        ]

    class SqueezeExcite(nn.Module):
        def __init__(self, c, squeeze):
            super().__init__()
            self.fc1, self.fc2 = nn.Conv2d(c, squeeze, 1), nn.Conv2d(squeeze, c, 1)

        def forward(self, x):
            s = nn.functional.adaptive_avg_pool2d(x, 1)
            return x * nn.functional.hardsigmoid(self.fc2(torch.relu(self.fc1(s))))

    class Block(nn.Module):
        def __init__(self, cin, k, exp, cout, se, act, s):
            super().__init__()
            layers = cbn(cin, exp, 1, 1, 1, act) if exp != cin else []
            layers += cbn(exp, exp, k, s, exp, act)
            if se:
                layers.append(SqueezeExcite(exp, max(8, (exp // 4 + 4) // 8 * 8)))
            layers += [nn.Conv2d(exp, cout, 1, bias=False), nn.BatchNorm2d(cout)]
            self.block = nn.Sequential(*layers)
            self.residual = s == 1 and cin == cout

        def forward(self, x):
            return x + self.block(x) if self.residual else self.block(x)

    re, hs = nn.ReLU, nn.Hardswish
    settings = [
        (16, 3, 16, 16, True, re, 2),
        (16, 3, 72, 24, False, re, 2),
        (24, 3, 88, 24, False, re, 1),
        (24, 5, 96, 40, True, hs, 2),
        (40, 5, 240, 40, True, hs, 1),
        (40, 5, 240, 40, True, hs, 1),
        (40, 5, 120, 48, True, hs, 1),
        (48, 5, 144, 48, True, hs, 1),
        (48, 5, 288, 96, True, hs, 2),
        (96, 5, 576, 96, True, hs, 1),
        (96, 5, 576, 96, True, hs, 1),
    ]

    class MobileNetV3(nn.Module):
        def __init__(self):
            super().__init__()
            layers = cbn(3, 16, 3, 2, 1, hs) + [Block(*s) for s in settings] + cbn(96, 576, 1, 1, 1, hs)
            self.features = nn.Sequential(*layers)
            self.classifier = nn.Sequential(nn.Linear(576, 1024), nn.Hardswish(), nn.Linear(1024, 1000))
            for m in self.modules():  # torchvision's initialisation
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out")
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
                elif isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, 0, 0.01)
                    nn.init.zeros_(m.bias)

        def forward(self, x):  # NHWC, as TensorFlow-trained pipelines feed it
            x = self.features(x.permute(0, 3, 1, 2))
            return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    return MobileNetV3()


def dbnet_module():
    """DB text detector: ResNet-style backbone, FPN (nearest Resize, bilinear Resize to 1/4, Concat),
    head Conv → ConvTranspose ×2 → ConvTranspose ×2 → Sigmoid: a probability map at input size."""
    torch = _torch()
    from torch import nn
    from torch.nn import functional

    def cbr(cin, cout, k=3, s=1):
        return nn.Sequential(nn.Conv2d(cin, cout, k, s, k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

    class Basic(nn.Module):
        def __init__(self, cin, cout, s):
            super().__init__()
            self.a = cbr(cin, cout, 3, s)
            self.b = nn.Sequential(nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
            self.short = (
                nn.Sequential(nn.Conv2d(cin, cout, 1, s, bias=False), nn.BatchNorm2d(cout))
                if s != 1 or cin != cout
                else nn.Identity()
            )

        def forward(self, x):
            return torch.relu(self.b(self.a(x)) + self.short(x))

    class DBNet(nn.Module):
        def __init__(self, inner=96):
            super().__init__()
            self.stem = nn.Sequential(cbr(3, 32, 3, 2), cbr(32, 32), nn.MaxPool2d(3, 2, 1))
            widths, cin = (32, 64, 128, 256), 32
            self.stages = nn.ModuleList()
            for i, c in enumerate(widths):
                self.stages.append(nn.Sequential(Basic(cin, c, 1 if i == 0 else 2), Basic(c, c, 1)))
                cin = c
            self.lateral = nn.ModuleList(nn.Conv2d(c, inner, 1, bias=False) for c in widths)
            self.smooth = nn.ModuleList(nn.Conv2d(inner, inner // 4, 3, 1, 1, bias=False) for _ in widths)
            q = inner // 4
            self.head = nn.Sequential(
                cbr(inner, q),
                nn.ConvTranspose2d(q, q, 2, 2),
                nn.BatchNorm2d(q),
                nn.ReLU(),
                nn.ConvTranspose2d(q, 1, 2, 2),
            )
            self.head[-1].bias.data[:] = -2.0  # mostly background, as a trained text map is

        def forward(self, x):
            feats = []
            x = self.stem(x)
            for stage in self.stages:
                x = stage(x)
                feats.append(x)
            lat = [conv(f) for conv, f in zip(self.lateral, feats, strict=True)]
            for i in (2, 1, 0):
                lat[i] = lat[i] + functional.interpolate(lat[i + 1], size=lat[i].shape[2:], mode="nearest")
            size = lat[0].shape[2:]
            outs = [
                functional.interpolate(conv(f), size=size, mode="bilinear", align_corners=False)
                if i
                else conv(f)
                for i, (conv, f) in enumerate(zip(self.smooth, lat, strict=True))
            ]
            return torch.sigmoid(self.head(torch.cat(outs[::-1], 1)))

    return DBNet()


def export_torchscript(
    module, example, target: Path, *, opset: int, dynamic: dict, outputs: list[str]
) -> None:
    torch = _torch()
    module.eval()
    torch.onnx.export(
        module,
        (torch.from_numpy(example),),
        str(target),
        input_names=["input"],
        output_names=outputs,
        dynamic_axes=dynamic,
        opset_version=opset,
        dynamo=False,
    )


def export_dynamo(module, example, target: Path, *, opset: int, dynamic: dict, outputs: list[str]) -> None:
    """torch.onnx.export(..., dynamo=True): torch.export → onnxscript, the exporter torch recommends."""
    torch = _torch()
    module.eval()
    dims = {axis: torch.export.Dim(name, min=1 if name == "batch" else 32) for axis, name in dynamic.items()}
    program = torch.onnx.export(
        module,
        (torch.from_numpy(example),),
        input_names=["input"],
        output_names=outputs,
        dynamic_shapes=({**dims},),
        opset_version=opset,
        dynamo=True,
        verbose=False,
    )
    program.save(str(target))
