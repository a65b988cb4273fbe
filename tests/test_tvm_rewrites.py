"""vitopt/backends/tvm_rewrites.py: a weight broadcast over a symbolic batch is dropped before a
matmul; same values on llvm; broadcasts that do more than add batch dimensions stay."""
import numpy as np
import pytest

tvm = pytest.importorskip("tvm", reason="the TVM backend needs apache-tvm (pip install vitopt[tvm])")

from tvm import relax, tirx  # noqa: E402

from vitopt.backends.tvm_rewrites import unbroadcast_matmul_weights  # noqa: E402


def module(weight_shape, broadcast_tail):
    """main(x [b, 5, 4]) = matmul(x, broadcast_to(w, [b, *broadcast_tail])), w a constant."""
    batch = tirx.Var("b", "int64")
    x = relax.Var("x", relax.TensorType([batch, 5, 4], "float32"))
    weight = relax.const(np.random.default_rng(0).standard_normal(weight_shape).astype("float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            wide = bb.emit(relax.op.broadcast_to(weight, relax.ShapeExpr([batch, *broadcast_tail])))
            out = bb.emit_output(bb.emit(relax.op.matmul(x, wide)))
        bb.emit_func_output(out)
    return bb.get()


def run(mod, x):
    library = tvm.compile(mod, target=tvm.target.Target({"kind": "llvm"}))
    vm = relax.VirtualMachine(library, tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


def test_weight_broadcast_is_dropped_and_values_stay():
    before = module((4, 3), [4, 3])
    after = unbroadcast_matmul_weights(before)
    assert "broadcast_to" in before.script() and "broadcast_to" not in after.script()
    x = np.random.default_rng(1).standard_normal((3, 5, 4)).astype("float32")
    np.testing.assert_allclose(run(after, x), run(before, x), rtol=1e-6, atol=1e-6)


def test_a_broadcast_that_widens_the_weight_stays():
    before = module((1, 3), [4, 3])  # rows repeated: not a batch-only broadcast
    after = unbroadcast_matmul_weights(before)
    assert "broadcast_to" in after.script()
