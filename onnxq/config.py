"""Typed, frozen configuration shared by the Python API and the CLI.

The CLI only parses flags into these objects; every stage reads them, never a dict of strings.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace

from onnxq.errors import OnnxqError
from onnxq.layer_settings import (
    ACTIVATION_SCALECLIP_K,
    Granularity,
    LayerOverride,
    LayerSettings,
    RangeRule,
)
from onnxq.layer_settings import load_overrides as load_overrides  # the API's and CLI's entry
from onnxq.preprocess import Preprocess as Preprocess  # how images become input, for the CLI

# λ of the PD regulariser (normalised MSE of each item's outputs), chosen on held-out
# calibration images only by tools/choose_pd_lambda.py (BENCHMARKS.md "pd-lambda"): resnet20 W4A4
# and mobileone W4A8, two seeds each, λ = 0 / 0.1 / 1 / 10; 0.1 had the lowest mean log held-out
# KL. The differences are within the noise of 51 held-out images, so take it as a scale, not a
# fine optimum. A larger λ also lets more candidates be ruled out unrun (faster pd).
PD_LAMBDA = 0.1
WEIGHT_ROUNDINGS = ("auto", "nearest", "gptq")
ACTIVATION_ERRORS = ("readers", "own")
CORRECTION_TARGETS = ("inputs", "blocks")  # what distribution correction nudges
CORRECTION_STATISTICS = ("batch", "sample")  # whose statistics are matched to BatchNorm's
# which weights get a zero point: none (all symmetric), narrow (those below 8 bits), all, or auto
WEIGHT_ZERO_POINTS = ("auto", "none", "narrow", "all")


class CalibrationMethod(enum.Enum):
    """How scales are chosen from the calibration data.

    MINMAX, PERCENTILE and SCALECLIP (α = K·mean|A|, GDRQ's Scale-Clip) set activation ranges
    from float statistics (weights follow their range rule); AUTO builds the model with the
    percentile ranges and with the min-max ranges of one statistics pass and keeps the one whose
    outputs stay closer to float on held-back samples (onnxq.tune.ranges). MSE, MAE and
    PD search every weight and activation scale by the error it causes, in onnxruntime, layer by
    layer on the quantized model's own activations; PD then refines them by the prediction
    difference at the output (PD-Quant). With 8-bit activations and no refinement the searched
    activation ranges then meet the min-max ones as AUTO's percentile ones do
    (onnxq.calibrate.compares_extremes).
    """

    AUTO = "auto"
    MINMAX = "minmax"
    PERCENTILE = "percentile"
    MSE = "mse"
    MAE = "mae"
    PD = "pd"
    SCALECLIP = "scaleclip"

    @property
    def searched(self) -> bool:
        return self in (CalibrationMethod.MSE, CalibrationMethod.MAE, CalibrationMethod.PD)


class WeightRange(enum.Enum):
    """Integer range of 8-bit weights.

    x86 CPUs without VNNI compute u8×s8 products in pairs that saturate int16 when weights use
    the full int8 range; a 7-bit range ([-63, 63]) never does. UNSIGNED keeps the full range
    and stores it as uint8 around zero point 128: onnxruntime then runs its u8×u8 kernels, which
    widen to int16 before multiplying and never saturate, at some cost in speed. AUTO probes
    onnxruntime's own kernels on this machine and picks FULL where they do not saturate; where
    they do, UNSIGNED if a model with it runs clearly faster than float, else REDUCED (onnxq.quant.int8_form).
    """

    AUTO = "auto"
    FULL = "full"
    REDUCED = "reduced"
    UNSIGNED = "unsigned"


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how; the defaults give W8A8 that runs on onnxruntime's int8 kernels.

    Weights are symmetric and signed (zero point 0), or unsigned with a zero point per scale:
    `weight_zero_point` "none", "narrow" (the weights narrower than 8 bits), "all", or "auto"
    (narrow with 8-bit activations or weights below 4 bits, else none: `symmetric_weights`).
    Activations are asymmetric and unsigned by default (a ReLU output gets zero point 0);
    `activation_symmetric=True` gives signed ones with zero point 0, except tensors that are
    never negative, which stay unsigned.
    """

    weight_bits: int = 8
    activation_bits: int = 8
    granularity: Granularity = Granularity.CHANNEL
    weight_rule: RangeRule = RangeRule.MINMAX
    weight_zero_point: str = "auto"
    activation_symmetric: bool = False
    calibration: CalibrationMethod = CalibrationMethod.AUTO
    percentile: float = 99.999
    activation_scaleclip: float | None = None  # K of --calib-method scaleclip; None: per width
    weight_range: WeightRange = WeightRange.AUTO
    first_last_8bit: bool = True
    # Tensors only Add reads (a residual branch before its sum) get at least this many bits.
    # "A bits" are the inputs of weighted layers, as in BRECQ and QDrop, which leave these float;
    # at W4A4, 4-bit addends raised ResNet-20's held-out KL after the search from 0.040 to 0.062.
    # The activation width here quantizes every activation alike.
    addend_bits: int = 8
    # a tensor an Add and a layer both read: the Add at addend_bits, the layer through its own
    # quantizer at its activation bits (onnxq/passes/split_addend_reads.py); False: one quantizer
    split_sums: bool = True
    overrides: tuple[LayerOverride, ...] = ()
    simplify: bool = True
    # Merge re-parameterized branches before quantizing? None: only when every weight is 8-bit.
    # Below 8 bits a merged kernel's identity tap is an outlier one scale cannot serve, and each
    # branch quantized on its own is far more accurate (BENCHMARKS.md, calib suite).
    fuse_branches: bool | None = None
    max_samples: int | None = 512
    batch_size: int = 8
    bias_correction: bool | None = None  # None: see corrects_bias
    # weight integers: "nearest" rounding, or "gptq", chosen column by column against the
    # layer's input correlations on the calibration data (onnxq/calib/rounding.py); "auto":
    # gptq at every width, and with --refine below 4-bit weights and with 8-bit activations
    # only, where refinement starts from GPTQ's integers (see rounds_by_gptq)
    weight_rounding: str = "auto"
    # cross-layer equalization (onnxq/passes/equalize.py): activation channel ranges moved into
    # per-channel weights before a depthwise conv, before planning; None: see `equalizes`
    equalize: bool | None = None
    seed: int = 0
    holdout: float = 0.2  # part of the calibration data kept out of the search, to report on
    pd_lambda: float = PD_LAMBDA
    time_budget: float | None = None  # seconds for the search; what is left keeps simple ranges
    search_memory_gb: float = 1.5  # cached activations of mse/mae/pd; beyond it, fewer samples
    search_cache_half: bool = True  # cache them in float16 (BENCHMARKS.md: costs no accuracy)
    # how the mse/mae/pd search scores an activation's range: "own", every value alike; "readers"
    # weighs each channel's error by the squared weights of the layers that read it
    # (onnxq/calib/reader_weights.py), which raised the held-out KL on 5 of 6 rows
    # (tools/choose_activation_error.py, BENCHMARKS.md) and is not the default
    activation_error: str = "own"
    min_sqnr: float | None = None  # dB: an output below it on held-back samples is an error
    layer_report: bool = False  # measure every quantized layer's input and output SQNR (the report)
    fidelity_fallback: bool = True  # keep the layers that lose most float while outputs fall short
    # at 8 bits, time the QDQ model against float and keep layers float where that runs faster;
    # the choice follows timings on this machine, so turn it off for byte-reproducible files
    speed_check: bool = True
    op_types: frozenset[str] = field(
        default_factory=lambda: frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
    )
    # rounding refinement (onnxq[refine]): weight rounding and activation steps learned by
    # gradient in a torch mirror, unit by unit, after calibration (onnxq/refine/)
    refine: bool = False
    refine_unit: str = "block"  # layer, block or window:K
    # mse, mae or pd: pd has the lower mean log KL to float on held-out calibration images over
    # ResNet-20 W4A4 and W2A4 (tools/choose_refine_loss.py) and MobileNetV2 W4A4 under a 1800 s
    # budget together, though mse won that last row alone (0.597 against 0.662) and costs far less
    refine_loss: str = "pd"
    refine_iters: int = 500  # per unit
    refine_batch: int = 32
    # under time_budget, in a pd unit whose whole batch would not reach refine_iters in its
    # share, pd's KL term takes this many samples of each batch (0: never): the float remainder,
    # most of an early unit's cost, runs on these only. MobileNetV2 W4A4 at 1800 s: held-out KL
    # 0.714 → 0.597 (tools/choose_pd_samples.py); narrowed everywhere without a budget, ResNet-20
    # rose 0.0220 → 0.0317, so the budget decides where it applies
    refine_pd_samples: int = 8
    # activations refinement holds at unit cuts (beyond it, fewer samples) and, apart, those one
    # learning pass keeps (beyond it, a batch learns in chunks)
    refine_memory_gb: float = 2.0
    # the model from the scale search alone replaces the refined one where it keeps the lowest
    # output clearly closer to float on the check's samples (onnxq/tune/refinement.py)
    refine_check: bool = True
    qdrop: float = 0.5  # QDrop's probability of keeping an activation float while learning
    threads: int | None = None  # torch threads for refinement (None: torch's default)
    # the fake quantizers' learning passes compiled by torch (needs a C++ compiler; refinement
    # falls back to eager passes where compiling fails); off: eager, byte-identical across machines
    refine_compile: bool = True
    device: str = "cpu"
    # distribution correction (onnxq/correct/): the inputs refinement learns from are nudged
    # towards the BatchNorm statistics folded away, with --refine where there were any; off
    # because it raised the held-out KL at every λ tried on ResNet-20 and MobileNetV2 at W4A4
    # (tools/choose_dc.py)
    distribution_correction: bool = False
    correction_closeness: float = 1.0  # λ of the term that keeps corrected inputs near the originals
    # what is corrected: the calibration inputs once, before refinement (inputs), or each unit's
    # float inputs before it learns, as PD-Quant does (blocks: onnxq/refine/block_correction.py)
    correction_at: str = "inputs"
    # whose per-channel statistics block correction matches: each batch's (batch) or each
    # sample's own, over its spatial positions, as PD-Quant's code does (sample; blocks only)
    correction_statistics: str = "batch"
    # QPRep (RepAPQ): with --refine, merged re-parameterized convs also learn a per-channel
    # affine of their output, folded into their weight scales and bias at export; on because it
    # lowered the held-out KL on merged RepVGG and MobileOne at W6A6 and W4A8 (tools/choose_qprep.py)
    qprep: bool = True
    # with --refine, every refined layer learns that affine too (its shift mends nearest rounding's
    # mean error); off: held-out KL fell on 3 of 4 rows, rose on ResNet-20 W4A4 (BENCHMARKS.md)
    refine_affine: bool = False

    def __post_init__(self) -> None:
        self._accept_text()
        for name in ("weight_bits", "activation_bits", "addend_bits"):
            _check_bits(getattr(self, name), name.replace("_", " "))
        for override in self.overrides:
            for name in ("weight_bits", "activation_bits"):
                if getattr(override, name) is not None:
                    _check_bits(getattr(override, name), f"override {override.pattern!r} {name}")
        if not 50.0 < self.percentile <= 100.0:
            raise OnnxqError(f"percentile must be in (50, 100], got {self.percentile}")
        if self.batch_size < 1:
            raise OnnxqError("batch size must be at least 1")
        if self.max_samples is not None and self.max_samples < 1:
            raise OnnxqError("max samples must be at least 1")
        if not 0.0 <= self.holdout < 1.0:
            raise OnnxqError(f"holdout must be in [0, 1), got {self.holdout}")
        if self.activation_scaleclip is not None and self.activation_scaleclip <= 0:
            raise OnnxqError(f"activation Scale-Clip K must be positive, got {self.activation_scaleclip}")
        if self.pd_lambda < 0:
            raise OnnxqError(f"pd lambda must be non-negative, got {self.pd_lambda}")
        if self.correction_closeness < 0:
            raise OnnxqError(f"correction closeness must be non-negative, got {self.correction_closeness}")
        if self.correction_at not in CORRECTION_TARGETS:
            raise OnnxqError(
                f"distribution correction must act on inputs or blocks, got {self.correction_at!r}"
            )
        if self.correction_statistics not in CORRECTION_STATISTICS:
            raise OnnxqError(
                f"correction statistics must be batch or sample, got {self.correction_statistics!r}"
            )
        if self.correction_statistics == "sample" and self.correction_at != "blocks":
            raise OnnxqError("per-sample correction statistics need --correction-at blocks")
        if self.time_budget is not None and self.time_budget <= 0:
            raise OnnxqError(f"time budget must be positive, got {self.time_budget}")
        if self.refine:
            self._check_refine()
        if self.weight_zero_point not in WEIGHT_ZERO_POINTS:
            choices = ", ".join(WEIGHT_ZERO_POINTS)
            raise OnnxqError(f"weight zero point must be one of {choices}, got {self.weight_zero_point!r}")
        if self.weight_rounding not in WEIGHT_ROUNDINGS:
            raise OnnxqError(f"weight rounding must be auto, nearest or gptq, got {self.weight_rounding!r}")
        if self.search_memory_gb <= 0:
            raise OnnxqError(f"search memory must be positive, got {self.search_memory_gb} GB")
        if self.activation_error not in ACTIVATION_ERRORS:
            raise OnnxqError(f"activation error must be readers or own, got {self.activation_error!r}")

    def _accept_text(self) -> None:
        """The Python API takes what the CLI takes: calibration="mse", granularity="group:8"."""
        parsers = {
            "calibration": _enum_parser(CalibrationMethod, "calibration"),
            "weight_range": _enum_parser(WeightRange, "weight range"),
            "granularity": Granularity.parse,
            "weight_rule": RangeRule.parse,
        }
        for name, parse in parsers.items():
            if isinstance(getattr(self, name), str):
                object.__setattr__(self, name, parse(getattr(self, name)))

    def _check_refine(self) -> None:
        from onnxq.refine.blocks import parse_unit  # torch-free

        parse_unit(self.refine_unit)
        if self.refine_loss not in ("mse", "mae", "pd"):
            raise OnnxqError(f"refine loss must be mse, mae or pd, got {self.refine_loss!r}")
        if self.refine_iters < 1 or self.refine_batch < 1:
            raise OnnxqError("refine iterations and batch must be at least 1")
        if self.refine_pd_samples < 0:
            raise OnnxqError(f"refine pd samples must be 0 (never) or more, got {self.refine_pd_samples}")
        if self.refine_memory_gb <= 0:
            raise OnnxqError(f"refine memory must be positive, got {self.refine_memory_gb} GB")
        if not 0.0 <= self.qdrop < 1.0:
            raise OnnxqError(f"qdrop must be in [0, 1), got {self.qdrop}")
        if self.device not in ("cpu", "cuda"):
            raise OnnxqError(f"device must be cpu or cuda, got {self.device!r}")

    def activation_scaleclip_k(self, bits: int) -> float:
        """Scale-Clip's K for activations of `bits` (the given one, else the chosen table's)."""
        return self.activation_scaleclip or ACTIVATION_SCALECLIP_K.get(bits, ACTIVATION_SCALECLIP_K[8])

    @property
    def lowest_weight_bits(self) -> int:
        widths = [self.weight_bits, *(o.weight_bits for o in self.overrides if o.weight_bits is not None)]
        return min(widths)

    @property
    def symmetric_weights(self) -> bool | None:
        """True: every weight symmetric; False: every weight with a zero point; None: 8-bit weights
        symmetric (onnxruntime's integer kernels run them), narrower ones with a zero point.

        auto, chosen on held-out calibration images per class of widths
        (tools/choose_weight_zero_point.py): a zero point fits a skewed channel's few levels to
        its own range, and lowered the held-out KL with 8-bit activations (MobileNetV2 W4A8 0.210
        → 0.137, its depthwise filters) and below 4-bit weights (ResNet-20 W2A4 0.205 → 0.115);
        with 4-bit and wider weights under narrower activations it did not (ResNet-56 W4A4 0.0030
        → 0.0047, MobileNetV2 W4A4 1.61 → 1.95; ResNet-20 W4A4, MobileOne W4A4 and MobileNetV2
        W6A6 level), so those stay symmetric."""
        zero_point = self.weight_zero_point
        if zero_point == "auto":
            narrow = self.lowest_activation_bits >= 8 or self.lowest_weight_bits < 4
            zero_point = "narrow" if narrow else "none"
        return {"none": True, "narrow": None, "all": False}[zero_point]

    @property
    def lowest_bits(self) -> int:
        """The narrowest weight or activation width anywhere in the plan."""
        return min(self.lowest_weight_bits, self.lowest_activation_bits)

    @property
    def rounds_by_gptq(self) -> bool:
        """auto: GPTQ at every width. Below 8 bits top-1 on held-out calibration images
        (`tools/bench.py rounding`, one draw) rose in 9 of 13 (model, width, calibration) pairs,
        by up to 52 points (ResNet-20 W2A4: auto 9.7 → 61.4, mse 78.4 → 93.7), and fell in 4, by
        at most 2.9 (ResNet-56 W4A4 auto and mse, MobileNetV2 W4A8 and W6A6 mse). At 8 bits,
        run in the observation pass on float inputs (onnxq.calib.streamed_gptq), the held-out
        worst output SQNR rose on 7 of the zoo's 8 trained models (mean 17.0 → 19.1 dB; magika
        −0.1) and MobileNetV2's KL fell 0.034 → 0.028 (ResNet-20 0.00047 → 0.00056, top-1 100 %
        either way; tools/choose_w8_correction.py). With --refine, AdaRound
        starts from GPTQ's integers below 4-bit weights (ResNet-20 W2A4 held-out KL 0.315 →
        0.166) and, below 8-bit weights, with 8-bit activations, where weights get a zero point
        (MobileNetV2 W4A8 0.136 → 0.107); from nearest rounding otherwise (ResNet-20 W4A4 0.0325
        against 0.0445, MobileNetV2 W4A4 0.662 against 0.920; tools/choose_refine_start.py).
        MobileNetV2 W4A8 had favoured nearest with symmetric weights (0.1650 against 0.1662),
        before the zero point was its default."""
        if self.weight_rounding == "auto":
            if not self.refine:
                return True
            eight_bit_activations = self.lowest_activation_bits >= 8 and self.lowest_weight_bits < 8
            return self.lowest_weight_bits < 4 or eight_bit_activations
        return self.weight_rounding == "gptq"

    @property
    def gptq_in_sweep(self) -> bool:
        """GPTQ inside the calibration sweep (on the quantized model's inputs). auto at 8-bit
        weights rounds by GPTQ in the observation pass only: no held-out run has chosen GPTQ for
        the 8-bit mse sweep, and there it cost YOLOX's boxes 5 dB (20.7 → 15.7 dB, 868f8f7), so
        the sweep keeps nearest rounding at 8 bits unless asked."""
        if self.weight_rounding == "auto" and self.lowest_weight_bits >= 8:
            return False
        return self.rounds_by_gptq

    @property
    def equalizes(self) -> bool:
        """Default: on below 8-bit activations, where one scale's few levels cannot serve
        channels of different ranges (MobileNetV2 mse held-out KL, tools/choose_equalize.py: W6A6
        0.144 → 0.090, W5A5 0.293 → 0.235 with channels lined up by maxima; W4A4 1.85 → 1.27
        lined up by where each is best clipped at 4 bits, 1.77 by maxima: see
        onnxq.pipeline.CLIPPED_EQUALIZATION_BITS). At 8 bits the levels suffice (W4A8 0.206 →
        0.229). Moving a channel's range into the weights is free only where weights have a
        scale per output channel, so other granularities never equalize."""
        if self.granularity.kind != "channel":
            return False
        return self.lowest_activation_bits < 8 if self.equalize is None else self.equalize

    @property
    def rescales_float_sides(self) -> bool:
        """Default: on at every width wherever weights have a scale per output channel. Moves
        across a float op (a Conv output only float ops read, a depthwise input behind a Mul/Div
        by a constant) change nothing an integer kernel computes but the activation's rounding,
        and what they fix is no question of levels: PP-PicoDet's stem has channels 340× narrower
        than its widest, which its depthwise conv multiplies by 72; at W8A8 the layout detector's
        worst output on held-out calibration samples went 3.1 → 12.7 dB, PP-OCRv4's text detector
        12.4 → 15.5 (tools/choose_float_side.py)."""
        if self.granularity.kind != "channel":
            return False
        return self.equalize is not False

    @property
    def lowest_activation_bits(self) -> int:
        widths = [self.activation_bits, *(o.activation_bits for o in self.overrides if o.activation_bits)]
        return min(widths)

    @property
    def merges_branches(self) -> bool:
        return self.lowest_weight_bits >= 8 if self.fuse_branches is None else self.fuse_branches

    @property
    def corrects_bias(self) -> bool:
        """Default: on for min-max/percentile ranges below 8-bit weights, where it is the cheap cure
        for shifted means (MobileNetV2 W4A8 16.8 → 70.0 %); off for mse, mae and pd, whose output
        search already absorbs the shift and where correcting on top hurt in 7 of 10 benchmark
        pairs (ResNet-56 W4A4 mae: 89.9 → 68.0 %)."""
        if self.bias_correction is not None:
            return self.bias_correction
        return not self.calibration.searched and self.lowest_weight_bits < 8

    def layer_settings(self, name: str, op_type: str, *, edge: bool = False) -> LayerSettings:
        """The settings of one layer: global, 8 bits for the first/last layer, then overrides."""
        settings = LayerSettings(self.weight_bits, self.activation_bits, self.granularity, self.weight_rule)
        if edge and self.first_last_8bit:
            settings = replace(settings, weight_bits=8, activation_bits=max(8, settings.activation_bits))
        for override in self.overrides:
            if override.matches(name, op_type):
                settings = override.apply(settings)
        return settings


def _check_bits(bits: int, what: str) -> None:
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise OnnxqError(f"{what} must be a whole number from 2 to 8, got {bits!r}")


def _enum_parser(kind: type[enum.Enum], what: str):
    def parse(text: str):
        try:
            return kind(text)
        except ValueError:
            choices = ", ".join(member.value for member in kind)
            raise OnnxqError(f"{what} must be one of {choices}, got {text!r}") from None

    return parse
