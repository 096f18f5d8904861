"""Compare quantized models with their float original on the same data, as users deploy them.

Every model runs at onnxruntime's default optimization level, so integer kernels are used where
onnxruntime fuses them; the report says which kernels ran.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from onnxq import selections, speed
from onnxq.calib.data import DataSource, batches, first_batch, model_inputs
from onnxq.calib.frontier import count
from onnxq.class_scores import looks_like_scores, sorted_like_topk
from onnxq.comparison import OutputComparison, OutputFidelity
from onnxq.errors import OnnxqError
from onnxq.io import load_model, run, session
from onnxq.passes.batch_axis import add_batch_axis
from onnxq.preprocess import Preprocess
from onnxq.runtime_kernels import count_kernels


@dataclass(frozen=True)
class ModelReport:
    name: str
    samples: int
    top1: float | None
    agreement: float | None
    kl: float | None
    sqnr_db: float | None  # the lowest over the outputs and their parts (detector boxes, scores)
    size_bytes: int
    latency_ms: float
    kernels: str
    lowest_output: str | None = None  # which output (or part) that lowest SQNR is at


class _Scores:
    """Running sums for one model over streamed batches."""

    def __init__(self) -> None:
        self.correct = self.agree = self.count = 0
        self.kl = 0.0

    def add(self, logits: np.ndarray, reference: np.ndarray, labels: np.ndarray | None) -> None:
        logits, reference = logits.reshape(len(logits), -1), reference.reshape(len(reference), -1)
        predicted = logits.argmax(1)
        if labels is not None:
            self.correct += int((predicted == labels).sum())
        self.agree += int((predicted == reference.argmax(1)).sum())
        self.kl += float(kl_divergence(reference, logits).sum())
        self.count += len(logits)


def kl_divergence(reference_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """KL(p_ref || p) per sample between the softmaxes of two logit arrays."""
    log_p = _log_softmax(reference_logits.astype(np.float64))
    log_q = _log_softmax(logits.astype(np.float64))
    return (np.exp(log_p) * (log_p - log_q)).sum(axis=1)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def evaluate(
    float_model: str | os.PathLike,
    quantized: list[str | os.PathLike],
    data: DataSource,
    *,
    labels: np.ndarray | None = None,
    preprocess: Preprocess | None = None,
    threads: int = 0,
    max_samples: int | None = None,
) -> list[ModelReport]:
    """Score the float model and each quantized model on `data`: top-1 (with labels), agreement
    and KL of the first output where it holds class scores, the lowest SQNR over every output
    and its parts (as the fidelity check after quantizing); time them side by side at batch 1
    (onnxq.speed), so that the machine's load hits them alike."""
    paths = [Path(float_model), *(Path(p) for p in quantized)]
    models = [load_model(p) for p in paths]
    inputs = model_inputs(models[0])
    names = [o.name for o in models[0].graph.output]
    for path, model in zip(paths[1:], models[1:], strict=True):
        check_same_inputs(inputs, model_inputs(model), path, paths[0])
        if len(model.graph.output) != len(names):
            raise OnnxqError(f"{path} has {len(model.graph.output)} outputs, {paths[0]} {len(names)}")
    if labels is not None and max_samples is not None:
        labels = labels[:max_samples]
    # inputs exported without a batch axis get one of 1 to run the stacked samples through
    unbatched: list[str] = []
    stream = batches(
        data, inputs, preprocess=preprocess, batch_size=32, max_samples=max_samples, unbatched=unbatched
    )
    _, stream = first_batch(stream)
    runnable = [add_batch_axis(m, unbatched) for m in models]
    sessions = [session(m, threads=threads, spin=True) for m in runnable]
    # outputs picked by indices (TopK, NMS) are judged by what they pick from: fetched by
    # sessions of their own, so that the timed ones run the models as deployed
    found = selections.find(runnable[0])
    extra = selections.fetchable(found, *runnable)
    runners = sessions
    if extra:
        runners = [session(m, outputs=extra, threads=threads) for m in runnable]
    scores = [_Scores() for _ in models]
    comparisons = [OutputComparison([*names, *extra], found) for _ in models[1:]]
    first, classify = None, labels is not None
    for batch in stream:
        first = first or {k: v[:1] for k, v in batch.items()}
        outputs = [run(s, batch) for s in runners]
        for comparison, got in zip(comparisons, outputs[1:], strict=True):
            comparison.add(outputs[0], got, count(batch))
        # class scores (or labels given): top-1, agreement and KL of the first output
        classify = classify or (scores[0].count == 0 and _class_scores(outputs[0][0], count(batch)))
        if classify:
            _score_classes(scores, [o[0] for o in outputs], paths, labels)
        else:
            for score in scores:
                score.count += count(batch)
    if labels is not None and scores[0].count != len(labels):
        raise OnnxqError(f"{len(labels)} labels for {scores[0].count} samples")
    latencies = speed.compare_sessions(sessions, first)
    compared = [None, *(c.results() for c in comparisons)]
    return [
        _report(name, path, model, score, labels is not None, classify, milliseconds, results)
        for name, path, model, score, milliseconds, results in zip(
            display_names([p.resolve() for p in paths]),
            paths,
            models,
            scores,
            latencies,
            compared,
            strict=True,
        )
    ]


def _class_scores(values: np.ndarray, samples: int) -> bool:
    """Whether the first output holds class scores (TopK's sorted values hold none)."""
    return looks_like_scores(values, samples) and not sorted_like_topk(values)


def _score_classes(scores: list[_Scores], logits: list[np.ndarray], paths: list[Path], labels) -> None:
    for path, output in zip(paths[1:], logits[1:], strict=True):
        if output.shape != logits[0].shape:
            raise OnnxqError(
                f"{path} gives an output of shape {list(output.shape)}, {paths[0]} one of "
                f"{list(logits[0].shape)}"
            )
    batch_labels = _labels_for(labels, scores[0].count, len(logits[0]))
    for score, output in zip(scores, logits, strict=True):
        score.add(output, logits[0], batch_labels)


def check_same_inputs(inputs, others, path: Path, reference: Path) -> None:
    """Both models must accept the same data: names, and every size both of them fix."""
    if [s.name for s in others] != [s.name for s in inputs]:
        raise OnnxqError(f"{path} has other inputs than {reference}")
    for mine, theirs in zip(inputs, others, strict=True):
        fixed_apart = any(a and b and a != b for a, b in zip(mine.shape, theirs.shape, strict=False))
        if len(mine.shape) != len(theirs.shape) or fixed_apart:
            raise OnnxqError(
                f"input {mine.name!r} of {path} has shape {_shape(theirs.shape)}, of {reference} "
                f"{_shape(mine.shape)}: they cannot be compared on the same data"
            )


def _shape(dims) -> str:
    return "×".join("?" if d is None else str(d) for d in dims)


def display_names(paths: list[Path]) -> list[str]:
    """File names, with as many parent folders as it takes to tell apart files of one name."""
    for depth in range(1, max(len(p.parts) for p in paths) + 1):
        names = [str(Path(*p.parts[-depth:])) for p in paths]
        if len(set(names)) == len(names) or depth == max(len(p.parts) for p in paths):
            return names
    return [str(p) for p in paths]


def _labels_for(labels: np.ndarray | None, start: int, count: int) -> np.ndarray | None:
    if labels is None:
        return None
    if start + count > len(labels):
        raise OnnxqError(f"{len(labels)} labels for more samples than that")
    return labels[start : start + count]


def _report(
    name, path, model, score: _Scores, labelled: bool, classified: bool, milliseconds: float, results
) -> ModelReport:
    n = max(score.count, 1)
    judged = [r for r in results if r.judged] if results else []
    lowest = min(judged, key=lambda r: r.sqnr_db) if judged else None
    return ModelReport(
        name=name,
        samples=score.count,
        top1=score.correct / n if labelled else None,
        agreement=score.agree / n if classified else None,
        kl=score.kl / n if classified else None,
        sqnr_db=lowest.sqnr_db if lowest else None,
        size_bytes=file_size(path),
        latency_ms=milliseconds,
        kernels=kernel_summary(model),
        lowest_output=_where(lowest) if lowest and len(judged) > 1 else None,
    )


def _where(lowest: OutputFidelity) -> str:
    if lowest.picks_for is None:
        return lowest.name
    return f"{lowest.name} (what output {lowest.picks_for} is picked from by indices)"


def kernel_summary(model: onnx.ModelProto) -> str:
    """Which compute kernels onnxruntime runs after its own optimizations: integer or float."""
    return count_kernels(model).summary()


def file_size(path: Path) -> int:
    size = path.stat().st_size
    data = path.with_name(path.name + ".data")
    return size + (data.stat().st_size if data.exists() else 0)
