"""A strided view that reads a whole tensor in its own order, written as the tensor itself.

torch.onnx's dynamo exporter writes `as_strided` (torchvision's adaptive average pooling to
1×1 in ResNet, MobileNetV3's squeeze-excitation, DeepLab's heads) as
    Gather(Reshape(x, [-1]), offset + Σ_d arange(size_d)·stride_d, axis 0)
with the index grid built at run time from Shape(input) where the batch is dynamic. Where the
view has x's own shape, starts at 0 and steps by x's contiguous strides, it is x. Left alone,
the Gather runs a float copy through a computed index, and the Shape of the input it reads is
alive until the last such view, so rounding refinement can cut the network nowhere before it
(refine.sample_axes): a dynamo ResNet-18 was reconstructed as two units instead of one per
block.

Sizes read at run time are matched by the tensor and axis they come from: the view's batch
axis is Shape(input)[0], equal to x's when inference gives both the same dimension variable
(ONNX: one name, one size).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxq.passes.graph_utils import attribute, bypass, constant, drop_unused_initializers

Size = int | str  # a static size, or the name of the dimension variable it equals


@dataclass(frozen=True)
class IndexGrid:
    """offset + Σ_d steps[d]·i_d at every position i of a grid of `sizes`."""

    sizes: tuple[Size, ...]
    offset: int
    steps: tuple[int, ...]


def drop_whole_strided_views(graph: ir.Graph) -> int:
    """Replace every such view by the tensor it reads, drop what only it read; returns how many."""
    dropped = 0
    for node in list(graph):
        source = _whole_view_source(node)
        if source is None or (
            node.outputs[0].is_graph_output() and (source.is_graph_input() or source.is_graph_output())
        ):
            continue  # the graph's interface would lose a name
        feeds = list(node.inputs)
        bypass(graph, node, source)
        _remove_unread(graph, feeds)
        dropped += 1
    if dropped:
        drop_unused_initializers(graph)  # a static batch's index grid: a constant as large as the view
    return dropped


def _whole_view_source(node: ir.Node) -> ir.Value | None:
    """x where `node` is Gather(Reshape(x, [-1]), grid) reading all of x in order, else None."""
    if node.op_type != "Gather" or node.domain or attribute(node, "axis", 0) not in (0, -1):
        return None
    flat = node.inputs[0].producer() if node.inputs[0] is not None else None
    if flat is None or flat.op_type != "Reshape" or flat.domain:
        return None
    target = constant(flat.inputs[1])
    if target is None or target.tolist() != [-1]:
        return None
    source = flat.inputs[0]
    sizes = _sizes(source)
    grid = _index_grid(node.inputs[1])
    if sizes is None or grid is None or grid.sizes != sizes or grid.offset != 0:
        return None
    return source if _contiguous(sizes, grid.steps) else None


def _sizes(value: ir.Value) -> tuple[Size, ...] | None:
    """The value's dimensions as sizes, None where inference left one without a name."""
    if value.shape is None:
        return None
    sizes = []
    for dim in value.shape:
        if isinstance(dim, int):
            sizes.append(dim)
        elif getattr(dim, "value", None):
            sizes.append(dim.value)
        else:
            return None
    return tuple(sizes)


def _contiguous(sizes: tuple[Size, ...], steps: tuple[int, ...]) -> bool:
    """Whether `steps` are row-major strides of `sizes` (any step along a size-1 axis)."""
    stride = 1
    for axis in reversed(range(len(sizes))):
        if sizes[axis] != 1 and steps[axis] != stride:
            return False
        if not isinstance(sizes[axis], int):
            return axis == 0  # a named size only first, where no stride is its multiple
        stride *= sizes[axis]
    return True


def _index_grid(value: ir.Value | None) -> IndexGrid | None:
    """The index tensor `value` as an IndexGrid where it is built from constants, Range over a
    size, Mul by a scalar, Unsqueeze and Add; None otherwise."""
    if value is None:
        return None
    array = constant(value)
    if array is not None:
        return _grid_of_array(array)
    node = value.producer()
    if node is None or node.domain:
        return None
    if node.op_type == "Range":
        return _range_grid(node)
    if node.op_type == "Mul":
        return _scaled_grid(node)
    if node.op_type == "Add":
        return _sum_grid(_index_grid(node.inputs[0]), _index_grid(node.inputs[1]))
    if node.op_type == "Unsqueeze":
        return _unsqueezed_grid(node)
    return None


def _grid_of_array(array: np.ndarray) -> IndexGrid | None:
    """A constant integer array as an IndexGrid, when it is one."""
    if array.dtype.kind not in "iu":
        return None
    values = array.astype(np.int64)
    offset = int(values.flat[0]) if values.size else 0
    steps = []
    for axis, size in enumerate(values.shape):
        corner = [0] * values.ndim
        corner[axis] = 1
        steps.append(int(values[tuple(corner)]) - offset if size > 1 else 0)
    expected = np.full(values.shape, offset, dtype=np.int64)
    for axis, step in enumerate(steps):
        expected = expected + step * np.arange(values.shape[axis]).reshape(
            [-1 if k == axis else 1 for k in range(values.ndim)]
        )
    if not np.array_equal(values, expected):
        return None
    return IndexGrid(tuple(int(s) for s in values.shape), offset, tuple(steps))


def _range_grid(node: ir.Node) -> IndexGrid | None:
    """Range(0, n, 1) over a size n read from a shape."""
    start, delta = constant(node.inputs[0]), constant(node.inputs[2])
    if start is None or delta is None or start.size != 1 or delta.size != 1:
        return None
    if int(start.reshape(())) != 0 or int(delta.reshape(())) != 1:
        return None
    size = _read_size(node.inputs[1])
    return None if size is None else IndexGrid((size,), 0, (1,))


def _read_size(value: ir.Value | None) -> Size | None:
    """The size a one-value tensor holds, where it is a constant or one dimension of a shape:
    Shape(x)[a:a+1] or Gather(Shape(x), a), through Squeeze and Reshape."""
    if value is None:
        return None
    array = constant(value)
    if array is not None:
        return int(array.reshape(())) if array.size == 1 and array.dtype.kind in "iu" else None
    node = value.producer()
    if node is None or node.domain:
        return None
    if node.op_type in ("Squeeze", "Reshape", "Unsqueeze"):
        return _read_size(node.inputs[0])
    if node.op_type == "Shape":
        return _shape_dimension(node, attribute(node, "start", 0), attribute(node, "end", None))
    if node.op_type == "Gather" and node.inputs[0].producer() is not None:
        shape, index = node.inputs[0].producer(), constant(node.inputs[1])
        if shape.op_type != "Shape" or shape.domain or index is None or index.size != 1:
            return None
        if attribute(shape, "start", 0) != 0 or attribute(shape, "end", None) is not None:
            return None
        axis = int(index.reshape(()))
        return _shape_dimension(shape, axis, axis + 1 if axis != -1 else None)
    return None


def _shape_dimension(shape: ir.Node, start: int, end: int | None) -> Size | None:
    """The one dimension Shape(x, start, end) reads, as a size."""
    sizes = _sizes(shape.inputs[0])
    if sizes is None:
        return None
    rank = len(sizes)
    first = start + rank if start < 0 else start
    last = rank if end is None else (end + rank if end < 0 else min(end, rank))
    return sizes[first] if last - first == 1 and 0 <= first < rank else None


def _scaled_grid(node: ir.Node) -> IndexGrid | None:
    """A grid times a one-value integer constant."""
    for grid_input, factor_input in ((0, 1), (1, 0)):
        factor = constant(node.inputs[factor_input])
        if factor is not None and factor.size == 1 and factor.ndim <= 1 and factor.dtype.kind in "iu":
            grid = _index_grid(node.inputs[grid_input])
            if grid is None or (factor.ndim == 1 and not grid.sizes):
                return None
            k = int(factor.reshape(()))
            return IndexGrid(grid.sizes, grid.offset * k, tuple(step * k for step in grid.steps))
    return None


def _sum_grid(first: IndexGrid | None, second: IndexGrid | None) -> IndexGrid | None:
    """The sum of two grids, broadcast as numpy broadcasts (sizes must match or be 1)."""
    if first is None or second is None:
        return None
    rank = max(len(first.sizes), len(second.sizes))
    a_sizes, a_steps = _padded(first, rank)
    b_sizes, b_steps = _padded(second, rank)
    sizes = []
    for a, b in zip(a_sizes, b_sizes, strict=True):
        if a != b and 1 not in (a, b):
            return None
        sizes.append(b if a == 1 else a)
    steps = tuple(a + b for a, b in zip(a_steps, b_steps, strict=True))
    return IndexGrid(tuple(sizes), first.offset + second.offset, steps)


def _padded(grid: IndexGrid, rank: int) -> tuple[list[Size], list[int]]:
    """A grid's sizes and steps with leading size-1 axes up to `rank`; a size-1 axis steps by 0
    (its one index is 0, whatever its step), so broadcasting it adds nothing along that axis."""
    missing = rank - len(grid.sizes)
    steps = [0 if size == 1 else step for size, step in zip(grid.sizes, grid.steps, strict=True)]
    return [1] * missing + list(grid.sizes), [0] * missing + steps


def _unsqueezed_grid(node: ir.Node) -> IndexGrid | None:
    """A grid with size-1 axes inserted (axes from the input, opset 13+, or the attribute)."""
    grid = _index_grid(node.inputs[0])
    axes = constant(node.inputs[1]) if len(node.inputs) > 1 else None
    axes = axes.tolist() if axes is not None else attribute(node, "axes", None)
    if grid is None or axes is None:
        return None
    rank = len(grid.sizes) + len(axes)
    inserted = sorted(axis + rank if axis < 0 else axis for axis in axes)
    sizes, steps = list(grid.sizes), list(grid.steps)
    for axis in inserted:
        sizes.insert(axis, 1)
        steps.insert(axis, 0)
    return IndexGrid(tuple(sizes), grid.offset, tuple(steps))


def _remove_unread(graph: ir.Graph, values: list[ir.Value | None]) -> None:
    """Remove the producers of `values`, and theirs in turn, that nothing reads any more."""
    pending = [value for value in values if value is not None]
    while pending:
        value = pending.pop()
        node = value.producer()
        if node is None or node.graph is not graph:
            continue
        if any(output.uses() or output.is_graph_output() for output in node.outputs):
            continue
        pending.extend(value for value in node.inputs if value is not None)
        graph.remove(node, safe=True)
