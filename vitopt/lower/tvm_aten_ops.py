"""Converters for ATen ops that vitopt's IR emits and TVM 0.27's exported-program importer lacks.

`amax.default` (a max over dimensions, no indices): token merging (merge_tokens' bipartite
matching keeps each token's best similarity) reduces with it. It is `relax.op.max` over the
same axes.
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
