"""Cut the mirror's node list into the units refinement reconstructs one after another.

- layer: each quantized layer with the nodes up to the next one (AdaRound).
- block: cut only where a single tensor crosses the cut and that tensor starts or ends a
  residual block (read by two nodes, or made by an Add, possibly behind its activation), as
  BRECQ's blocks are; a stretch between such cuts holding more than MAX_BLOCK_LAYERS layers (a
  plain chain, MobileNetV2's blocks without a shortcut) is split at its other single-tensor cuts
  into groups of at most GROUP_LAYERS layers, and one still holding more than MAX_UNCUT_LAYERS
  (a detector's neck and heads) at cuts where several tensors cross.
- window:K: K consecutive blocks reconstructed together (RepAPQ's across-block calibration).
A unit's inputs and outputs are all tensors alive at its two cuts, so a skip connection that
crosses a layer cut is just one more input.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from onnxq.errors import OnnxqError

if TYPE_CHECKING:  # parse_unit is used by the config, which must not import torch
    from onnxq.refine.mirror import Mirror


@dataclass
class Unit:
    begin: int  # first node index in mirror.nodes
    end: int  # one past the last
    inputs: list[str]  # tensors alive at `begin`
    outputs: list[str]  # tensors alive at `end` (graph outputs included)
    layers: list[str] = field(default_factory=list)  # quantized compute nodes inside

    def describe(self, mirror: Mirror) -> str:
        first, last = mirror.nodes[self.begin].name, mirror.nodes[self.end - 1].name
        return first if first == last else f"{first} … {last}"


def parse_unit(text: str) -> tuple[str, int]:
    """'layer', 'block' or 'window:K' → (kind, K)."""
    kind, _, count = text.partition(":")
    if kind in ("layer", "block") and not count:
        return kind, 1
    if kind == "window" and count.isdigit() and int(count) >= 1:
        return kind, int(count)
    raise OnnxqError(f"refine unit must be layer, block or window:K (K ≥ 1), got {text!r}")


def partition(
    mirror: Mirror, layers: set[str], unit: str = "block", uncuttable: set[str] | frozenset[str] = frozenset()
) -> list[Unit]:
    """The units of `mirror` for `unit`; each holds at least one of `layers` (node names). No
    unit starts or ends where a tensor of `uncuttable` is alive (one whose samples do not lie
    along its first axis: refinement draws a unit's samples along it)."""
    kind, count = parse_unit(unit)
    alive = _alive(mirror)
    cuttable = [not tensors & uncuttable for tensors in alive]
    is_layer = [node.name in layers for node in mirror.nodes]
    if kind == "layer":
        cuts = [i for i, layer in enumerate(is_layer) if layer and cuttable[i]]
    else:
        cuts = _block_cuts(mirror, alive, is_layer, cuttable)
    outside = [mirror.stops_gradient(node) for node in mirror.nodes]
    cuts += _around_outside(outside, is_layer, cuttable)
    bounds = _merge_without_layers(sorted({0, *cuts, len(mirror.nodes)}), is_layer, outside)
    if kind == "window":
        bounds = bounds[::count] if bounds[-1] in bounds[::count] else [*bounds[::count], bounds[-1]]
    units = []
    for begin, end in itertools.pairwise(bounds):
        inside = [n.name for n in mirror.nodes[begin:end] if n.name in layers]
        units.append(Unit(begin, end, sorted(alive[begin]), sorted(alive[end]), inside))
    return units


MAX_BLOCK_LAYERS = 4
GROUP_LAYERS = 3
# A stretch with more layers than this and no single-tensor cut inside (a detector's neck and
# heads: YOLOv8n's last 50 layers, PicoDet's last 90, a DB text detector's FPN 23) is cut before
# layers where several tensors cross, into groups of GROUP_LAYERS: reconstructing a whole neck
# at once is network-wise reconstruction, which BRECQ found worse than block-wise, and at
# 800×608 one sample of it kept 0.8 GB for the backward pass. Re-parameterized blocks' parallel
# branches (a few layers between their sums) and a transformer block without a residual cut
# inside (PP-OCRv4's SVTR mixer: 11 layers, attention and MLP) stay whole.
MAX_UNCUT_LAYERS = 16
ELEMENTWISE = frozenset({"Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSwish", "Mul", "PRelu"})


def _block_cuts(
    mirror: Mirror, alive: list[set[str]], is_layer: list[bool], cuttable: list[bool]
) -> list[int]:
    single = [i for i in range(1, len(mirror.nodes)) if len(alive[i]) == 1 and cuttable[i]]
    readers: dict[str, int] = {}
    for node in mirror.nodes:
        for name in set(node.inputs):
            readers[name] = readers.get(name, 0) + 1
    hard = [i for i in single if _starts_or_ends_residual(mirror, i, next(iter(alive[i])), readers)]
    cuts = list(hard)
    for begin, end in zip([0, *hard], [*hard, len(mirror.nodes)], strict=True):
        if sum(is_layer[begin:end]) > MAX_BLOCK_LAYERS:
            cuts += _grouped(begin, [i for i in single if begin < i < end], end, is_layer)
    cuts = sorted(set(cuts))
    for begin, end in itertools.pairwise([0, *cuts, len(mirror.nodes)]):
        if sum(is_layer[begin:end]) > MAX_UNCUT_LAYERS:
            several = [i for i in range(begin + 1, end) if is_layer[i] and cuttable[i]]
            cuts += _grouped(begin, several, end, is_layer)
    return sorted(set(cuts))


def _starts_or_ends_residual(mirror: Mirror, index: int, tensor: str, readers: dict[str, int]) -> bool:
    if readers.get(tensor, 0) > 1:
        return True
    node = mirror.nodes[index - 1]
    if node.op_type in ("Add", "Sum"):
        return True
    if node.op_type in ELEMENTWISE and index >= 2:
        return (
            mirror.nodes[index - 2].op_type in ("Add", "Sum")
            and mirror.nodes[index - 2].outputs[0] in node.inputs
        )
    return False


def _grouped(begin: int, soft: list[int], end: int, is_layer: list[bool]) -> list[int]:
    """Cuts among `soft` so each group holds at most GROUP_LAYERS layers, as far as `soft`
    allows (none where it is empty)."""
    chosen, start = [], begin
    for cut, following in itertools.pairwise([*soft, end]):
        if sum(is_layer[start:following]) > GROUP_LAYERS:
            chosen.append(cut)
            start = cut
    return chosen


def _alive(mirror: Mirror) -> list[set[str]]:
    """For each cut position i (before node i), the non-constant tensors made before and read after."""
    produced_at = {name: -1 for name in mirror.graph_inputs}
    for index, node in enumerate(mirror.nodes):
        for name in node.outputs:
            if name:
                produced_at[name] = index
    alive = []
    for i in range(len(mirror.nodes) + 1):
        alive.append({n for n, at in produced_at.items() if at < i and mirror.last_use.get(n, -1) >= i})
    return alive


def _around_outside(outside: list[bool], is_layer: list[bool], cuttable: list[bool]) -> list[int]:
    """Cuts just before and just after each stretch of nodes the mirror runs in onnxruntime (an
    LSTM, a GRU) that holds no layer: the unit holding such a node learns nothing, so it is kept
    to those nodes, and the layers around it learn in units of their own."""
    cuts = []
    for start, group in itertools.groupby(range(len(outside)), key=lambda i: outside[i]):
        if not start:
            continue
        nodes = list(group)
        if any(is_layer[i] for i in nodes):
            continue
        before = next((i for i in range(nodes[0], 0, -1) if cuttable[i]), None)
        after = next((i for i in range(nodes[-1] + 1, len(outside)) if cuttable[i]), None)
        cuts += [i for i in (before, after) if i is not None]
    return cuts


def _merge_without_layers(bounds: list[int], is_layer: list[bool], outside: list[bool]) -> list[int]:
    """Drop cuts so every segment holds a layer: a segment without one joins the next (the last,
    the one before), unless it holds a node the mirror runs in onnxruntime, which would keep the
    unit it joined from learning."""
    kept = [bounds[0]]
    for begin, end in itertools.pairwise(bounds):
        if any(is_layer[begin:end]) or any(outside[begin:end]) or end == bounds[-1]:
            kept.append(end)
    last = slice(kept[-2], kept[-1]) if len(kept) > 2 else None
    if last is not None and not any(is_layer[last]) and not any(outside[last]):
        del kept[-2]  # trailing nodes without a layer join the last unit
    return kept
