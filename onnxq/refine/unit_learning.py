"""One unit's learning: its weight rounding and activation steps by gradient, towards its loss.

A unit learns from its quantized inputs mixed with the float ones by QDrop, towards the float
model's tensors at its far cut (mse/mae) or the float model's prediction (pd: the rest of the
network run in float from its outputs), under its share of the time budget and of the memory.
A unit whose loss ends no lower than it started, on the calibration samples in eval mode, goes
back to its start.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

from onnxq.progress import Progress
from onnxq.refine import fused
from onnxq.refine.losses import PD_FEATURE_WEIGHT, PD_TEMPERATURE, prediction_difference, reconstruction
from onnxq.refine.memory_plan import chunk_within, saved_bytes
from onnxq.refine.mirror import Env
from onnxq.refine.quantizers import blend, random_mask

EVAL_SAMPLES = 256  # samples the before/after loss of a unit is measured on
RUN_BATCH = 64  # samples per run when a unit's outputs are computed for all samples
# Under a time budget a unit's count follows its timed iterations: the first is left out of the
# timing (it compiles the fake quantizers for the unit's shapes: 4-5 s against 0.7 s for the
# next ones on MobileNetV2's first unit), the next PROBE_ITERATIONS are timed.
WARMUP_ITERATIONS = 1
PROBE_ITERATIONS = 3


@dataclass(frozen=True)
class RefineSettings:
    """How refinement learns; the defaults follow BRECQ/QDrop where the papers give them."""

    unit: str = "block"
    loss: str = "pd"
    iterations: int = 500  # per unit
    batch: int = 32
    qdrop: float = 0.5  # QDrop's probability of keeping an activation float while learning
    time_budget: float | None = None  # seconds for all units together
    seed: int = 0
    threads: int | None = None
    device: str = "cpu"
    compiled: bool = True  # the fake quantizers' learning passes compiled where torch can (fused.py)
    weight_lr: float = 1e-2  # Adam step on the rounding logits (AdaRound: 1e-3 over 20k iterations)
    affine_lr: float = 1e-3  # Adam step on QPRep's per-channel γ and β, where enabled
    step_lr: float = 4e-4  # Adam step on activation scales (QDrop: 4e-5 over 20k iterations)
    rounding_weight: float = 0.01  # λ of the rounding regulariser
    warmup: float = 0.2  # part of the iterations before the regulariser starts
    beta: tuple[float, float] = (20.0, 2.0)  # the regulariser's exponent, annealed
    # Bytes of activations pd's float remainder may keep for the backward pass per batch. Beyond
    # it, the remainder is recomputed block by block in the backward pass: one more forward pass
    # of it per iteration (MobileNetV2 at 224×224, batch 32, peaked at 5.1 GiB without this).
    remainder_memory: float = 1e9
    # Under a time budget, a unit whose whole batch would not reach `iterations` in its share
    # takes pd's KL term on this many samples of each learning pass (None: never): the float
    # remainder, most of an early unit's cost, runs on them only, the feature term on them all.
    pd_samples: int | None = None
    # Bytes of activations refinement may hold (memory_plan.py): every sample's tensors at a
    # unit's cuts (beyond it, the first samples that fit), and again one learning pass's kept
    # for its backward pass (beyond it, the batch learns in chunks: the same gradients, slower).
    memory: float = 2e9


@dataclass
class UnitReport:
    name: str
    iterations: int = 0
    before: float = float("nan")
    after: float = float("nan")
    skipped: str = ""  # why it was not refined
    reverted: bool = False
    loss: str = ""  # the loss it learned with (pd falls back to mse without class scores)
    batch: int = 0  # samples per iteration
    chunk: int = 0  # samples per learning pass, fewer than `batch` where `memory` binds
    pd_samples: int | None = None  # samples pd's KL term took where the budget narrowed it
    corrected: tuple[float, float, float] | None = None  # DC's statistics loss before, after; change


class Batches:
    """All samples of the tensors alive at a cut; tensors without a batch axis are kept once."""

    def __init__(self, values: Env, count: int) -> None:
        self.values, self.count = values, count

    def take(self, index: torch.Tensor | slice) -> Env:
        return {k: (v[index] if has_batch_axis(v, self.count) else v) for k, v in self.values.items()}


def has_batch_axis(value: torch.Tensor, samples: int) -> bool:
    """Whether `value` holds one row per sample of a run of `samples` (shapes, constants do not)."""
    return value.dim() > 0 and value.shape[0] == samples


@dataclass(frozen=True)
class Draws:
    """The draws of one refinement, from its seed: the same seed gives the same file."""

    batches: torch.Generator  # which samples each iteration learns on
    masks: np.random.Generator  # QDrop's random masks (random_mask: numpy's bytes are cheaper)

    @classmethod
    def seeded(cls, seed: int) -> Draws:
        return cls(torch.Generator().manual_seed(seed), np.random.default_rng(seed))


class UnitJob:
    """One unit's learning: its parameters, its loss, its schedule."""

    def __init__(
        self, mirror, unit, settings, random: Draws, quantized, floating, targets, logits, segments
    ) -> None:
        self.mirror, self.unit, self.settings = mirror, unit, settings
        self.random = random
        self.segments = segments  # the later units' node ranges: the blocks of pd's remainder
        self.quantized, self.floating, self.targets, self.logits = quantized, floating, targets, logits
        self.loss = settings.loss if settings.loss != "pd" or logits is not None else "mse"
        nodes = mirror.nodes[unit.begin : unit.end]
        weight_names = {node.inputs[1] for node in nodes if node.name in unit.layers and len(node.inputs) > 1}
        self.weights = [
            mirror.rounding[mirror.weight_index[n]] for n in sorted(weight_names) if n in mirror.weight_index
        ]
        made = {name for node in nodes for name in node.outputs}
        indices = sorted({i for point, i in mirror.quant_points.items() if point in made})
        self.steps = [mirror.activation[i] for i in indices]
        self.outside = sorted({node.op_type for node in nodes if mirror.stops_gradient(node)})
        self.recompute = False  # whether pd's remainder is recomputed in the backward pass
        self.batch = min(settings.batch, quantized.count)  # samples per iteration
        self.chunk = self.batch  # samples per learning pass; fewer where `memory` binds
        self.learned = list(targets.values)  # reconstruct ran the unit for learned_tensors
        self.pd_samples: int | None = None  # pd's KL term on all samples until the budget binds

    def run(self, seconds: float | None, progress: Progress) -> UnitReport:
        report = UnitReport(self.unit.describe(self.mirror), loss=self.loss)
        if not self.weights and not self.steps:
            report.skipped = "nothing to learn"
            return report
        if self.outside:
            report.skipped = f"{', '.join(self.outside)} runs in onnxruntime, without gradients"
            return report
        if not any(self.targets.values[name].is_floating_point() for name in self.learned):
            report.skipped = "its outputs are integers, with no gradient to learn from"
            return report
        began = time.monotonic()
        start = self._state()
        self._plan_memory()
        report.batch, report.chunk = self.batch, self.chunk
        evaluated = time.monotonic()
        report.before = self.evaluate()
        report.iterations = self._learn(self._learning_share(seconds, began, evaluated), progress)
        report.pd_samples = self.pd_samples
        report.after = self.evaluate()
        if not report.after < report.before:
            self._restore(start)
            report.after, report.reverted = report.before, True
        return report

    # ------------------------------------------------------------------------ learning

    def _learning_share(self, seconds: float | None, began: float, evaluated: float) -> float | None:
        """The unit's share of the budget left for learning. A unit's overheads (its memory
        plan, its evaluations before and after learning) come out of the units after it, whose
        shares are taken from the budget left, and out of the time early finishers leave. The
        last unit has none after it: it learns less what it spent before and a second evaluation
        like its first, or it overran --time-budget by its own (taking them from every unit
        instead starved MobileNetV2's first units and left the time unspent at the end)."""
        if seconds is None or self.segments:
            return seconds
        now = time.monotonic()
        return seconds - (now - began) - (now - evaluated)

    def _learn(self, seconds: float | None, progress: Progress) -> int:
        s = self.settings
        optimizer = torch.optim.Adam(self._parameter_groups())
        total, done, began, probe_began = s.iterations, 0, time.monotonic(), 0.0
        probe = WARMUP_ITERATIONS  # where the timed iterations start
        with self._learning():
            while done < total:
                if seconds is not None and done == probe:
                    probe_began = time.monotonic()
                elif seconds is not None and done == probe + PROBE_ITERATIONS:
                    now = time.monotonic()
                    pace = (now - probe_began) / PROBE_ITERATIONS
                    total = iterations_within(seconds - (now - began), pace, done, s.iterations)
                    if total < s.iterations and self._narrows_pd():  # timed again on fewer samples
                        total, probe, probe_began = s.iterations, done, now
                optimizer.zero_grad(set_to_none=True)
                loss = self._batch_backward(self._rounding_penalty(done, total))
                optimizer.step()
                done += 1
                if done % 20 == 0 or done == total:
                    progress.advance(done)
                    progress.status(f"loss {loss:.4g}")
        return done

    def _parameter_groups(self) -> list[dict]:
        s = self.settings
        groups = []
        if self.weights:
            groups.append({"params": [w.logits for w in self.weights], "lr": s.weight_lr})
        if self.steps:
            groups.append({"params": [q.scale for q in self.steps], "lr": s.step_lr})
        if affine := self._affine_parameters():
            groups.append({"params": affine, "lr": s.affine_lr})
        return groups

    @contextlib.contextmanager
    def _learning(self) -> Iterator[None]:
        """Soft rounding, QDrop and gradients on the learned parameters, inside the `with`."""
        learned = self._learned()
        for parameter in learned:
            parameter.requires_grad_(True)
        self._train_mode(True)
        try:
            yield
        finally:
            self._train_mode(False)
            for parameter in learned:
                parameter.requires_grad_(False)

    def _train_mode(self, on: bool) -> None:
        for weight in self.weights:
            weight.soft = on
        for quantizer in self.steps:
            quantizer.drop = self.settings.qdrop if on else 0.0
            quantizer.random = self.random.masks
            quantizer.train(on)

    def _batch_backward(self, penalty: torch.Tensor) -> float:
        """One iteration's gradients: the loss of a random batch plus `penalty`, backward;
        returns the loss. Where the batch is learned in chunks, each chunk's loss is weighted
        by its share of the batch (every loss is a mean over samples), so the gradients add up
        to the whole batch's."""
        index = torch.randint(self.quantized.count, (self.batch,), generator=self.random.batches)
        if self.chunk >= self.batch:
            loss = self._chunk_loss(index) + penalty
            loss.backward()
            return loss.item()
        total = penalty.item()
        if penalty.requires_grad:
            penalty.backward()
        for chunk in index.split(self.chunk):
            loss = self._chunk_loss(chunk) * (len(chunk) / self.batch)
            loss.backward()
            total += loss.item()
        return total

    def _chunk_loss(self, index: torch.Tensor) -> torch.Tensor:
        """The loss on the samples `index`, their inputs mixed with the float ones by QDrop."""
        inputs = self.quantized.take(index)
        if self.settings.qdrop > 0:
            floating = self.floating.take(index)
            for name, value in inputs.items():
                if value.is_floating_point() and value.shape == floating[name].shape:
                    keep = random_mask(value, self.settings.qdrop, self.random.masks).to(value.device)
                    inputs[name] = blend(keep, floating[name], value)
        return self._loss(inputs, self.targets.take(index), index)

    def _loss(self, inputs: Env, targets: Env, index) -> torch.Tensor:
        unit = self.unit
        env = self.mirror.run(
            {k: inputs[k] for k in unit.inputs}, unit.begin, unit.end, quantized=True, keep=self.learned
        )
        outputs = [env[name] for name in self.learned]
        error = reconstruction(self.loss, outputs, [targets[name] for name in self.learned])
        if self.loss != "pd":
            return error
        kept, outputs = self._pd_part(index, {k: env[k] for k in unit.outputs})
        logits = self._remainder(outputs)[self.mirror.graph_outputs[0]]
        return prediction_difference(logits, self.logits[kept], PD_TEMPERATURE) + PD_FEATURE_WEIGHT * error

    def _narrows_pd(self) -> bool:
        """Whether pd's KL term moves to `pd_samples` of each pass (once: False after)."""
        samples = self.settings.pd_samples
        narrows = self.loss == "pd" and self.pd_samples is None and samples is not None
        if narrows and samples < self.chunk and not self.mirror.fixed_batch:
            self.pd_samples = samples
            return True
        return False

    def _pd_part(self, index: torch.Tensor, outputs: Env) -> tuple[torch.Tensor, Env]:
        """The samples pd's KL term is taken on while learning: the first `pd_samples` of the
        pass (the batch is drawn at random) where the budget narrowed it, else all of them."""
        samples = self.pd_samples
        if not torch.is_grad_enabled() or samples is None or samples >= len(index):
            return index, outputs
        cut = {k: v[:samples] if has_batch_axis(v, len(index)) else v for k, v in outputs.items()}
        return index[:samples], cut

    def _remainder(self, env: Env) -> Env:
        """The rest of the network in float, from the unit's outputs; under autograd and over
        `remainder_memory`, only the tensors at block cuts are kept and each block is recomputed
        when the backward pass reaches it (gradient checkpointing)."""
        if torch.is_grad_enabled() and len(self.segments) > 1 and self.recompute:
            for begin, end in self.segments:
                env = checkpoint(self._run_float, env, begin, end, use_reentrant=False)
            return env
        return self._run_float(env, self.unit.end, len(self.mirror.nodes))

    def _run_float(self, env: Env, begin: int, end: int) -> Env:
        return self.mirror.run(dict(env), begin, end, quantized=False)  # a copy: recomputing reads it again

    # ------------------------------------------------------------------------ memory

    def _plan_memory(self) -> None:
        """Whether pd's remainder is recomputed, and how many samples a learning pass takes,
        from what a pass keeps for its backward pass on one sample and on two."""
        step = self.mirror.fixed_batch or 1  # a fixed-batch model runs whole batches only
        if self.quantized.count < step:
            return
        with self._learning(), fused.compiled_kernels(False):  # eager: no compilation for a probe
            for quantizer in self.steps:
                quantizer.random = np.random.default_rng(0)  # the learning draws stay untouched
            one, (outputs, _) = saved_bytes(lambda: self._unit_pass(step))
            two = saved_bytes(lambda: self._unit_pass(2 * step))[0] if self.batch >= 2 * step else 2 * one
            if self.loss == "pd":
                remainder = self._remainder_bytes(outputs, step, self.batch)
                self.recompute = len(self.segments) > 1 and remainder > self.settings.remainder_memory
                if not self.recompute:  # kept for the backward pass too, per sample
                    one, two = one + remainder * step / self.batch, two + 2 * remainder * step / self.batch
        self.chunk = chunk_within(one, two, step, self.batch, self.settings.memory)

    def _unit_pass(self, samples: int) -> tuple[Env, torch.Tensor]:
        """The unit's outputs and its reconstruction error on the first `samples`."""
        index = torch.arange(samples)
        inputs, targets = self.quantized.take(index), self.targets.take(index)
        unit = self.unit
        env = self.mirror.run(
            {k: inputs[k] for k in unit.inputs}, unit.begin, unit.end, quantized=True, keep=self.learned
        )
        error = reconstruction(self.loss, [env[n] for n in self.learned], [targets[n] for n in self.learned])
        return {k: env[k] for k in unit.outputs}, error

    def _remainder_bytes(self, env: Env, samples: int, batch: int) -> float:
        """What the remainder saves for backward on a batch of `batch`, from a run on the
        `samples` samples of `env` (a learning pass's unit outputs); tensors without those
        samples (weights) count once."""
        saved = 0.0

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            nonlocal saved
            batched = tensor.dim() > 0 and tensor.shape[0] == samples
            saved += tensor.numel() * tensor.element_size() * (batch / samples if batched else 1)
            return tensor

        leaves = {k: v.detach().requires_grad_(v.is_floating_point()) for k, v in env.items()}
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            self._run_float(leaves, self.unit.end, len(self.mirror.nodes))
        return saved

    def _rounding_penalty(self, done: int, total: int) -> torch.Tensor:
        s = self.settings
        warm = int(s.warmup * total)
        if not self.weights or done < warm:
            return torch.zeros(())
        progress = (done - warm) / max(1, total - warm)
        beta = s.beta[1] + (s.beta[0] - s.beta[1]) * (1 - progress)
        penalty = sum(w.regulariser(beta) for w in self.weights)
        return s.rounding_weight * penalty

    # ------------------------------------------------------------------------ measuring

    @torch.no_grad()
    def evaluate(self) -> float:
        """The unit's loss in eval mode (hard rounding, no QDrop) on the first samples."""
        index = torch.arange(min(EVAL_SAMPLES, self.quantized.count))
        total, samples = 0.0, 0
        for chunk in index.split(min(RUN_BATCH, self.chunk)):  # a learning pass's memory
            loss = self._loss(self.quantized.take(chunk), self.targets.take(chunk), chunk)
            total, samples = total + loss.item() * len(chunk), samples + len(chunk)
        return total / samples

    def _affine_parameters(self) -> list[torch.nn.Parameter]:
        return [p for w in self.weights for p in w.affine_parameters()]

    def _learned(self) -> list[torch.nn.Parameter]:
        return [w.logits for w in self.weights] + [q.scale for q in self.steps] + self._affine_parameters()

    def _state(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self._learned()]

    @torch.no_grad()
    def _restore(self, state: list[torch.Tensor]) -> None:
        for parameter, value in zip(self._learned(), state, strict=True):
            parameter.copy_(value)


def iterations_within(left: float, pace: float, done: int, total: int) -> int:
    """A unit's iteration count under its share of the budget: those `done`, and as many more
    as the `left` seconds allow at `pace` seconds per iteration, never above `total`."""
    return max(done, min(total, done + int(max(left, 0.0) / max(pace, 1e-9))))
