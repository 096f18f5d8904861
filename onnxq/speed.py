"""Batch-1 latency of models in onnxruntime, measured side by side (the machine may be busy).

Each model runs in blocks, round after round, so a burst of load elsewhere hits them all alike;
compare the figures as ratios within one call.

Figures come from the quieter half of the rounds, paired: the rounds in which the first model's
block median was at or below its median over rounds; there, the first model's figure is its
median block, every other model's that times the median of its block's ratio to the first's.
Load elsewhere on a shared machine does not slow every model alike: on this project's 2-core VM
a QDQ classifier's blocks ran 1.7–1.9× its float model's in the quietest rounds and 1.1× in the
busiest (correlation −0.91 over 60 rounds), so medians of all runs timed it anywhere from 1.08×
to 1.62× float from call to call and the speed check's choice followed the load. Over windows of
the check's length taken from 60 recorded rounds, the quieter half's paired ratio varied
0.09 (sd) around 1.42× for it, against 0.16 for the 10th percentile of all runs (tried first:
on an 85 ms detector it sees 10 runs per model, and whichever model caught a quiet spell won).

Blocks, not single runs: onnxruntime's pool threads spin for a while after a run ends, so a
model run right after another session's run competes with that session's spinning threads.
Alternating single runs timed yolov8n's float model at 10.5 ms against 6.2 ms alone, and made
a quantized model that is no faster look 30 % faster. The runs in a block's first
SETTLE_SECONDS are not timed; the rest see what a deployed model sees: its session alone.
"""

from __future__ import annotations

import time

import numpy as np
import onnx

from onnxq.io import run, session

ROUNDS = 12  # at most; SECONDS ends the rounds of all but tiny models sooner
BLOCK_SECONDS = 0.3  # each model runs about this long per round
SETTLE_SECONDS = 0.1  # the previous session's threads stop spinning within this (measured: about 70 ms)
MAX_RUNS = 30  # timed runs per block; tiny models stop early
SECONDS = 1.5  # per model: no round starts once this much has passed (slow models: one round)
clock = time.perf_counter  # a module attribute, so that tests can drive the timing with a fake clock


def compare(
    models: list[onnx.ModelProto],
    feed: dict[str, np.ndarray],
    *,
    threads: int = 0,
    rounds: int | None = None,
    seconds: float | None = None,
) -> list[float]:
    """Milliseconds per run of each model on `feed` (see compare_sessions), at onnxruntime's default level
    (rounds and seconds: ROUNDS and SECONDS unless given)."""
    return compare_sessions(
        [session(model, threads=threads, spin=True) for model in models], feed, rounds, seconds
    )


def compare_sessions(
    sessions: list, feed: dict[str, np.ndarray], rounds: int | None = None, seconds: float | None = None
) -> list[float]:
    """Milliseconds per run of each open session (from the quieter half of the rounds, paired;
    see the module's docstring), in blocks round after round; no round starts once `seconds`
    per session have passed."""
    rounds, seconds = rounds or ROUNDS, seconds or SECONDS
    for runner in sessions:  # warm-up: first runs allocate and pick kernels
        run(runner, feed)
    medians: list[list[float]] = []  # per round, each session's block median
    started = clock()
    for _ in range(rounds):
        medians.append([float(np.median(_block(runner, feed))) for runner in sessions])
        if clock() - started > seconds * len(sessions):
            break
    return quiet_paired_ms(np.asarray(medians))


def quiet_paired_ms(medians: np.ndarray) -> list[float]:
    """Milliseconds per run from block medians (rounds × models): over the rounds in which the
    first model ran at or below its median, its median block and the others' paired ratios."""
    quiet = medians[medians[:, 0] <= np.median(medians[:, 0])]
    first = float(np.median(quiet[:, 0]))
    ratios = np.median(quiet / np.maximum(quiet[:, :1], 1e-12), axis=0)
    return [1e3 * first * float(ratio) for ratio in ratios]


def _block(runner, feed: dict[str, np.ndarray]) -> list[float]:
    """Seconds per run of the runs that start once the block has settled (at least one)."""
    started = clock()
    timed: list[float] = []
    while True:
        begin = clock()
        run(runner, feed)
        end = clock()
        if begin - started >= SETTLE_SECONDS:
            timed.append(end - begin)
        if timed and (end - started >= BLOCK_SECONDS or len(timed) >= MAX_RUNS):
            return timed
