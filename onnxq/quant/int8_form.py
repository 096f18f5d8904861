"""How 8-bit weights are stored where onnxruntime's u8×s8 kernels saturate (x86 without VNNI):
in the 7-bit range, or at full range as uint8 around zero point 128 (u8×u8 kernels, exact but
slower), chosen per model by timing before calibration.

Measured on the zoo (BENCHMARKS.md, "8-bit weights on a CPU without VNNI"): unsigned weights
kept the outputs closer to float on eight of twelve models, by up to 4 dB (PP-OCRv4's
recogniser 15.5 → 19.5 dB, Magika 27.4 → 30.7), and 0.1–0.5 dB further on the other four; they
ran at float speed on five and slower on seven, where the 7-bit range stayed faster. So the
unsigned form is taken where it runs clearly faster than float, the reduced one elsewhere.

The probe quantizes every planned layer with placeholder activation ranges: which kernels
onnxruntime picks and how fast they run depend on the types, not on the values. The GPTQ
integers and searched scales calibration computes next are then computed for the form chosen.
"""

from __future__ import annotations

import time

import numpy as np
import onnx

from onnxq.calib.data import Batch
from onnxq.calib.runner import fixed_batch
from onnxq.config import QuantConfig, WeightRange
from onnxq.io import oldest_ir_version, run, session, to_proto
from onnxq.passes.infer_types import typed_ir
from onnxq.passes.insert_qdq import activation_params, insert_qdq
from onnxq.quant import kernels
from onnxq.quant.plan import QuantPlan
from onnxq.speed import compare as compare_latency

# Below this float latency the timings are per-node overhead and noise (the suite's 16×16
# models run in tens of µs): the reduced form is kept without timing (as the speed check does).
PROBE_MIN_MS = 0.5
# The unsigned form must run this much faster than float: the QDQ model calibration builds is
# timed again by the speed check, and one that turns out slower than float there loses layers
# (or everything) to float, where the 7-bit form would have stayed faster. Probes of a YOLOX
# whose unsigned model runs at float speed timed it 0.93-0.97× float, and with a 5 % margin it
# was taken and ran 1.01× float in the zoo benchmark; EfficientNet-Lite0 timed 0.85-1.09×.
UNSIGNED_MARGIN = 0.9
PROBE_SECONDS = 3.0  # per model: twice speed.SECONDS, as the choice holds for the whole run
_PLACEHOLDER_RANGE = (0.0, 1.0)


def choose_int8_range(
    float_model: onnx.ModelProto,
    plan: QuantPlan,
    sample: Batch,
    config: QuantConfig,
    *,
    baseline: onnx.ModelProto,
) -> tuple[kernels.WeightRangeChoice, list[str]]:
    """`--int8-range`'s choice for this model, and a note where timing decided it.

    With `auto` on a CPU whose GEMM kernels saturate, and the speed check on: the unsigned form
    where a model with it runs clearly faster than float at batch 1 (`baseline`: the float
    model as prepared, before equalization), else the 7-bit range. Otherwise the rule of
    onnxq.quant.kernels.choose_weight_range."""
    choice = kernels.choose_weight_range(config.weight_range)
    if not _worth_timing(plan, config) or not kernels.int8_kernels_saturate():
        return choice, []
    one = sample if fixed_batch(float_model) else {k: v[:1] for k, v in sample.items()}
    if _rough_ms(baseline, one) < PROBE_MIN_MS:
        return choice, []
    unsigned = kernels.WeightRangeChoice(8, kernels.UNSIGNED_REASON, unsigned=True)
    probe = _probe(float_model, plan, unsigned)
    float_ms, unsigned_ms = compare_latency([baseline, probe], one, seconds=PROBE_SECONDS)
    timed = f"float {float_ms:.2f} ms, unsigned 8-bit weights {unsigned_ms:.2f} ms at batch 1"
    if unsigned_ms <= UNSIGNED_MARGIN * float_ms:
        reason = f"{kernels.UNSIGNED_REASON}: clearly faster than float on this CPU ({timed})"
        return kernels.WeightRangeChoice(8, reason, unsigned=True), [f"int8 range: {reason}"]
    not_faster = f"not {1 - UNSIGNED_MARGIN:.0%} faster than float"
    return choice, [f"int8 range: unsigned 8-bit weights {not_faster} ({timed}); kept {choice.reason}"]


def _worth_timing(plan: QuantPlan, config: QuantConfig) -> bool:
    """auto, the speed check on, every width 8 bits (narrower ones run no integer kernel), and
    some symmetric 8-bit weight on a GEMM kernel, the only kind that saturates."""
    return (
        config.weight_range is WeightRange.AUTO
        and config.speed_check
        and config.lowest_bits >= 8
        and config.symmetric_weights is not False
        and any(spec.bits == 8 and spec.kernel == kernels.GEMM for spec in plan.weights.values())
    )


def _rough_ms(model: onnx.ModelProto, feed: Batch, runs: int = 5) -> float:
    """The median of a few runs after a warm-up: enough to tell a tiny model from a real one."""
    runner = session(model)
    run(runner, feed)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        run(runner, feed)
        times.append(time.perf_counter() - started)
    return 1e3 * float(np.median(times))


def _probe(
    float_model: onnx.ModelProto, plan: QuantPlan, choice: kernels.WeightRangeChoice
) -> onnx.ModelProto:
    """The QDQ model of `plan` with weights stored as `choice` says and placeholder activation ranges."""
    model = typed_ir(float_model)
    ranges = {spec.observed: _PLACEHOLDER_RANGE for spec in plan.activations.values()}
    insert_qdq(model.graph, plan, activation_params(plan, ranges), int8_range=choice)
    probe = to_proto(model)
    probe.ir_version = oldest_ir_version(probe)
    return probe
