"""Batch-1 latency of models in onnxruntime, measured side by side (the machine may be busy).

Each model runs in blocks, round after round, so a burst of load elsewhere hits them all alike;
compare the figures as ratios within one call.

A model's figure is a low percentile of its timed runs (QUIET_PERCENTILE), not their median:
what a deployed model sees on a core of its own, not what load elsewhere on a shared machine
adds. Load does not slow every model alike: on this project's shared 2-core machine a QDQ
classifier's block medians ran 1.7–1.9× its float model's in the quietest rounds and 1.1× in
the busiest (correlation −0.91 over 60 rounds), so medians timed it anywhere from 1.08× to 1.62×
float from one call to the next and the speed check kept it or not by chance; the 10th
percentile of the same 60 rounds' runs gave 1.69×, and of four speed checks 1.42–1.60×. A busy
spell longer than the whole check still compresses the ratios (a fifth check: 1.14×).

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
QUIET_PERCENTILE = 10  # of a model's timed runs: its speed without load from elsewhere
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
    """Milliseconds per run of each open session (QUIET_PERCENTILE of its timed runs), in blocks
    round after round; no round starts once `seconds` per session have passed."""
    rounds, seconds = rounds or ROUNDS, seconds or SECONDS
    for runner in sessions:  # warm-up: first runs allocate and pick kernels
        run(runner, feed)
    times: list[list[float]] = [[] for _ in sessions]
    started = clock()
    for _ in range(rounds):
        for runner, spent in zip(sessions, times, strict=True):
            spent += _block(runner, feed)
        if clock() - started > seconds * len(sessions):
            break
    return [1e3 * float(np.percentile(spent, QUIET_PERCENTILE)) for spent in times]


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
