"""Runs of the tunable float graph that each change a few parameters of one base feed.

The fidelity fallback ranks layers by what each one's quantizers alone cost the outputs, and the
range choice scores one activation's other range at a time: hundreds of whole-model runs that
differ from a common feed in a handful of parameters. Nothing before the first node that reads a
changed parameter changes, so the graph is cut before those nodes, each sample runs once with the
base feed, and each variant branches off at its cut and runs only the rest of the graph (on
yolox_ddddocr a layer's branch costs 0.6 of a whole run, the heavy head being late).

Where the base feed makes the tunable graph the float model (the fallback's ranking: one
layer's quantizers on at a time), a variant's branch leaves the tunable graph once its own
parameters are read and runs the rest in the float model, cut at the same places: no identity
fake quantizers, and weights onnxruntime can pre-pack (on yolox_ddddocr a walk through the float
model's segments took 71 ms against 140 ms through the tunable graph's).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx

from onnxq.calib.data import Batch
from onnxq.calib.simulate import Arrays, cut_simulation, float_frontier, float_positions, node_reads
from onnxq.comparison import OutputComparison, OutputFidelity


def compare_variants(
    tunable: onnx.ModelProto,
    base: Arrays,
    variants: dict[str, Arrays],
    batches: list[Batch],
    names: list[str],
    reference: list[list[np.ndarray]] | None = None,
    float_model: onnx.ModelProto | None = None,
) -> dict[str, list[OutputFidelity]]:
    """Fidelity of the outputs `names` of each variant (its parameters fed over `base`, which
    feeds every parameter) against `reference` (each batch's outputs; None: the base's own),
    over the batches. A variant that changes nothing read by the graph gets the base's outputs.
    `float_model`: the model the tunable graph was made from, where `base` is its float feed;
    each variant then runs in it once its own parameters are read."""
    comparisons = {key: OutputComparison(names) for key in variants}
    branches = _Branches(tunable, base, variants, float_model)
    for key, wanted, got in branches.runs(batches, names, reference):
        comparisons[key].add(wanted, got)
    return {key: comparison.results() for key, comparison in comparisons.items()}


Runs = Iterator[tuple[str, list[np.ndarray], list[np.ndarray]]]  # (variant, wanted, got) per batch


class _Branches:
    """The tunable graph cut where variants start (and, with a float model, where each one's
    parameters have all been read), and the float model cut at the same places."""

    def __init__(self, tunable, base: Arrays, variants: dict[str, Arrays], float_model) -> None:
        readers, last = _first_readers(tunable), _last_readers(tunable)
        self.nodes = nodes = len(tunable.graph.node)
        self.base, self.variants = base, variants
        self.starts = {
            key: min((readers.get(n, nodes) for n in feed), default=nodes) for key, feed in variants.items()
        }
        self.positions = float_positions(tunable)
        self.ends = {}
        # the float tail only where the tunable graph's own nodes are exactly the float model's
        if float_model is not None and self.positions[-1] == len(float_model.graph.node):
            for key, feed in variants.items():
                self.ends[key] = max((last[n] + 1 for n in feed if n in last), default=nodes)
        cuts = {i for i in [*self.starts.values(), *self.ends.values()] if i < nodes}
        self.sim = cut_simulation(tunable, base, cuts)
        self.segment_at = _segment_index(self.sim, nodes)
        self.float_sim, self.float_segment_at = None, {}
        if self.ends:
            float_cuts = {self.positions[end] for end in self.ends.values() if end < nodes}
            self.float_sim = cut_simulation(float_model, {}, float_cuts)
            self.float_segment_at = _segment_index(self.float_sim, len(float_model.graph.node))

    def runs(self, batches: list[Batch], names: list[str], reference) -> Runs:
        """Each batch run once with the base feed, each variant from the segment its first
        changed parameter is read in."""
        sim, base = self.sim, self.base
        order = sorted(self.variants, key=lambda key: self.starts[key])
        for position, batch in enumerate(batches):
            data = {name: batch[name] for name in sim.data_inputs}
            if reference is None:
                wanted = _outputs(sim.run(sim.segments, data, base), names)
            else:
                wanted = reference[position]
            frontier, done = data, 0
            for key in order:
                index = self.segment_at[self.starts[key]]
                frontier, done = sim.run(sim.segments[done:index], frontier, base), index
                yield key, wanted, _outputs(self._branch(key, index, frontier), names)

    def _branch(self, key: str, index: int, frontier: Arrays) -> Arrays:
        """The variant's run from segment `index` of the tunable graph, in the float model once
        its parameters are read (where the frontier there names float tensors unambiguously)."""
        params = {**self.base, **self.variants[key]}
        end = self.ends.get(key, self.nodes)
        if end >= self.nodes:
            return self.sim.run(self.sim.segments[index:], frontier, params)
        middle = self.segment_at[end]
        crossing = self.sim.run(self.sim.segments[index:middle], frontier, params)
        renamed = float_frontier(crossing)
        if renamed is None:
            return self.sim.run(self.sim.segments[middle:], crossing, params)
        tail = self.float_sim.segments[self.float_segment_at[self.positions[end]] :]
        return self.float_sim.run(tail, renamed, {})


def _segment_index(sim, nodes: int) -> dict[int, int]:
    """A cut's node index → the index of the segment that starts there (the end: past the last)."""
    index = {segment.begin: position for position, segment in enumerate(sim.segments)}
    index[nodes] = len(sim.segments)
    return index


def _first_readers(model: onnx.ModelProto) -> dict[str, int]:
    """Each tensor → the index of the first node that reads it (in a subgraph too)."""
    readers: dict[str, int] = {}
    for index, node in enumerate(model.graph.node):
        for name in node_reads(node):
            readers.setdefault(name, index)
    return readers


def _last_readers(model: onnx.ModelProto) -> dict[str, int]:
    """Each tensor → the index of the last node that reads it (in a subgraph too)."""
    return {name: index for index, node in enumerate(model.graph.node) for name in node_reads(node)}


def _outputs(frontier: Arrays, names: list[str]) -> list[np.ndarray]:
    return [frontier[name] for name in names]
