"""How raw images (or uint8 arrays) become model input: the recipe the CLI's --preset, --resize,
--crop, --mean, --std, --scale and --layout build (onnxq.cli.preprocess), applied by
onnxq.calib.images."""

from __future__ import annotations

from dataclasses import dataclass

from onnxq.errors import OnnxqError


@dataclass(frozen=True)
class Preprocess:
    """Turns raw images (or uint8 arrays) into model input: resize, crop, scale, normalise."""

    resize: int | None = None  # short side, bilinear
    crop: int | None = None  # centre crop, square
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    layout: str = "NCHW"

    def __post_init__(self) -> None:
        if self.layout not in ("NCHW", "NHWC"):
            raise OnnxqError(f"layout must be NCHW or NHWC, got {self.layout!r}")
        if len(self.mean) != len(self.std):
            raise OnnxqError("mean and std must have the same number of channels")
        if any(s <= 0 for s in self.std):
            raise OnnxqError("std values must be positive")

    @classmethod
    def preset(cls, name: str) -> Preprocess:
        """Named recipes: 'imagenet' (256 → 224 crop) and 'cifar10' (short side 32, 32 crop)."""
        mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
        presets = {
            "imagenet": cls(resize=256, crop=224, mean=mean, std=std),
            "cifar10": cls(resize=32, crop=32, mean=mean, std=std),
            "none": cls(),
        }
        if name not in presets:
            raise OnnxqError(f"unknown preprocessing preset {name!r}; known: {', '.join(presets)}")
        return presets[name]
