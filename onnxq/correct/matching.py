"""Optimise model inputs so that the statistics they produce match the BatchNorm ones.

The loss at every tensor with kept statistics is the squared gap of its per-channel mean and
standard deviation (over the batch and spatial positions) to BatchNorm's, divided by the
channels' mean variance so that every layer weighs the same whatever its scale (PD-Quant's DC,
ZeroQ's BN loss). Correction adds λ·the inputs' mean squared change over their mean square, which
keeps the images what they were; synthesis starts from unit Gaussian noise and has no such term.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import onnx
import torch

from onnxq.errors import OnnxqError
from onnxq.memory import heap_allocations
from onnxq.passes.fold_bn import ChannelStatistics
from onnxq.progress import Progress, Silent
from onnxq.refine.mirror import Mirror

MEMORY_BUDGET = 1.5e9  # bytes of mirror activations at once; larger batches run in micro-batches
BYTES_PER_ELEMENT = 8  # per float the mirror produces: kept for backward, and the loss's temporaries


@dataclass(frozen=True)
class MatchSettings:
    """Defaults follow PD-Quant's DC and ZeroQ where they give them, scaled to few steps."""

    steps: int = 50
    batch: int = 64  # samples whose statistics are matched together
    lr: float = 0.01  # Adam, on inputs of roughly unit scale (correction)
    closeness: float = 1.0  # λ of the change-of-input term (correction only)
    synthesis_lr: float = 0.1
    synthesis_steps: int = 200
    seed: int = 0
    threads: int | None = None
    time_budget: float | None = None  # seconds for all batches; steps stop early when it runs out


@dataclass
class MatchReport:
    """The statistics loss before and after, over all batches, and the inputs' relative change."""

    tensors: int
    before: float
    after: float
    change: float = 0.0
    seconds: float = 0.0

    def note(self, what: str) -> str:
        moved = f"; inputs moved by {100 * self.change:.1f} % of their RMS" if self.change else ""
        return (
            f"{what}: BatchNorm-statistics loss {self.before:.4g} → {self.after:.4g} over "
            f"{self.tensors} tensors{moved}"
        )


def statistics_loss(
    values: dict[str, torch.Tensor], statistics: dict[str, ChannelStatistics], per_sample: bool = False
) -> torch.Tensor:
    """Mean over tensors of (|μ − μ_BN|² + |σ − σ_BN|²) / mean(σ_BN²), per channel on axis 1.
    `per_sample`: μ and σ of each sample over its positions, the gaps averaged over samples
    (PD-Quant's DC); a tensor without positions ([N, C]) keeps the batch's."""
    means, stds = {}, {}
    for name in statistics:
        value = values[name]
        axes = _reduced_axes(value, per_sample)
        means[name] = value.mean(dim=axes)
        stds[name] = (value.var(dim=axes, unbiased=False) + 1e-8).sqrt()
    return _gap(means, stds, statistics)


def _gap(means: dict, stds: dict, statistics: dict[str, ChannelStatistics]) -> torch.Tensor:
    terms = []
    for name, stats in statistics.items():
        mean, std = means[name], stds[name]
        target_mean = torch.as_tensor(stats.mean, dtype=mean.dtype, device=mean.device)
        target_var = torch.as_tensor(stats.var, dtype=mean.dtype, device=mean.device)
        gap = (mean - target_mean).pow(2).mean() + (std - target_var.sqrt()).pow(2).mean()
        terms.append(gap / target_var.mean().clamp_min(1e-12))
    return torch.stack(terms).mean()


def _reduced_axes(value: torch.Tensor, per_sample: bool = False) -> list[int]:
    kept = (0, 1) if per_sample and value.ndim > 2 else (1,)
    return [a for a in range(value.ndim) if a not in kept]


class _StatisticsRun:
    """The float mirror run just far enough to produce every tensor with statistics.

    A batch whose activations would take more than MEMORY_BUDGET runs in micro-batches: the
    per-channel sums over the whole batch first (no gradient), then, per micro-batch, a
    surrogate linear in that micro-batch's sums whose gradient is the exact gradient of the
    whole batch's loss (chain rule through the mean and the mean square). The statistics stay
    those of the whole batch; only the peak memory changes (MobileNetV2 at 224×224: about
    100 MB per sample, 7.4 GB for 64 samples in one piece).
    """

    def __init__(self, model: onnx.ModelProto, statistics: dict[str, ChannelStatistics]) -> None:
        self.mirror = Mirror(model)
        self.mirror.requires_grad_(False)
        produced = {o: i for i, node in enumerate(self.mirror.nodes) for o in node.outputs}
        self.statistics = {name: s for name, s in statistics.items() if name in produced}
        self.end = 1 + max((produced[name] for name in self.statistics), default=-1)
        self.input = self.mirror.graph_inputs[0]
        self.unit = self.mirror.fixed_batch or 1  # the mirror's smallest run: its fixed batch, or one
        self.elements_per_sample: int | None = None

    def micro_batch(self, inputs: torch.Tensor) -> int:
        """Samples per piece: as many as MEMORY_BUDGET holds, in whole runs of the model's fixed
        batch where its input fixes one (its export may bake that batch into shapes), at least
        one run."""
        if self.elements_per_sample is None:
            produced = {o for node in self.mirror.nodes[: self.end] for o in node.outputs if o}
            with torch.no_grad():
                env = self.mirror.run(
                    {self.input: inputs[: self.unit]}, 0, self.end, quantized=False, keep=produced
                )
            elements = sum(
                v.numel() for name, v in env.items() if name in produced and isinstance(v, torch.Tensor)
            )
            self.elements_per_sample = elements // self.unit
        return self.whole_runs(int(MEMORY_BUDGET // (BYTES_PER_ELEMENT * max(self.elements_per_sample, 1))))

    def whole_runs(self, samples: int) -> int:
        """`samples` rounded down to whole runs of the model's fixed batch (at least one run)."""
        return max(self.unit, samples // self.unit * self.unit)

    def loss(self, inputs: torch.Tensor) -> float:
        """The statistics loss of the whole batch (no gradient)."""
        with torch.no_grad():
            if len(inputs) <= self.micro_batch(inputs):
                return float(statistics_loss(self._values(inputs), self.statistics))
            moments, _ = self._moments(inputs)
            return float(self._moment_loss(moments))

    def backward(self, inputs: torch.Tensor) -> float:
        """The whole batch's loss; its gradient is accumulated into `inputs.grad`."""
        if len(inputs) <= self.micro_batch(inputs):
            loss = statistics_loss(self._values(inputs), self.statistics)
            loss.backward()
            return float(loss.detach())
        with torch.no_grad():
            moments, counts = self._moments(inputs)
        leaves = {name: [m.clone().requires_grad_(True) for m in pair] for name, pair in moments.items()}
        loss = self._moment_loss(leaves)
        loss.backward()
        for part in _slices(len(inputs), self.micro_batch(inputs)):
            env = self._values(inputs[part])
            surrogate = torch.zeros(())
            for name, (mean, square) in leaves.items():
                value, axes = env[name], _reduced_axes(env[name])
                first = (mean.grad.float() * value.sum(dim=axes)).sum()
                second = (square.grad.float() * value.pow(2).sum(dim=axes)).sum()
                surrogate = surrogate + (first + second) / counts[name]
            surrogate.backward()
        return float(loss.detach())

    def _values(self, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.mirror.run({self.input: inputs}, 0, self.end, quantized=False, keep=self.statistics)

    def _moments(self, inputs: torch.Tensor) -> tuple[dict[str, list[torch.Tensor]], dict[str, int]]:
        """Per-channel mean and mean square of every tensor with statistics over all of `inputs`
        (summed in float64 micro-batch by micro-batch), and each channel's count of values."""
        sums: dict[str, tuple] = {}
        counts: dict[str, int] = {}
        for part in _slices(len(inputs), self.micro_batch(inputs)):
            env = self._values(inputs[part])
            for name in self.statistics:
                value, axes = env[name], _reduced_axes(env[name])
                total, squares = sums.get(name, (0.0, 0.0))
                total = total + value.sum(dim=axes).double()
                sums[name] = (total, squares + value.pow(2).sum(dim=axes).double())
                counts[name] = counts.get(name, 0) + value.numel() // value.shape[1]
        return {name: [m / counts[name] for m in pair] for name, pair in sums.items()}, counts

    def _moment_loss(self, moments: dict[str, list[torch.Tensor]]) -> torch.Tensor:
        means = {name: mean for name, (mean, _) in moments.items()}
        variances = {name: (square - mean.pow(2)).clamp_min(0) for name, (mean, square) in moments.items()}
        stds = {name: (variance + 1e-8).sqrt() for name, variance in variances.items()}
        return _gap(means, stds, self.statistics)


def correct_distribution(
    model: onnx.ModelProto,
    statistics: dict[str, ChannelStatistics],
    data: dict[str, np.ndarray],
    settings: MatchSettings | None = None,
    progress: Progress | None = None,
) -> tuple[dict[str, np.ndarray], MatchReport]:
    """The calibration inputs nudged towards the BatchNorm statistics (a single float input)."""
    settings = settings or MatchSettings()
    run = _prepare(model, statistics, settings)
    name = run.input
    original = data[name]
    corrected = np.empty_like(original)
    before = after = change = 0.0
    batches = _slices(len(original), run.whole_runs(settings.batch))
    started = time.perf_counter()
    (progress or Silent()).stage("distribution correction", total=len(batches) * settings.steps)
    for index, part in enumerate(batches):
        start = torch.from_numpy(np.ascontiguousarray(original[part], np.float32))
        scale = start.pow(2).mean().clamp_min(1e-12)
        first, last, result = _optimise(
            run,
            start.clone(),
            settings.lr,
            settings.steps,
            lambda x, start=start, scale=scale: settings.closeness * (x - start).pow(2).mean() / scale,
            progress,
            index * settings.steps,
            _share(settings.time_budget, len(batches)),
        )
        corrected[part] = result.numpy().astype(original.dtype)
        weight = (part.stop - part.start) / len(original)
        before += weight * first
        after += weight * last
        change += weight * float(((result - start).pow(2).mean() / scale).sqrt())
    seconds = time.perf_counter() - started
    return {**data, name: corrected}, MatchReport(len(run.statistics), before, after, change, seconds)


def synthesize(
    model: onnx.ModelProto,
    statistics: dict[str, ChannelStatistics],
    shape: tuple[int, ...],
    count: int,
    settings: MatchSettings | None = None,
    progress: Progress | None = None,
) -> tuple[dict[str, np.ndarray], MatchReport]:
    """`count` inputs of `shape` (one sample's) synthesised from noise by the statistics alone."""
    settings = settings or MatchSettings()
    run = _prepare(model, statistics, settings)
    generator = torch.Generator().manual_seed(settings.seed)
    batches = _slices(count, run.whole_runs(settings.batch))
    (progress or Silent()).stage("synthesise calibration data", total=len(batches) * settings.synthesis_steps)
    parts, before, after = [], 0.0, 0.0
    started = time.perf_counter()
    for index, part in enumerate(batches):
        noise = torch.randn((part.stop - part.start, *shape), generator=generator)
        first, last, result = _optimise(
            run,
            noise,
            settings.synthesis_lr,
            settings.synthesis_steps,
            None,
            progress,
            index * settings.synthesis_steps,
            _share(settings.time_budget, len(batches)),
        )
        parts.append(result.numpy())
        weight = (part.stop - part.start) / count
        before, after = before + weight * first, after + weight * last
    report = MatchReport(len(run.statistics), before, after, seconds=time.perf_counter() - started)
    return {run.input: np.concatenate(parts)}, report


def _prepare(model, statistics, settings: MatchSettings) -> _StatisticsRun:
    if settings.threads:
        torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    run = _StatisticsRun(model, statistics)
    if not run.statistics:
        raise OnnxqError("no tensor of the model has BatchNorm statistics")
    return run


def _share(budget: float | None, parts: int) -> float | None:
    return None if budget is None else budget / parts


def _optimise(run: _StatisticsRun, inputs, lr, steps, penalty, progress, done, seconds=None):
    """Adam on `inputs` for `steps` or `seconds`, whichever ends first; (loss before, after, inputs)."""
    inputs = inputs.clone().requires_grad_(True)
    optimiser = torch.optim.Adam([inputs], lr=lr)
    first = run.loss(inputs)
    deadline = None if seconds is None else time.perf_counter() + seconds
    with heap_allocations():  # each step's activations reused, not faulted in afresh
        for step in range(steps):
            if deadline is not None and step and time.perf_counter() > deadline:
                break
            optimiser.zero_grad(set_to_none=True)
            loss = run.backward(inputs)
            if penalty is not None:
                penalty(inputs).backward()
            optimiser.step()
            if progress is not None and step % 10 == 0:
                progress.advance(done + step)
                progress.status(f"loss {loss:.4g}")
    last = run.loss(inputs)
    return first, last, inputs.detach()


def _slices(count: int, batch: int) -> list[slice]:
    return [slice(start, min(start + batch, count)) for start in range(0, count, batch)]
