"""The plan's records (onnxq.quant.plan makes them): which tensors get Q/DQ pairs at what width,
which weights are stored as integers cut into which scales, which biases as int32, and why each
node left float stays so. Names only: calibration fills in the ranges, insert_qdq the nodes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from onnxq.layer_settings import Granularity, LayerSettings, RangeRule
from onnxq.quant import kernels
from onnxq.quant.weights import WeightLayout


@dataclass(frozen=True)
class ActivationSpec:
    """A float tensor that gets QuantizeLinear → DequantizeLinear.

    observed: the float tensor whose statistics set the range (the Relu/Clip output when absorbed).
    shares: another activation whose scale and zero point this one reuses (shape-only ops).
    floor: where the range may stop below: every reader flattens what lies under it (SiLU,
    HardSwish), so reaching lower would only coarsen the step for values that matter.
    """

    tensor: str
    observed: str
    shares: str | None = None
    bits: int = 8
    floor: float | None = None

    def bounded(self, low: float, high: float) -> tuple[float, float]:
        """The range [low, high] raised to the floor, where the readers allow it."""
        if self.floor is None or low >= self.floor or high <= self.floor:
            return low, high
        return self.floor, high


@dataclass(frozen=True)
class WeightSpec:
    """A constant weight stored as integers with a DequantizeLinear, and how it is cut into scales."""

    name: str
    layout: WeightLayout
    bits: int
    granularity: Granularity
    rule: RangeRule
    container_bits: int = 0  # the ONNX integer type's width; 0: the narrowest that holds `bits`
    kernel: str = kernels.GEMM  # the kind of onnxruntime kernel its layer runs on (onnxq.quant.kernels)


@dataclass(frozen=True)
class BiasSpec:
    """A constant bias stored as int32 with scale s_activation · s_weight, zero point 0."""

    name: str
    activation: str
    weight: str


@dataclass
class QuantPlan:
    activations: dict[str, ActivationSpec] = field(default_factory=dict)
    weights: dict[str, WeightSpec] = field(default_factory=dict)
    biases: dict[str, BiasSpec] = field(default_factory=dict)
    absorbed: dict[str, str] = field(default_factory=dict)  # Relu/Clip node → the tensor it reads
    quantized_nodes: list[str] = field(default_factory=list)
    float_nodes: dict[str, str] = field(default_factory=dict)  # node → why it stays float
    unmatched_overrides: list[str] = field(default_factory=list)  # override patterns no layer matched
    kept_float: dict[str, str] = field(default_factory=dict)  # layers asked to stay float → why
    layers: dict[str, LayerSettings] = field(default_factory=dict)  # compute node → its settings
    widened_addends: list[str] = field(default_factory=list)  # read only by Add, given addend_bits

    def observed_tensors(self, *, sharers: bool = True) -> list[str]:
        """Float tensors whose ranges calibration must measure: each root's and (`sharers`) each
        sharer's own. A later plan that keeps more layers float quantizes some sharers on their
        own: yolov8n's SPPF MaxPools, once the layer before them is kept float, are read by a
        Concat that gives them their own scales."""
        return sorted({a.observed for a in self.activations.values() if sharers or a.shares is None})

    def sharer_tensors(self) -> list[str]:
        """The tensors only `observed_tensors(sharers=True)` adds: what a search over roots misses."""
        roots = set(self.observed_tensors(sharers=False))
        return [name for name in self.observed_tensors() if name not in roots]

    def why_nothing_quantized(self, layers: list[tuple[str, str]]) -> str:
        """Why a plan quantizes nothing: the first of `layers` (op type and name, in graph order)
        that stays float, with its reason, or that the model has no such layer."""
        kept = [(op, name) for op, name in layers if name in self.float_nodes]
        if not kept:
            return "the model has no Conv, ConvTranspose, Gemm or MatMul with constant weights"
        (op, name), more = kept[0], f" (and {len(kept) - 1} more layers)" if len(kept) > 1 else ""
        return f"{op} {name!r} stays float{more}: {self.float_nodes[name]}"

    def root(self, tensor: str) -> str:
        """The activation whose parameters `tensor` uses (itself unless it shares)."""
        spec = self.activations[tensor]
        while spec.shares is not None:
            spec = self.activations[spec.shares]
        return spec.tensor


# plan_quantization with the graph and config bound: its keyword arguments → a plan (the stages
# that replan after calibration or a speed check take one)
Replan = Callable[..., QuantPlan]
