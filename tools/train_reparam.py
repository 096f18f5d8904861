"""Train re-parameterized CIFAR-10 networks on the CPU and export them to ONNX with branches unfused.

Two families, each scaled to CIFAR-10 (32x32) and to a 2-core CPU:

- ``repvgg``: RepVGG blocks (3x3 conv+BN, 1x1 conv+BN, identity BN where shapes allow, ReLU after
  the sum), RepVGG-A0's shape (stem, four stages, 1/2/4/14/1 blocks) with fewer blocks and widths.
- ``mobileone``: MobileOne blocks, a depthwise 3x3 step (k over-parameterized 3x3 branches, a 1x1
  "scale" branch, identity BN) then a pointwise 1x1 step (k branches, identity BN), ReLU after each.

No pretrained weights for either can be had on these machines, so they are trained here from
``../shared/data/cifar10/train-jpeg.tar.gz`` (decoded once into ``build/``) and evaluated on
``test-1017.npz``. Each model is exported twice: ``models/<name>_cifar10.onnx`` as torch's exporter
writes it in eval mode (branch BNs folded into their convs, identity BNs left as
BatchNormalization, Adds of the branches kept), and ``build/<name>_cifar10_deployed.onnx`` after
the reference re-parameterization in torch, the plain form ``onnxq fuse`` must reproduce.

    .venv/bin/python tools/train_reparam.py repvgg --epochs 20
    .venv/bin/python tools/train_reparam.py mobileone --epochs 20
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parent.parent
SHARED_CIFAR = ROOT.parent / "shared" / "data" / "cifar10"
CACHE = ROOT / "build" / "cifar10-train.npz"
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


# ----------------------------------------------------------------------------- blocks


def conv_bn(cin: int, cout: int, kernel: int, stride: int, groups: int) -> nn.Sequential:
    """A bias-free conv followed by BatchNorm: one branch of a re-parameterizable block."""
    conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(cout))


def fuse_conv_bn(branch: nn.Module | None, cin: int, cout: int, kernel: int, groups: int):
    """The (weight, bias) of one branch as a kernel x kernel conv; identity BN becomes a delta kernel."""
    if branch is None:
        return 0.0, 0.0
    if isinstance(branch, nn.BatchNorm2d):
        weight = torch.zeros(cout, cin // groups, kernel, kernel)
        weight[torch.arange(cout), torch.arange(cout) % (cin // groups), kernel // 2, kernel // 2] = 1.0
        bn = branch
    else:
        conv, bn = branch[0], branch[1]
        weight = conv.weight
        pad = (kernel - weight.shape[-1]) // 2
        weight = F.pad(weight, [pad] * 4)
    std = (bn.running_var + bn.eps).sqrt()
    scale = bn.weight / std
    return weight * scale.view(-1, 1, 1, 1), bn.bias - bn.running_mean * scale


class RepBlock(nn.Module):
    """Parallel branches summed then ReLU: ``k`` kxk conv-BNs, an optional 1x1 conv-BN, identity BN.

    RepVGG is ``branches=1`` with the 1x1 branch; MobileOne's depthwise step is ``branches=k`` with
    the 1x1 "scale" branch and ``groups=channels``; its pointwise step is ``kernel=1``.
    """

    def __init__(
        self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1, branches: int = 1
    ) -> None:
        super().__init__()
        self.cin, self.cout, self.kernel, self.stride, self.groups = cin, cout, kernel, stride, groups
        self.convs = nn.ModuleList(conv_bn(cin, cout, kernel, stride, groups) for _ in range(branches))
        self.scale = conv_bn(cin, cout, 1, stride, groups) if kernel > 1 else None
        self.identity = nn.BatchNorm2d(cout) if cin == cout and stride == 1 else None
        self.deployed: nn.Conv2d | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.deployed is not None:
            return F.relu(self.deployed(x))
        out = self.convs[0](x)
        for branch in self.convs[1:]:
            out = out + branch(x)
        if self.scale is not None:
            out = out + self.scale(x)
        if self.identity is not None:
            out = out + self.identity(x)
        return F.relu(out)

    def reparameterize(self) -> None:
        """Replace the branches by the single conv they compute (the deployed form)."""
        parts = [*self.convs, self.scale, self.identity]
        fused = [fuse_conv_bn(p, self.cin, self.cout, self.kernel, self.groups) for p in parts]
        conv = nn.Conv2d(self.cin, self.cout, self.kernel, self.stride, self.kernel // 2, groups=self.groups)
        conv.weight.data = sum(w for w, _ in fused).detach()
        conv.bias.data = sum(b for _, b in fused).detach()
        self.deployed = conv
        del self.convs, self.scale, self.identity
        self.convs, self.scale, self.identity = nn.ModuleList(), None, None


def mobileone_unit(cin: int, cout: int, stride: int, branches: int) -> nn.Sequential:
    """MobileOne's depthwise step then its pointwise step."""
    return nn.Sequential(
        RepBlock(cin, cin, 3, stride, groups=cin, branches=branches),
        RepBlock(cin, cout, 1, 1, branches=branches),
    )


class Net(nn.Module):
    def __init__(self, body: list[nn.Module], width: int, classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(*body)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.body(x), 1)
        return self.head(torch.flatten(x, 1))

    def reparameterize(self) -> None:
        for module in self.modules():
            if isinstance(module, RepBlock):
                module.reparameterize()


def repvgg() -> Net:
    """RepVGG-A0's layout for 32x32 inputs: stem, then stages of 1/2/3/3/1 blocks."""
    stages = [(32, 1, 1), (48, 2, 1), (96, 3, 2), (192, 3, 2), (384, 1, 2)]
    body: list[nn.Module] = []
    cin = 3
    for width, blocks, stride in stages:
        for i in range(blocks):
            body.append(RepBlock(cin, width, 3, stride if i == 0 else 1))
            cin = width
    return Net(body, cin)


def mobileone(branches: int = 2) -> Net:
    """MobileOne-S0's layout for 32x32 inputs, with ``branches`` over-parameterized branches.

    Only the stem runs at 32x32: depthwise branches at full resolution cost 3x the time on a CPU.
    """
    stages = [(64, 2, 2), (128, 3, 2), (256, 4, 2), (512, 1, 1)]
    body: list[nn.Module] = [RepBlock(3, 32, 3, 1)]
    cin = 32
    for width, blocks, stride in stages:
        for i in range(blocks):
            body.append(mobileone_unit(cin, width, stride if i == 0 else 1, branches))
            cin = width
    return Net(body, cin)


ARCHITECTURES = {"repvgg": repvgg, "mobileone": mobileone}


# ----------------------------------------------------------------------------- data


def load_training_images(archive: Path) -> tuple[np.ndarray, np.ndarray]:
    """All 50,000 JPEGs as uint8 NCHW with their labels, decoded once and cached under build/."""
    if CACHE.exists():
        cached = np.load(CACHE)
        return cached["x"], cached["y"]
    from PIL import Image

    images, labels = [], []
    with tarfile.open(archive) as tar:
        members = sorted((m for m in tar.getmembers() if m.name.endswith(".jpg")), key=lambda m: m.name)
        classes = sorted({Path(m.name).parent.name for m in members})
        for member in members:
            data = tar.extractfile(member).read()
            image = Image.open(io.BytesIO(data)).convert("RGB")
            images.append(np.asarray(image).transpose(2, 0, 1))
            labels.append(classes.index(Path(member.name).parent.name))
    x, y = np.stack(images), np.asarray(labels, dtype=np.int64)
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    np.savez(CACHE, x=x, y=y)
    return x, y


def normalise(x: torch.Tensor) -> torch.Tensor:
    return (x.float() / 255.0 - MEAN) / STD


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random 32x32 crop of the 4-pixel reflect-padded batch and a random horizontal flip."""
    n = x.shape[0]
    padded = F.pad(x, [4] * 4, mode="reflect")
    rows = torch.randint(0, 9, (n, 1), generator=generator) + torch.arange(32)
    cols = torch.randint(0, 9, (n, 1), generator=generator) + torch.arange(32)
    flip = torch.rand(n, 1, generator=generator) < 0.5
    cols = torch.where(flip, cols.flip(1), cols)
    batch, channel = torch.arange(n).view(n, 1, 1, 1), torch.arange(3).view(1, 3, 1, 1)
    return padded[batch, channel, rows.view(n, 1, 32, 1), cols.view(n, 1, 1, 32)]


# ----------------------------------------------------------------------------- training


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(x), 500):
            logits = model(normalise(torch.from_numpy(x[start : start + 500])))
            correct += int((logits.argmax(1).numpy() == y[start : start + 500]).sum())
    return 100.0 * correct / len(x)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on conv and linear weights only: decaying BN scales harms re-param branches."""
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    rest = [p for n, p in model.named_parameters() if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def train(model: Net, args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    x_train, y_train = load_training_images(SHARED_CIFAR / "train-jpeg.tar.gz")
    test = np.load(SHARED_CIFAR / "test-1017.npz")
    x_all, y_all = torch.from_numpy(x_train), torch.from_numpy(y_train)
    steps_per_epoch = len(x_all) // args.batch
    optimizer = torch.optim.SGD(
        parameter_groups(model, args.weight_decay), lr=args.lr, momentum=0.9, nesterov=True
    )
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, args.lr, total_steps=args.epochs * steps_per_epoch, pct_start=0.2
    )
    model = model.to(memory_format=torch.channels_last)
    history, started = [], time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(x_all), generator=generator)
        running = 0.0
        for step in range(steps_per_epoch):
            index = order[step * args.batch : (step + 1) * args.batch]
            inputs = augment(normalise(x_all[index]), generator).contiguous(memory_format=torch.channels_last)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                loss = F.cross_entropy(model(inputs), y_all[index], label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            running += float(loss)
            if args.max_steps and step + 1 >= args.max_steps:
                break
        elapsed = time.perf_counter() - started
        top1 = accuracy(model, test["x"], test["y"])
        history.append({"epoch": epoch + 1, "loss": running / (step + 1), "top1": top1, "s": elapsed})
        print(json.dumps(history[-1]), flush=True)
        if args.max_steps:
            break
    return {"epochs": args.epochs, "seconds": time.perf_counter() - started, "history": history}


# ----------------------------------------------------------------------------- export


def export(model: nn.Module, path: Path) -> None:
    """TorchScript exporter in eval mode, as users' files are made (branch BNs folded into convs)."""
    model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        model,
        (torch.zeros(1, 3, 32, 32),),
        str(path),
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("arch", choices=sorted(ARCHITECTURES))
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--lr", type=float, default=0.2)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (AMX/AVX512-BF16 CPUs)")
    parser.add_argument("--max-steps", type=int, default=0, help="stop after N steps (timing runs)")
    parser.add_argument("--out", type=Path, default=ROOT / "models")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = ARCHITECTURES[args.arch]()
    record = train(model, args)
    if args.max_steps:
        return
    name = f"{args.arch}_cifar10"
    export(model, args.out / f"{name}.onnx")
    test = np.load(SHARED_CIFAR / "test-1017.npz")
    record["top1_unfused"] = accuracy(model, test["x"], test["y"])
    model.reparameterize()
    record["top1_deployed"] = accuracy(model, test["x"], test["y"])
    export(model, ROOT / "build" / f"{name}_deployed.onnx")
    torch.save(model.state_dict(), ROOT / "build" / f"{name}_deployed.pt")
    flags = [f"--epochs {args.epochs}", f"--batch {args.batch}", f"--lr {args.lr}", f"--seed {args.seed}"]
    record["command"] = " ".join(["tools/train_reparam.py", args.arch, *flags, *(["--bf16"] * args.bf16)])
    (ROOT / "build" / f"{name}.train.json").write_text(json.dumps(record, indent=1))
    print(json.dumps({k: v for k, v in record.items() if k != "history"}))


if __name__ == "__main__":
    main()
