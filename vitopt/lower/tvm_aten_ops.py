"""Converters for ATen ops that vitopt's IR emits and TVM 0.27's exported-program importer lacks.

`amax.default` (a max over dimensions, no indices): token merging (merge_tokens' bipartite
matching keeps each token's best similarity) reduces with it. It is `relax.op.max` over the
same axes.

`topk.default` with a symbolic k: a stage exported with a symbolic token count (the TVM
backend's stage import, vitopt/backends/tvm_stage_import.py) ranks every token with
`topk(n)` (`vitopt.ir.reduce.rank`), and relax.op.topk takes only an integer k. A k equal to
the axis length is a full sort: argsort plus a gather of the values. An integer k goes to the
importer's own converter.

`slice.Tensor` with symbolic bounds (stage import only, not registered globally): torch.export
has already proved a slice of a symbolic count in range (its guards hold over the exported
range), so the slice is emitted with `assume_inbound`: its length is end - begin. TVM's own
converter clamps symbolic bounds into min/max/if_then_else shapes that its analyzer cannot
simplify, and the shapes after it lose their dimensions.
"""
from __future__ import annotations

from vitopt.lower.tvm_ops import register_tvm_converter


@register_tvm_converter("amax.default")
def _amax(node, importer):
    from tvm import relax

    x = importer.env[node.args[0]]
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", ())
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    if isinstance(dims, int):
        dims = [dims]
    axis = [int(d) for d in dims] or None  # an empty dim list reduces over everything
    return importer.block_builder.emit(relax.op.max(x, axis=axis, keepdims=bool(keepdim)))


@register_tvm_converter("topk.default")
def _topk(node, importer):
    from tvm import relax
    from tvm.sym import Analyzer
    from tvm.tirx import IntImm

    args = importer.retrieve_args(node)
    k = args[1] if len(args) > 1 else node.kwargs.get("k", 1)
    if isinstance(k, (int, IntImm)):
        return importer._topk(node)  # the importer's converter (static k)
    x = args[0]
    dim = args[2] if len(args) > 2 else node.kwargs.get("dim", -1)
    largest = args[3] if len(args) > 3 else node.kwargs.get("largest", True)
    shape = importer.shape_of(x)
    axis = dim if dim >= 0 else len(shape) + dim
    if not Analyzer().can_prove_equal(k, shape[axis]):
        raise ValueError(f"topk with a symbolic k ({k}) is converted only as a full sort (k equal "
                         f"to the axis length {shape[axis]})")
    bb = importer.block_builder
    indices = bb.emit(relax.op.argsort(x, axis, bool(largest), dtype="int64"))
    values = bb.emit(relax.op.gather_elements(x, indices, axis=axis))
    return bb.emit(relax.Tuple([values, indices]))


def symbolic_slice_converter(node, importer):
    """aten.slice.Tensor for a stage exported with a symbolic token count (see module doc)."""
    import sys

    import tvm
    from torch.fx import Node
    from tvm import relax

    x = importer.env[node.args[0]]
    dim = node.args[1] if len(node.args) > 1 else 0
    start = node.args[2] if len(node.args) > 2 else None
    end = node.args[3] if len(node.args) > 3 else None
    step = node.args[4] if len(node.args) > 4 else 1
    start = importer.env[start] if isinstance(start, Node) else start
    end = importer.env[end] if isinstance(end, Node) else end
    symbolic = tvm.ir.is_prim_expr(start) or tvm.ir.is_prim_expr(end)
    if not symbolic or step != 1:
        return importer._slice(node)  # static bounds: the importer's converter
    shape = importer.shape_of(x)
    axis = dim if dim >= 0 else len(shape) + dim
    start = 0 if start is None else start
    end = shape[axis] if end is None or (isinstance(end, int) and end >= sys.maxsize) else end
    return importer.block_builder.emit(
        relax.op.strided_slice(x, [axis], [start], [end], [1], assume_inbound=True))
