"""TVM converter for the shift-add linear: `vitopt::shift_linear` -> call_tir to the TIR kernel.

Registered with vitopt.lower.tvm_ops (CONVERTER_MODULES lists this module), so
`from_exported_program(ep, custom_convert_map=custom_convert_map())` imports a graph with
ShiftLinear layers as
    x [..., K] -> reshape [M, K] -> call_tir(shiftadd, x, transpose(codes), scale) [M, N]
      -> reshape [..., N] -> add(bias)
where `shiftadd` is kernels/shiftadd_tir.py's PrimFunc with a symbolic row count (any batch),
marked with the function attribute "vitopt.kernel" = "shiftadd". The importer does not know
the target, so the kernel comes in unscheduled; before `tvm.compile`, the TVM backend runs
`schedule_shiftadd(mod, kind)` ("llvm" or "cuda"), which applies the schedule from
kernels/tuning/shiftadd_<kind>.json and marks the function scheduled (dlight and MetaSchedule
then leave it alone). The bias add stays a separate Relax op on purpose (see the kernel's
docstring: an FMA would break bit-exactness).
"""
from __future__ import annotations

from vitopt.lower.tvm_ops import register_tvm_converter

KERNEL_ATTR = "vitopt.kernel"


@register_tvm_converter("shift_linear.default")
def _shift_linear(node, importer):
    from tvm import relax, tirx

    from vitopt.kernels.shiftadd_tir import prim_func
    x, codes, scale, bias, act_bits, max_shift = importer.retrieve_args(node)
    bb = importer.block_builder
    shape = list(importer.shape_of(x))
    n, k = [int(d) for d in importer.shape_of(codes)]
    rows = shape[0]
    for dim in shape[1:-1]:
        rows = rows * dim
    func = prim_func(None, k, n, int(act_bits), int(max_shift)).with_attr(KERNEL_ATTR, "shiftadd")
    # Same shapes and settings give the same function (add_func dedups it); the block builder
    # names it, so drop the kernel's own global symbol.
    gv = bb.add_func(func.without_attr("global_symbol"),
                     f"shiftadd_{k}x{n}_a{int(act_bits)}s{int(max_shift)}")
    x2 = bb.emit(relax.op.reshape(x, relax.ShapeExpr([rows, k])))
    codes_t = bb.emit(relax.op.permute_dims(codes, [1, 0]))
    out = bb.emit(relax.call_tir(gv, [x2, codes_t, scale],
                                 relax.TensorType([rows, n], "float32")))
    out = bb.emit(relax.op.reshape(out, relax.ShapeExpr(shape[:-1] + [tirx.IntImm("int64", n)])))
    return bb.emit(relax.op.add(out, bias)) if bias is not None else out


def schedule_shiftadd(mod, kind: str):
    """Schedule every shift-add kernel of `mod` for target kind `kind` ("llvm", "cuda")."""
    from vitopt.kernels.shiftadd_tir import schedule
    updates = {}
    for gv, func in mod.functions.items():
        attrs = getattr(func, "attrs", None)
        if attrs is not None and KERNEL_ATTR in attrs and "tir.is_scheduled" not in attrs:
            updates[gv] = schedule(func, kind).with_attr("tir.is_scheduled", True)
    for gv, func in updates.items():
        mod[gv] = func
    return mod
