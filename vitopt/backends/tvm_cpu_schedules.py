"""Default schedules for the TIR functions MetaSchedule does not tune on CPU (llvm).

vitopt tunes only the GEMM-like tasks (tvm_tuning.ANCHORS); the rest (GELU, softmax,
LayerNorm, reshapes) used to keep TVM's unscheduled form, one serial scalar loop nest. On
DeiT-S/16 batch 1 after 640 trials those untuned functions were 41 % of the time (GELU alone
27 %; benchmarks/results/cpu-amd-epyc-2c/tvm_models.rerun.md). `cpu_default_schedules()`
returns a dlight pass that schedules them, function by function, leaving tuned ones alone:

  * dlight's own CPU rules (tvm.s_tir.dlight.cpu): Reduction (softmax, LayerNorm: parallel
    over rows, vectorized elementwise parts) and GEMV;
  * `CPUInjective` below, for functions whose every block is elementwise/reshape: producers
    inlined into the output block, whose loops are fused and split into a parallel outer loop
    and a vectorized inner loop of one vector register.
"""
from __future__ import annotations


def _injective_rule():
    """CPUInjective, built lazily (tvm is an optional engine)."""
    from tvm import s_tir, tirx
    from tvm.s_tir.dlight.analysis import normalize_prim_func
    from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
    from tvm.target.codegen import llvm_get_vector_width

    class CPUInjective(CPUScheduleRule):
        """Every block spatial: inline producers, fuse the output loops, parallel x vector."""

        def apply(self, func, target, _):
            if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
                return None
            sch = s_tir.Schedule(func)
            infos = normalize_prim_func(sch)
            if not infos or not all(info.is_injective() for info in infos):
                return None
            for info in reversed(infos[:-1]):
                try:
                    sch.compute_inline(info.block_rv)
                except Exception:  # noqa: BLE001  (TVM raises ScheduleError subclasses)
                    return None  # an unusual producer: leave the function as it was
            block = infos[-1].block_rv
            loops = sch.get_loops(block)
            if not loops:
                return None
            fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
            store = sch.get(block).writes
            bits = store[0].source.dtype.bits if store else 32
            lanes = max(2, max(llvm_get_vector_width(target), 128) // max(bits, 8))
            outer, inner = sch.split(fused, factors=[None, lanes])
            sch.parallel(outer)
            sch.vectorize(inner)
            return sch

    return CPUInjective()


def cpu_default_schedules():
    """A Relax pass: dlight CPU rules plus CPUInjective on every function not yet scheduled."""
    from tvm.s_tir import dlight

    return dlight.ApplyDefaultSchedule(dlight.cpu.Reduction(), dlight.cpu.GEMV(), _injective_rule())


def fast_math_pass():
    """A Relax module pass (run before LegalizeOps): GELU (erf and tanh forms), softmax, exp,
    erf and tanh become TVM's polynomial fast_* forms, which LLVM vectorizes. The libm calls
    they replace run one element at a time: GELU's erf alone was 36 of 99 ms of tuned DeiT-S
    batch 1. Relative error about 1e-6 (TVM's fast_exp / fast_erf), inside the fp32 tolerance.
    TVM's own FastMathTransform covers softmax/exp/erf/tanh but not relax.nn.gelu."""
    import tvm
    from tvm import relax, topi
    from tvm.relax import PyExprMutator, expr_functor

    def gelu(x):  # 0.5 x (1 + erf(x / sqrt 2))
        return topi.multiply(topi.multiply(x, 0.5),
                             topi.add(topi.fast_erf(topi.multiply(x, 0.7071067811865476)), 1.0))

    def gelu_tanh(x):  # 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))
        inner = topi.multiply(topi.add(x, topi.multiply(topi.multiply(topi.multiply(x, x), x),
                                                        0.044715)), 0.7978845608028654)
        return topi.multiply(topi.multiply(x, 0.5), topi.add(topi.fast_tanh(inner), 1.0))

    rewrites = {"relax.nn.gelu": gelu, "relax.nn.gelu_tanh": gelu_tanh, "relax.exp": topi.fast_exp,
                "relax.erf": topi.fast_erf, "relax.tanh": topi.fast_tanh}

    @expr_functor.mutator
    class FastMath(PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            name = call.op.name if isinstance(call.op, tvm.ir.Op) else None
            if name in rewrites:
                return self.builder_.call_te(rewrites[name], call.args[0])
            if name == "relax.nn.softmax":
                return self.builder_.call_te(topi.nn.fast_softmax, call.args[0], call.attrs.axis)
            return call

    @tvm.transform.module_pass(opt_level=0, name="VitoptFastMath")
    def fast_math(mod, _ctx):
        mutator = FastMath(mod)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                mutator.builder_.update_func(gv, mutator.visit_expr(func))
        return mutator.builder_.get()

    return fast_math
