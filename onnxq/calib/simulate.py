"""The float model with every quantizer made tunable, cut into onnxruntime sessions.

Calibration searches scales by running candidates, so nothing it varies may be baked into a
session. This module rewrites the float model once:
- every planned weight and bias becomes a graph input (fed float, or dequantized candidates);
- every planned activation gets a fake quantizer y = (clip(round(x/s) + z, qmin, qmax) − z)·s
  whose s, z, qmin and qmax are graph inputs. Feeding s = 2^-30, z = 0 and an unbounded range
  makes it the identity to within 2^-31, so the same sessions also compute the float model.
Absorbed Relu/Clip nodes stay: with zero point 0 the quantizer clamps at 0 anyway, and in float
mode they are needed.

The graph is then cut before every tunable item (a layer's weights, an activation's quantizer)
into segments, one onnxruntime session each. A search walks the segments in order keeping only
the tensors that cross the current cut, so each item sees the already-quantized model before it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from onnxq.io import session
from onnxq.passes.graph_utils import subgraphs
from onnxq.passes.infer_types import element_types
from onnxq.quant.plan import QuantPlan

FLOAT_SCALE = np.float32(2.0**-30)  # a power of two: x / s · s is exact
UNBOUNDED = np.float32(3.0e38)
PARAM_SUFFIXES = ("scale", "low", "high")  # low, high: qmin and qmax less the zero point
FAKE_QUANT_SUFFIX = "::fq"  # a fake quantizer's output: its input's name and this
FAKE_QUANT_MARK = "::fq_"  # its nodes: the output's name and _div, _round, _clip, _mul

Arrays = dict[str, np.ndarray]


@dataclass(frozen=True)
class Item:
    """Something calibration chooses: a layer's weights ("weight") or an activation's range."""

    kind: str
    name: str  # weight initializer, or the activation tensor whose quantizer this is
    node: str  # the compute node (weights) or the quantizer's first node (activations)


@dataclass
class Segment:
    """Nodes between two cuts, run as one session: frontier in → frontier out."""

    runner: object
    inputs: list[str]  # frontier tensors the segment reads
    params: list[str]  # tunable parameters it reads
    outputs: list[str]  # tensors it makes that are needed later
    carried: list[str]  # frontier tensors passed on untouched
    item: Item | None = None
    float_inputs: frozenset[str] = frozenset()  # declared float32: a half-precision cache is widened
    begin: int = 0  # index of its first node in the tunable graph


@dataclass
class Simulation:
    model: onnx.ModelProto
    segments: list[Segment]
    data_inputs: list[str]
    float_params: Arrays = field(default_factory=dict)

    def run(
        self, segments: Iterable[Segment], frontier: Arrays, params: Arrays, *, quiet: bool = False
    ) -> Arrays:
        """Run consecutive segments on one batch; returns the frontier after the last.
        `quiet`: a run expected to fail may (a probe) without onnxruntime logging the error."""
        options = _QUIET if quiet else None
        for segment in segments:
            feed = {name: _widened(frontier[name], name in segment.float_inputs) for name in segment.inputs}
            feed.update({name: params[name] for name in segment.params})
            values = segment.runner.run(segment.outputs, feed, options)
            carried = {name: frontier[name] for name in segment.carried}
            frontier = carried | dict(zip(segment.outputs, values, strict=True))
        return frontier


_QUIET = ort.RunOptions()
_QUIET.log_severity_level = 4  # fatal only


def _widened(values: np.ndarray, declared_float: bool) -> np.ndarray:
    """A float32 input kept in a float16 cache goes back to float32 for onnxruntime."""
    return values.astype(np.float32) if declared_float and values.dtype == np.float16 else values


def param_names(tensor: str) -> dict[str, str]:
    """Graph-input names of the fake quantizer's parameters for `tensor`."""
    return {suffix: f"{tensor}::{suffix}" for suffix in PARAM_SUFFIXES}


def fake_quant_feed(tensor: str, scale: float, zero: float, qmin: float, qmax: float) -> Arrays:
    names = param_names(tensor)
    zero = float(zero)  # an unsigned zero point would wrap around in qmin − zero
    values = (scale, float(qmin) - zero, float(qmax) - zero)
    return {names[s]: np.asarray(v, np.float32) for s, v in zip(PARAM_SUFFIXES, values, strict=True)}


def identity_feed(tensor: str) -> Arrays:
    return fake_quant_feed(tensor, FLOAT_SCALE, 0.0, -UNBOUNDED, UNBOUNDED)


def build_simulation(model: onnx.ModelProto, plan: QuantPlan) -> Simulation:
    """The tunable model and its segments; float_params reproduces the float model."""
    tunable, float_params, starts = tunable_model(model, plan)
    graph = tunable.graph
    items = _items(graph, plan, starts)
    types = element_types(tunable)
    cuts = {i for i, node in enumerate(graph.node) if node.name in items}
    segments = _segments(tunable, cuts, items, set(float_params), types)
    data_inputs = [i.name for i in graph.input if i.name not in float_params]
    return Simulation(tunable, segments, data_inputs, float_params)


def cut_simulation(tunable: onnx.ModelProto, float_params: Arrays, cuts: set[int]) -> Simulation:
    """A tunable model (tunable_model's) cut before the nodes at the given indices only: fewer,
    longer segments than build_simulation's, for runs that start part-way (onnxq.branching)."""
    segments = _segments(tunable, cuts, {}, set(float_params), element_types(tunable))
    data_inputs = [i.name for i in tunable.graph.input if i.name not in float_params]
    return Simulation(tunable, segments, data_inputs, float_params)


def tunable_model(model: onnx.ModelProto, plan: QuantPlan) -> tuple[onnx.ModelProto, Arrays, dict[str, str]]:
    """The float model with planned weights and biases as graph inputs and a fake quantizer on
    every planned activation; returns it, the feed that makes it the float model, and each
    quantized tensor → its quantizer's first node."""
    tunable = onnx.ModelProto()
    tunable.CopyFrom(model)
    float_params = _lift_constants(tunable.graph, [*plan.weights, *plan.biases])
    starts = _insert_fake_quantizers(tunable.graph, plan, float_params)
    return tunable, float_params, starts


def _lift_constants(graph: onnx.GraphProto, names: list[str]) -> Arrays:
    """Turn initializers into graph inputs; returns their float values."""
    wanted = set(names)
    kept, lifted = [], {}
    for tensor in graph.initializer:
        if tensor.name in wanted:
            lifted[tensor.name] = onnx.numpy_helper.to_array(tensor).astype(np.float32)
            graph.input.append(
                helper.make_tensor_value_info(tensor.name, onnx.TensorProto.FLOAT, tensor.dims)
            )
        else:
            kept.append(tensor)
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return lifted


def _insert_fake_quantizers(graph: onnx.GraphProto, plan: QuantPlan, params: Arrays) -> dict[str, str]:
    """Put a fake quantizer after each planned activation's observed tensor.

    Sharers (outputs of shape-only ops) read their root's parameters. Returns each quantized
    tensor → the name of its quantizer's first node.
    """
    nodes = list(graph.node)
    produced_at = {out: i for i, node in enumerate(nodes) for out in node.output}
    inserts: dict[int, list[onnx.NodeProto]] = {}
    starts = {}
    renames = {}
    for spec in plan.activations.values():
        observed = spec.observed
        root = plan.root(spec.tensor)
        names = param_names(root)
        if root == spec.tensor:
            for graph_input in (names[s] for s in PARAM_SUFFIXES):
                graph.input.append(helper.make_tensor_value_info(graph_input, onnx.TensorProto.FLOAT, []))
            params.update(identity_feed(root))
        out = f"{observed}{FAKE_QUANT_SUFFIX}"
        steps = [
            helper.make_node("Div", [observed, names["scale"]], [f"{out}_div"], name=f"{out}_div"),
            helper.make_node("Round", [f"{out}_div"], [f"{out}_round"], name=f"{out}_round"),
            helper.make_node(
                "Clip",
                [f"{out}_round", names["low"], names["high"]],
                [f"{out}_clip"],
                name=f"{out}_clip",
            ),
            helper.make_node("Mul", [f"{out}_clip", names["scale"]], [out], name=f"{out}_mul"),
        ]
        inserts.setdefault(produced_at.get(observed, -1), []).extend(steps)
        starts[spec.tensor] = steps[0].name
        renames[observed] = out
    ordered = list(inserts.get(-1, []))
    for i, node in enumerate(nodes):
        _read_renamed(node, renames)
        ordered.append(node)
        ordered += inserts.get(i, [])
    del graph.node[:]
    graph.node.extend(ordered)
    return starts


def float_positions(tunable: onnx.ModelProto) -> list[int]:
    """Each tunable node index (and the end) → the index of the same place in the float model:
    the number of the float model's nodes before it."""
    positions, count = [], 0
    for node in tunable.graph.node:
        positions.append(count)
        count += FAKE_QUANT_MARK not in node.name
    return [*positions, count]


def float_frontier(frontier: Arrays) -> Arrays | None:
    """Tensors crossing a cut of the tunable graph under the float model's names (a fake
    quantizer's output under its input's), or None where a cut falls inside a fake quantizer or
    a tensor crosses both raw and quantized (a graph output that later nodes read quantized)."""
    renamed = {}
    for name, value in frontier.items():
        original = name.removesuffix(FAKE_QUANT_SUFFIX)
        if "::" in original or original in renamed:
            return None
        renamed[original] = value
    return renamed


def _read_renamed(node: onnx.NodeProto, renames: dict[str, str]) -> None:
    """Point the node's reads, and those its subgraphs make by name of the graph around them
    (a name a subgraph defines itself shadows it), at the renamed tensors: an If branch that
    reads a quantized tensor reads it quantized, as in the QDQ model."""
    for j, name in enumerate(node.input):
        if name in renames:
            node.input[j] = renames[name]
    for graph in subgraphs(node):
        defined = _defined(graph)
        outer = {name: renamed for name, renamed in renames.items() if name not in defined}
        for inner in graph.node:
            _read_renamed(inner, outer)


def _items(graph: onnx.GraphProto, plan: QuantPlan, starts: dict[str, str]) -> dict[str, Item]:
    """Tunable items keyed by the node they start at."""
    items = {}
    compute = {node: settings for node, settings in plan.layers.items()}
    for node in graph.node:
        if node.name in compute and len(node.input) > 1 and node.input[1] in plan.weights:
            items[node.name] = Item("weight", node.input[1], node.name)
    for tensor, start in starts.items():
        if plan.root(tensor) == tensor:
            items[start] = Item("activation", tensor, start)
    return items


def _segments(
    model: onnx.ModelProto,
    cuts: set[int],
    items: dict[str, Item],
    param_inputs: set[str],
    types: dict[str, int],
) -> list[Segment]:
    graph = model.graph
    nodes = list(graph.node)
    bounds = sorted({0, *cuts, len(nodes)})
    initializers = {t.name: t for t in graph.initializer}
    param_inputs = param_inputs | {i.name for i in graph.input if "::" in i.name}
    outputs = [o.name for o in graph.output]
    last_use: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for name in node_reads(node):
            last_use[name] = i
    available = [i.name for i in graph.input if i.name not in param_inputs]
    segments = []
    for begin, end in itertools.pairwise(bounds):
        part = nodes[begin:end]
        made = [out for node in part for out in node.output if out]
        needed = {n for n in [*available, *made] if last_use.get(n, -1) >= end or n in outputs}
        read = {name for node in part for name in node_reads(node) if name}
        inputs = [n for n in available if n in read]
        params = sorted(n for n in read if n in param_inputs)
        consts = [initializers[n] for n in sorted(read) if n in initializers]
        segment_model = helper.make_model(
            helper.make_graph(
                part,
                f"segment_{begin}",
                [_info(n, types) for n in [*inputs, *params]],
                [_info(n, types) for n in made if n in needed],
                consts,
            ),
            opset_imports=list(model.opset_import),
            ir_version=model.ir_version,
        )
        item = items.get(part[0].name)
        produced = [n for n in made if n in needed]
        carried = [n for n in available if n in needed]
        runner = session(segment_model, arena=False)
        declared_float = frozenset(
            n for n in inputs if types.get(n, onnx.TensorProto.FLOAT) == onnx.TensorProto.FLOAT
        )
        segments.append(Segment(runner, inputs, params, produced, carried, item, declared_float, begin))
        available = [*carried, *produced]
    return segments


def node_reads(node: onnx.NodeProto) -> list[str]:
    """The tensors a node reads: its inputs, and those of the graph around it that its subgraphs
    (If, Loop, Scan) read by name. A cut must carry both."""
    names = list(node.input)
    for graph in subgraphs(node):
        defined = _defined(graph)
        names += [name for inner in graph.node for name in node_reads(inner) if name and name not in defined]
    return list(dict.fromkeys(names))


def _defined(graph: onnx.GraphProto) -> set[str]:
    """The names a subgraph defines itself: they shadow those of the graph around it."""
    names = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    return names | {out for node in graph.node for out in node.output}


def _info(name: str, types: dict[str, int]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, types.get(name) or onnx.TensorProto.FLOAT, None)
