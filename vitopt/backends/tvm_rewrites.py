"""Relax rewrites the TVM backend applies after import, before precision and legalization.

`unbroadcast_matmul_weights`: torch's decomposition of a linear on a 3-d input that is not
contiguous (the attention output after its head transpose, `Attention.project_heads`) is
expand + bmm, which the importer gives as `matmul(x, broadcast_to(W, [B, K, N]))`. With a
symbolic batch that broadcast cannot be folded at build time, so every call would copy the
weight once per image and, in fp16, cast the copies: for DeiT-S at batch 64, 12 x [64, 384,
384] copies (at least 0.45 GB of memory traffic per call, written and read back even if TVM
fuses the broadcast and the cast) and a batched GEMM in place of a plain one. Relax's matmul
broadcasts a 2-d right-hand side by itself, so the rewrite drops the broadcast:
`matmul(x, W)`. The result is the same values.
"""
from __future__ import annotations


def unbroadcast_matmul_weights(mod):
    """Every `matmul(a, broadcast_to(w, [..., K, N]))` with a 2-d `w` of shape [K, N] becomes
    `matmul(a, w)`; the broadcasts left unused are removed."""
    from tvm import relax
    from tvm.ir import Op

    matmul, broadcast = Op.get("relax.matmul"), Op.get("relax.broadcast_to")

    @relax.expr_functor.mutator
    class _Rewrite(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if call.op != matmul or not isinstance(call.args[1], relax.Var):
                return call
            source = self.lookup_binding(call.args[1])
            if not isinstance(source, relax.Call) or source.op != broadcast:
                return call
            weight = source.args[0]
            shape, target = getattr(weight.ty, "shape", None), getattr(source.ty, "shape", None)
            if shape is None or target is None or len(shape) != 2 or len(target) < 2:
                return call
            if not all(_same(a, b) for a, b in zip(shape, list(target)[-2:])):
                return call
            return relax.op.matmul(call.args[0], weight, out_dtype=call.attrs.out_dtype)

    rewrite = _Rewrite(mod)
    for gvar, func in mod.functions_items():
        if isinstance(func, relax.Function):
            rewrite.builder_.update_func(gvar, rewrite.visit_expr(func))
    return relax.transform.DeadCodeElimination()(rewrite.builder_.get())


def _same(a, b) -> bool:
    from tvm.sym import Analyzer

    return bool(Analyzer().can_prove_equal(a, b))
