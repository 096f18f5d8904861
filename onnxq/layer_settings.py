"""What one layer's weights get: how many scales (Granularity), how each scale group's range is
chosen (RangeRule, Scale-Clip's K per width), and per-layer overrides read from TOML.

onnxq.config re-exports every name here; QuantConfig gives each layer its LayerSettings.
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass, replace

from onnxq.errors import OnnxqError


@dataclass(frozen=True)
class Granularity:
    """How many scales a weight tensor gets.

    tensor: one; channel: one per output channel; group:G: consecutive groups of G output
    channels share one (group-based quantization); block:B: each output channel's inputs in
    blocks of B channels get one each (ONNX DequantizeLinear `block_size`).
    """

    kind: str
    size: int = 0

    KINDS = ("tensor", "channel", "group", "block")

    def __post_init__(self) -> None:
        if self.kind not in self.KINDS:
            raise OnnxqError(f"granularity must be tensor, channel, group:G or block:B, got {self.kind!r}")
        sized = self.kind in ("group", "block")
        if sized and self.size < 1:
            raise OnnxqError(f"granularity {self.kind} needs a size of at least 1, as {self.kind}:N")
        if not sized and self.size:
            raise OnnxqError(f"granularity {self.kind} takes no size")

    @classmethod
    def parse(cls, text: str) -> Granularity:
        """'tensor', 'channel', 'group:8' or 'block:32'."""
        kind, _, size = text.strip().partition(":")
        try:
            return cls(kind, int(size) if size else 0)
        except ValueError:
            raise OnnxqError(f"granularity size must be a whole number, got {text!r}") from None

    def __str__(self) -> str:
        return f"{self.kind}:{self.size}" if self.size else self.kind


Granularity.TENSOR = Granularity("tensor")
Granularity.CHANNEL = Granularity("channel")


# Scale-Clip's K (α = K·mean|W|) per weight bit width, chosen by tools/choose_scaleclip.py on
# calibration data only (lowest mean log-KL of the weight-only quantized softmax over ResNet-20,
# MobileNetV2, RepVGG and MobileOne, branches unmerged as quantized below 8 bits; table in
# BENCHMARKS.md). At 4 and 6 bits every K that clips hurts some model, so K=16 there clips almost
# nothing; 7 bits follows 6. Scale-Clip helps most at 2 and 3 bits on these models.
SCALECLIP_K = {2: 2.5, 3: 4.0, 4: 16.0, 5: 8.0, 6: 16.0, 7: 16.0}
# Scale-Clip's K for activations (α = K·mean|A|, `--calib-method scaleclip`) per activation bit
# width, chosen by tools/choose_scaleclip.py --activations (lowest mean log-KL on held-out
# calibration images over ResNet-20, MobileNetV2, RepVGG, MobileOne; table in BENCHMARKS.md);
# 2-3 bits follow 4, 5 follows 6, 7 follows 8. Mixed against the default percentile rule: far
# better on MobileNetV2 at 4-6 bits, worse on ResNet-20 at 4 bits, so it is not the default.
ACTIVATION_SCALECLIP_K = {2: 12.0, 3: 12.0, 4: 12.0, 5: 24.0, 6: 24.0, 7: 32.0, 8: 32.0}


@dataclass(frozen=True)
class RangeRule:
    """How a weight scale group's clipping range is chosen.

    minmax: the extremes; percentile:P: the P-th percentile of |w|; mse / mae: the clipping ratio
    minimising the squared / absolute quantization error of the group's weights (grid search,
    refined around the best); scaleclip:K: α = K·mean|w| of the group (Scale-Clip), K per bit
    width from SCALECLIP_K when not given; output: the clipping ratio minimising the squared error
    of the layer's output on the calibration data, measured in onnxruntime (what the mse, mae and
    pd calibration methods do for every layer).
    """

    kind: str
    value: float | None = None

    KINDS = ("minmax", "percentile", "mse", "mae", "scaleclip", "output")

    def __post_init__(self) -> None:
        if self.kind not in self.KINDS:
            raise OnnxqError(
                "weight range must be minmax, percentile:P, mse, mae, scaleclip[:K] or output, "
                f"got {self.kind!r}"
            )
        if self.kind == "percentile" and not (self.value is not None and 50.0 < self.value <= 100.0):
            raise OnnxqError("percentile:P needs P in (50, 100]")
        if self.kind == "scaleclip" and self.value is not None and self.value <= 0:
            raise OnnxqError("scaleclip:K needs K > 0")

    @classmethod
    def parse(cls, text: str) -> RangeRule:
        kind, _, value = text.strip().partition(":")
        try:
            return cls(kind, float(value) if value else None)
        except ValueError:
            raise OnnxqError(f"weight range value must be a number, got {text!r}") from None

    def clip_factor(self, bits: int) -> float:
        """Scale-Clip's K for this bit width."""
        return self.value if self.value is not None else SCALECLIP_K.get(bits, 0.0)

    def __str__(self) -> str:
        return self.kind if self.value is None else f"{self.kind}:{self.value:g}"


RangeRule.MINMAX = RangeRule("minmax")


@dataclass(frozen=True)
class LayerSettings:
    """The quantization one layer gets: its weights, and the activations it reads."""

    weight_bits: int
    activation_bits: int
    granularity: Granularity
    weight_rule: RangeRule
    keep_float: bool = False  # left float, weights and all (an override's `float = true`)


@dataclass(frozen=True)
class LayerOverride:
    """Settings for the layers whose node name (fnmatch pattern) or op type matches.

    Later overrides win over earlier ones; unset fields keep the global setting.
    """

    pattern: str = "*"
    op_type: str | None = None
    weight_bits: int | None = None
    activation_bits: int | None = None
    granularity: Granularity | None = None
    weight_rule: RangeRule | None = None
    keep_float: bool | None = None

    def matches(self, name: str, op_type: str) -> bool:
        return fnmatch.fnmatchcase(name, self.pattern) and self.op_type in (None, op_type)

    def apply(self, settings: LayerSettings) -> LayerSettings:
        changes = {
            f: getattr(self, f)
            for f in ("weight_bits", "activation_bits", "granularity", "weight_rule", "keep_float")
            if getattr(self, f) is not None
        }
        return replace(settings, **changes)


def _flag(entry: dict, key: str, path: str | os.PathLike, index: int) -> bool | None:
    value = entry.get(key)
    if value is not None and not isinstance(value, bool):
        raise OnnxqError(f"{path}: [[layer]] {index + 1}: {key} must be true or false, got {value!r}")
    return value


def load_overrides(path: str | os.PathLike) -> tuple[LayerOverride, ...]:
    """Per-layer overrides from a TOML file:

    [[layer]]
    match = "/body/body.1*"      # fnmatch pattern on the node name (default "*")
    op = "Conv"                  # only nodes of this op type (optional)
    w_bits = 8
    a_bits = 8
    granularity = "channel"
    w_range = "mse"
    float = true                 # leave the layer float, weights and all (optional)
    """
    import tomllib

    try:
        with open(path, "rb") as handle:
            document = tomllib.load(handle)
    except FileNotFoundError:
        raise OnnxqError(f"override file not found: {path}") from None
    except tomllib.TOMLDecodeError as err:
        raise OnnxqError(f"{path} is not valid TOML ({err})") from None
    known = {"match", "op", "w_bits", "a_bits", "granularity", "w_range", "float"}
    overrides = []
    for index, entry in enumerate(document.get("layer", [])):
        unknown = set(entry) - known
        if unknown:
            raise OnnxqError(f"{path}: [[layer]] {index + 1} has unknown keys {sorted(unknown)}")
        overrides.append(
            LayerOverride(
                pattern=str(entry.get("match", "*")),
                op_type=entry.get("op"),
                weight_bits=entry.get("w_bits"),
                activation_bits=entry.get("a_bits"),
                granularity=Granularity.parse(entry["granularity"]) if "granularity" in entry else None,
                weight_rule=RangeRule.parse(entry["w_range"]) if "w_range" in entry else None,
                keep_float=_flag(entry, "float", path, index),
            )
        )
    if not overrides:
        raise OnnxqError(f"{path} has no [[layer]] entries")
    return tuple(overrides)
