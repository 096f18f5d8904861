"""Runs of the tunable float graph that each change a few parameters of one base feed.

The fidelity fallback ranks layers by what each one's quantizers alone cost the outputs, and the
range choice scores one activation's other range at a time: hundreds of whole-model runs that
differ from a common feed in a handful of parameters. Nothing before the first node that reads a
changed parameter changes, so the graph is cut before those nodes, each sample runs once with the
base feed, and each variant branches off at its cut and runs only the rest of the graph. On the
zoo's detectors a layer's cut lies on average past half of the graph's work.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnxq.calib.data import Batch
from onnxq.calib.simulate import Arrays, Simulation, cut_simulation
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
    readers = _first_readers(tunable)
    nodes = len(tunable.graph.node)
    starts = {
        key: min((readers.get(n, nodes) for n in feed), default=nodes) for key, feed in variants.items()
    }
    cuts = set() if _has_subgraphs(tunable) else {i for i in starts.values() if i < nodes}
    sim = cut_simulation(tunable, base, cuts)
    first_segment = {segment.begin: index for index, segment in enumerate(sim.segments)}
    first_segment[nodes] = len(sim.segments)
    starts = {key: start if start in first_segment else 0 for key, start in starts.items()}
    order = sorted(variants, key=lambda key: starts[key])
    comparisons = {key: OutputComparison(names) for key in variants}
    for position, batch in enumerate(batches):
        data = {name: batch[name] for name in sim.data_inputs}
        wanted = (
            reference[position]
            if reference is not None
            else _outputs(sim, sim.run(sim.segments, data, base), names)
        )
        frontier, done = data, 0
        for key in order:
            index = first_segment[starts[key]]
            frontier, done = sim.run(sim.segments[done:index], frontier, base), index
            got = sim.run(sim.segments[index:], frontier, {**base, **variants[key]})
            comparisons[key].add(wanted, _outputs(sim, got, names))
    return {key: comparison.results() for key, comparison in comparisons.items()}


def _first_readers(model: onnx.ModelProto) -> dict[str, int]:
    """Each tensor → the index of the first node that reads it."""
    readers: dict[str, int] = {}
    for index, node in enumerate(model.graph.node):
        for name in node.input:
            readers.setdefault(name, index)
    return readers


def _has_subgraphs(model: onnx.ModelProto) -> bool:
    """Whether a node (If, Loop, Scan) reads tensors of the graph inside its own subgraphs,
    which the cuts do not follow: such a graph runs whole for every variant."""
    return any(
        attribute.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
        for node in model.graph.node
        for attribute in node.attribute
    )


def _outputs(sim: Simulation, frontier: Arrays, names: list[str]) -> list[np.ndarray]:
    return [frontier[name] for name in names]
