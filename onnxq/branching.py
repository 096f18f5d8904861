"""Runs of the tunable float graph that each change a few parameters of one base feed.

The fidelity fallback ranks layers by what each one's quantizers alone cost the outputs, and the
range choice scores one activation's other range at a time: hundreds of whole-model runs that
differ from a common feed in a handful of parameters. Nothing before the first node that reads a
changed parameter changes, so the graph is cut before those nodes, each sample runs once with the
base feed, and each variant branches off at its cut and runs only the rest of the graph (on
yolox_ddddocr a layer's branch costs 0.6 of a whole run, the heavy head being late).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx

from onnxq.calib.data import Batch
from onnxq.calib.simulate import Arrays, cut_simulation, node_reads
from onnxq.fidelity import OutputComparison, OutputFidelity


def compare_variants(
    tunable: onnx.ModelProto,
    base: Arrays,
    variants: dict[str, Arrays],
    batches: list[Batch],
    names: list[str],
    reference: list[list[np.ndarray]] | None = None,
) -> dict[str, list[OutputFidelity]]:
    """Fidelity of the outputs `names` of each variant (its parameters fed over `base`, which
    feeds every parameter) against `reference` (each batch's outputs; None: the base's own),
    over the batches. A variant that changes nothing read by the graph gets the base's outputs."""
    comparisons = {key: OutputComparison(names) for key in variants}
    for key, wanted, got in _branched_runs(tunable, base, variants, batches, names, reference):
        comparisons[key].add(wanted, got)
    return {key: comparison.results() for key, comparison in comparisons.items()}


Runs = Iterator[tuple[str, list[np.ndarray], list[np.ndarray]]]  # (variant, wanted, got) per batch


def _branched_runs(tunable, base: Arrays, variants: dict[str, Arrays], batches, names, reference) -> Runs:
    """Each batch run once with `base`, each variant from the segment its first changed
    parameter is read in."""
    readers = _first_readers(tunable)
    nodes = len(tunable.graph.node)
    starts = {
        key: min((readers.get(n, nodes) for n in feed), default=nodes) for key, feed in variants.items()
    }
    sim = cut_simulation(tunable, base, {i for i in starts.values() if i < nodes})
    first_segment = {segment.begin: index for index, segment in enumerate(sim.segments)}
    first_segment[nodes] = len(sim.segments)
    order = sorted(variants, key=lambda key: starts[key])
    for position, batch in enumerate(batches):
        data = {name: batch[name] for name in sim.data_inputs}
        if reference is None:
            wanted = _outputs(sim.run(sim.segments, data, base), names)
        else:
            wanted = reference[position]
        frontier, done = data, 0
        for key in order:
            index = first_segment[starts[key]]
            frontier, done = sim.run(sim.segments[done:index], frontier, base), index
            got = sim.run(sim.segments[index:], frontier, {**base, **variants[key]})
            yield key, wanted, _outputs(got, names)


def _first_readers(model: onnx.ModelProto) -> dict[str, int]:
    """Each tensor → the index of the first node that reads it (in a subgraph too)."""
    readers: dict[str, int] = {}
    for index, node in enumerate(model.graph.node):
        for name in node_reads(node):
            readers.setdefault(name, index)
    return readers


def _outputs(frontier: Arrays, names: list[str]) -> list[np.ndarray]:
    return [frontier[name] for name in names]
