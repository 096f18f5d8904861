"""Typed, frozen configuration shared by the Python API and the CLI.

The CLI only parses flags into these objects; every stage reads them, never a dict of strings.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from onnxq.errors import OnnxqError


class Granularity(enum.Enum):
    """How many scales a weight tensor gets."""

    TENSOR = "tensor"
    CHANNEL = "channel"


class CalibrationMethod(enum.Enum):
    """How activation ranges are derived from the calibration data."""

    MINMAX = "minmax"
    PERCENTILE = "percentile"


class WeightRange(enum.Enum):
    """Integer range of 8-bit weights.

    x86 CPUs without VNNI compute u8×s8 products in pairs that saturate int16 when weights use
    the full int8 range; a 7-bit range ([-63, 63]) never does. AUTO probes onnxruntime's own
    kernels on this machine and picks FULL where they do not saturate.
    """

    AUTO = "auto"
    FULL = "full"
    REDUCED = "reduced"


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
        """Named recipes: 'imagenet' (256 → 224 crop) and 'cifar10' (32×32 as is)."""
        mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
        presets = {
            "imagenet": cls(resize=256, crop=224, mean=mean, std=std),
            "cifar10": cls(mean=mean, std=std),
            "none": cls(),
        }
        if name not in presets:
            raise OnnxqError(f"unknown preprocessing preset {name!r}; known: {', '.join(presets)}")
        return presets[name]


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how; the defaults give W8A8 that runs on onnxruntime's int8 kernels."""

    weight_bits: int = 8
    activation_bits: int = 8
    granularity: Granularity = Granularity.CHANNEL
    calibration: CalibrationMethod = CalibrationMethod.PERCENTILE
    percentile: float = 99.999
    weight_range: WeightRange = WeightRange.AUTO
    simplify: bool = True
    max_samples: int | None = 512
    batch_size: int = 8
    op_types: frozenset[str] = field(
        default_factory=lambda: frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
    )

    def __post_init__(self) -> None:
        for name in ("weight_bits", "activation_bits"):
            if getattr(self, name) != 8:
                raise OnnxqError(f"{name} must be 8 for now (got {getattr(self, name)})")
        if not 50.0 < self.percentile <= 100.0:
            raise OnnxqError(f"percentile must be in (50, 100], got {self.percentile}")
        if self.batch_size < 1:
            raise OnnxqError("batch size must be at least 1")
        if self.max_samples is not None and self.max_samples < 1:
            raise OnnxqError("max samples must be at least 1")
