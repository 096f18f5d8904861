"""Batch-1 latency of models in onnxruntime, measured side by side (the machine may be busy).

Each model runs in blocks, round after round, and each model's median is kept, so a burst of
load elsewhere hits them all alike; compare the figures as ratios within one call.

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

ROUNDS = 4
BLOCK_SECONDS = 0.3  # each model runs about this long per round
SETTLE_SECONDS = 0.1  # the previous session's threads stop spinning within this (measured: about 70 ms)
MAX_RUNS = 30  # timed runs per block: enough for a median; tiny models stop early
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
    """Median milliseconds per run of each model on `feed`, at onnxruntime's default level
    (rounds and seconds: ROUNDS and SECONDS unless given)."""
    return compare_sessions(
        [session(model, threads=threads, spin=True) for model in models], feed, rounds, seconds
    )


def compare_sessions(
    sessions: list, feed: dict[str, np.ndarray], rounds: int | None = None, seconds: float | None = None
) -> list[float]:
    """Median milliseconds per run of each open session, in blocks round after round; no round
    starts once `seconds` per session have passed."""
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
    return [1e3 * float(np.median(spent)) for spent in times]


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
