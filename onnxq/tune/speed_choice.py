"""The speed check: where the QDQ model runs slower than float at batch 1, the layers feeding
ops without an integer kernel are kept float too, if that runs faster; where no plan runs at
float speed, nothing is quantized. Only at 8 bits: narrower widths have no integer kernels in
onnxruntime, so they run simulated whatever the plan. Timed before the fidelity fallback, so that
the fallback works on the plan that is kept, and again after it (keep_fallback)."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import onnx

from onnxq import speed
from onnxq.calib.data import Batch
from onnxq.calib.runner import fixed_batch
from onnxq.config import QuantConfig
from onnxq.quant.plan import QuantPlan, Replan
from onnxq.runtime_kernels import count_kernels
from onnxq.tune.candidate import Build, Candidate

SPEED_MARGIN = 0.9  # a lighter plan must run this much faster to replace the first (timings are noisy)
FLOAT_IS_FASTER = "float is faster on this CPU: every quantized plan ran slower than float"
# Below this float latency a model is left quantized even where every plan runs slower: its
# timings are per-node overhead and noise (the suite's 16×16 models run in tens of µs), and the
# loss is microseconds; PaddleOCR's text-angle classifier, 1.6 ms, is well above it.
FLOAT_ONLY_MIN_MS = 0.5
# Beyond this many times float's latency the fidelity fallback is not tried for speed: it keeps
# at most a tenth of the layers float, chosen for fidelity, not speed. It took PP-OCRv4's
# detector from 1.10× float to 0.90× (its 640×640 stem convs); PP-PicoDet stayed 1.65× → 1.64×
# and spent 108 s of a 162 s run on it before everything was left float.
RESCUE_RATIO = 1.25
# Below 8 bits onnxruntime runs Q/DQ as float, so the model is never as fast as float and
# keeping layers float for speed would take back the widths the user asked for (a W4A8 YOLOX
# kept 3 of 83 layers quantized).
_SIMULATED_NOTE = (
    "speed: not compared with float: onnxruntime has no integer kernels for {bits}-bit tensors "
    "and runs their Q/DQ in float (`onnxq eval` times it); no layer is kept float for speed"
)

# A lighter plan whose every layer runs float gains no speed (its Q/DQ round trips only cost
# time and fidelity): on PP-PicoDet it kept two SE-block convs quantized around a 1×1 pool, which
# onnxruntime ran as float convs between Q/DQ pairs, timed within the noise of float.
_NO_INTEGER_KERNEL = (
    "speed: {label} runs no integer kernel (its {nodes} quantized nodes would run float between "
    "Q/DQ pairs): not a candidate"
)

_SAVED_FLOAT = "the saved model is the float model as prepared (simplified, BatchNorm folded, no Q/DQ)"


@dataclass
class SpeedChoice:
    """The plan the fidelity fallback starts from: the first model, a lighter plan of it, or
    nothing quantized; how to replan around it; and its batch-1 timing against float."""

    candidate: Candidate
    replan: Replan
    float_ms: float | None = None  # None: not timed (no speed check, or narrower than 8 bits)
    ms: float | None = None
    label: str = "the model"
    # slower than float within the timing noise: timed again after the fidelity fallback, with
    # everything the check timed (for the float fallback's plan) where it is slower again
    timed_again: list | None = None

    @property
    def fastest_ms(self) -> float | None:
        """The fastest plan's timing where it is to be timed again, else None."""
        if self.float_ms is None:
            return None
        return min((ms for _, ms in self.timed_again or ()), default=None)

    @property
    def clearly_slower(self) -> bool:
        """Every plan timed ran clearly slower than float: float unless the fallback changes that."""
        fastest = self.fastest_ms
        return fastest is not None and fastest * SPEED_MARGIN > self.float_ms

    @property
    def beyond_rescue(self) -> bool:
        """Every plan timed ran more than RESCUE_RATIO× float: nothing will be quantized."""
        fastest = self.fastest_ms
        return fastest is not None and fastest > RESCUE_RATIO * self.float_ms


def choose_speed(
    float_model: onnx.ModelProto,
    first: Candidate,
    sample: Batch,
    config: QuantConfig,
    replan: Replan,
    build: Build,
) -> tuple[SpeedChoice, list[str]]:
    """Where the QDQ model runs slower than float at batch 1, the first of these that runs at
    float speed: it; it with the layers that feed ops lacking an integer kernel kept float,
    unless none of its quantized layers then runs on an integer kernel. Where neither does, the
    lighter one if clearly faster than the first. Where even that runs slower than float, and
    float takes at least FLOAT_ONLY_MIN_MS, the choice carries what was
    timed (`timed_again`): keep_fallback times it again after the fidelity fallback and leaves
    nothing quantized where it is still slower, or at once where every plan was clearly slower
    (by more than timing noise) and the fallback changed nothing.

    Timed before the fidelity fallback, which then works on the plan that will be kept: on a
    PP-PicoDet whose every conv feeds a HardSwish the fallback spent 47 s of a 108 s run on
    layers the speed check then kept float. The second timing: a small MobileNetV3 timed 1.08×
    float in the check and 1.16–1.34× float when timed alone afterwards, so a plan inside the
    noise margin was kept slower than float.
    """
    if not config.speed_check:
        return SpeedChoice(first, replan), []
    if config.lowest_bits < 8:
        return SpeedChoice(first, replan), [_SIMULATED_NOTE.format(bits=config.lowest_bits)]
    one = _one_sample(float_model, sample)
    float_ms, first_ms = speed.compare([float_model, first.model], one)
    if first_ms <= float_ms:
        return SpeedChoice(first, replan, float_ms, first_ms), []
    lighter_replan = functools.partial(replan, float_neighbours=True)
    candidates = [("the model", first, replan)]
    lighter = lighter_replan(keep_float=first.plan.kept_float)
    label, lighter_model, notes = _lighter_candidate(first, lighter, build)
    if lighter_model is not None:
        candidates.append((label, lighter_model, lighter_replan))
        float_ms, *times = speed.compare([float_model, *(c.model for _, c, _ in candidates)], one)
    else:
        times = [first_ms]
    timed = list(zip(candidates, times, strict=True))
    fastest = min(timed, key=lambda item: item[1])
    clearly_faster = fastest if fastest[1] < SPEED_MARGIN * times[0] else timed[0]
    (label, chosen, chosen_replan), chosen_ms = next(
        (item for item in timed if item[1] <= float_ms), clearly_faster
    )
    listed = ", ".join(f"{label} {ms:.2f} ms" for (label, _, _), ms in timed)
    notes.insert(0, f"speed at batch 1: float {float_ms:.2f} ms, {listed}")
    slower = chosen_ms > float_ms >= FLOAT_ONLY_MIN_MS
    if slower and fastest[1] * SPEED_MARGIN > float_ms:  # every plan clearly slower
        return SpeedChoice(chosen, chosen_replan, float_ms, chosen_ms, label, timed), notes
    if slower and chosen.plan.quantized_nodes:  # within the noise margin: timed again after the fallback
        return SpeedChoice(chosen, chosen_replan, float_ms, chosen_ms, label, timed), notes
    if chosen is not first:
        notes.append(f"speed: kept {label} ({chosen_ms:.2f} ms)")
    return SpeedChoice(chosen, chosen_replan, float_ms, chosen_ms, label), notes


def _lighter_candidate(
    first: Candidate, lighter: QuantPlan, build: Build
) -> tuple[str, Candidate | None, list[str]]:
    """The lighter plan's label and model: None where it keeps no more layers float than the
    first, or runs no integer kernel (with a note saying so)."""
    kept = len(first.plan.layers) - len(lighter.layers)
    layers = "layer that feeds an op" if kept == 1 else f"{kept} layers that feed ops"
    label = f"the model with the {layers} without integer kernels kept float"
    if not kept:
        return label, None, []
    model = build(lighter)
    if lighter.quantized_nodes and not count_kernels(model.model).integer:
        return label, None, [_NO_INTEGER_KERNEL.format(label=label, nodes=len(lighter.quantized_nodes))]
    return label, model, []


def keep_fallback(
    float_model: onnx.ModelProto,
    tuned: Candidate,
    base: SpeedChoice,
    sample: Batch,
    replan: Replan,
    build: Build,
) -> tuple[SpeedChoice, list[str]]:
    """`tuned` (the fidelity fallback's model, built from `base`) and its timing, unless its
    float layers made it slower than float where `base` ran at float speed, or clearly slower
    than `base` where that ran slower than float already (a sub-millisecond model): then `base`.
    Layers the fallback keeps float break integer chains: on a MobileNetV3 they added Q/DQ pairs
    and layout Transposes that made it run 1.96× float, against 1.23× without them.

    Where `base` ran slower than float within the noise margin, `tuned` is timed again, alone
    with float, and nothing is quantized if it is slower again: the fallback's float layers can
    make a model faster too (PP-OCRv4's detector, 1.10× float before its fallback kept its
    640×640 stem convs float, 0.72× after)."""
    if base.float_ms is None or base.ms is None:
        return dataclasses.replace(base, candidate=tuned), []
    one = _one_sample(float_model, sample)
    if base.timed_again is not None:
        return _timed_again(float_model, tuned, base, one, replan, build)
    if tuned is base.candidate:
        return base, []
    if base.ms <= base.float_ms:  # at float speed: the fallback must keep it there
        float_ms, tuned_ms = speed.compare([float_model, tuned.model], one)
        timed = f"float {float_ms:.2f} ms, the model {tuned_ms:.2f} ms"
        if tuned_ms <= float_ms:
            return dataclasses.replace(base, candidate=tuned, float_ms=float_ms, ms=tuned_ms), [
                f"speed with the fidelity fallback's float layers: {timed}"
            ]
        taken = f"fidelity: the layers kept float made the model slower than float ({timed}): taken back"
        return base, [taken]
    float_ms, tuned_ms, base_ms = speed.compare([float_model, tuned.model, base.candidate.model], one)
    timed = f"float {float_ms:.2f} ms, the model {tuned_ms:.2f} ms, without its float layers {base_ms:.2f} ms"
    if base_ms >= SPEED_MARGIN * tuned_ms:  # not clearly faster without them: they stay
        return dataclasses.replace(base, candidate=tuned, float_ms=float_ms, ms=tuned_ms), [
            f"speed with the fidelity fallback's float layers: {timed}"
        ]
    taken = f"fidelity: the layers kept float made the model clearly slower ({timed}): taken back"
    return dataclasses.replace(base, float_ms=float_ms, ms=base_ms), [taken]


def _timed_again(
    float_model: onnx.ModelProto,
    tuned: Candidate,
    base: SpeedChoice,
    one: Batch,
    replan: Replan,
    build: Build,
) -> tuple[SpeedChoice, list[str]]:
    """`tuned` timed a second time, alone with float: kept at float speed, otherwise nothing is
    quantized (a small MobileNetV3 timed 1.08× float in the check and 1.16–1.34× when timed
    alone afterwards). Where every plan ran clearly slower and the fallback changed nothing,
    nothing is quantized without timing it again."""
    if tuned is base.candidate and base.clearly_slower:
        how = f"the fastest {base.fastest_ms / base.float_ms:.2f}× float at batch 1"
        notes: list[str] = []
        return SpeedChoice(
            _nothing_quantized(base.timed_again, tuned, replan, build, notes, how), replan
        ), notes
    label = (
        base.label if tuned is base.candidate else f"{base.label} and the fidelity fallback's float layers"
    )
    float_ms, tuned_ms = speed.compare([float_model, tuned.model], one)
    notes = [f"speed: timed again: float {float_ms:.2f} ms, {label} {tuned_ms:.2f} ms"]
    if tuned_ms > float_ms:
        how = f"{label} {base.ms / base.float_ms:.2f}× and {tuned_ms / float_ms:.2f}× float at batch 1"
        left_float = _nothing_quantized(base.timed_again, base.candidate, replan, build, notes, how)
        return SpeedChoice(left_float, replan), notes
    if base.label != "the model":
        notes.append(f"speed: kept {base.label} ({tuned_ms:.2f} ms)")
    return dataclasses.replace(base, candidate=tuned, float_ms=float_ms, ms=tuned_ms, timed_again=None), notes


def speed_warnings(final: SpeedChoice) -> list[str]:
    """What the saved model's timing says: nothing quantized, or slower than float."""
    if final.float_ms is None or final.ms is None:
        return []  # not timed, or already left float with its own warning
    if not final.candidate.plan.quantized_nodes:
        return [
            "warning: nothing is quantized: every integer layer feeds an op without an integer "
            "kernel, and the Q/DQ pairs around those made the model slower than float on this CPU; "
            f"{_SAVED_FLOAT} (--no-speed-check quantizes anyway)"
        ]
    if final.ms > final.float_ms:
        return [
            f"warning: the quantized model runs {final.ms / final.float_ms:.2f}× slower than float on "
            f"this CPU ({final.ms:.2f} against {final.float_ms:.2f} ms at batch 1): Q/DQ pairs and "
            "layout changes around ops without integer kernels cost more than the integer layers save"
        ]
    return []


def _one_sample(float_model: onnx.ModelProto, sample: Batch) -> Batch:
    return sample if fixed_batch(float_model) else {k: v[:1] for k, v in sample.items()}


def _nothing_quantized(
    timed: list, chosen: Candidate, replan: Replan, build: Build, notes: list[str], how: str
) -> Candidate:
    """Every layer any timed plan quantized kept float, with the warning saying why (`how`: the
    timings that showed it). A lighter plan's float layers are float only because it was planned
    so, and would be quantized again by a plan that lists its own; and a plan whose other layers
    are all float quantizes what it would not otherwise (a detector head's last convs, which
    stay float only beside integer layers, read tensors nobody observed): those are kept float
    too, until the plan quantizes nothing."""
    notes.append(
        f"warning: nothing is quantized: every quantized plan ran slower than float on this CPU "
        f"({how}): its integer kernels gain less than the Q/DQ pairs cost on this model; "
        f"{_SAVED_FLOAT} (--no-speed-check quantizes anyway)"
    )
    quantized = [node for (_, candidate, _), _ in timed for node in candidate.plan.quantized_nodes]
    everything = {**chosen.plan.kept_float, **dict.fromkeys(quantized, FLOAT_IS_FASTER)}
    plan = replan(keep_float=everything)
    while plan.quantized_nodes:  # each round keeps more nodes float, so it ends
        everything.update(dict.fromkeys(plan.quantized_nodes, FLOAT_IS_FASTER))
        plan = replan(keep_float=everything)
    return build(plan)
