"""Batch-1 latency of models in onnxruntime, measured side by side (the machine may be busy).

Runs alternate between the models, round after round, and each model's median is kept, so a
burst of load elsewhere hits them all alike; compare the figures as ratios within one call.
"""

from __future__ import annotations

import time

import numpy as np
import onnx

from onnxq.io import run, session

ROUNDS = 15
SECONDS = 3.0  # stop earlier once every model has run this long in all


def compare(models: list[onnx.ModelProto], feed: dict[str, np.ndarray]) -> list[float]:
    """Median milliseconds per run of each model on `feed`, at onnxruntime's default level."""
    sessions = [session(model) for model in models]
    for runner in sessions:  # warm-up: first runs allocate and pick kernels
        run(runner, feed)
    times: list[list[float]] = [[] for _ in sessions]
    started = time.perf_counter()
    for _ in range(ROUNDS):
        for runner, spent in zip(sessions, times, strict=True):
            begin = time.perf_counter()
            run(runner, feed)
            spent.append(time.perf_counter() - begin)
        if time.perf_counter() - started > SECONDS * len(sessions):
            break
    return [1e3 * float(np.median(spent)) for spent in times]
