"""The fast `inspect.stack` stand-in gives TVMScript's parser what the real one gives."""
import inspect

import pytest

from vitopt.backends.tvm_speedups import _stack, fast_inspect_stack


def _both():
    return inspect.stack(), _stack()


def test_same_frames_names_and_lines_as_inspect_stack():
    real, fast = _both()
    # _both's own frame is first in both; compare every frame.
    assert len(real) == len(fast)
    for r, f in zip(real, fast):
        assert (f.frame, f.filename, f.lineno, f.function) == (r.frame, r.filename, r.lineno, r.function)
        assert f.code_context == r.code_context


def test_patch_is_scoped_and_nests():
    original = inspect.stack
    with fast_inspect_stack():
        assert inspect.stack is _stack
        with fast_inspect_stack():
            assert inspect.stack is _stack
        assert inspect.stack is _stack
    assert inspect.stack is original


def test_tvmscript_parses_under_the_patch():
    tvm = pytest.importorskip("tvm")
    from tvm.script import tirx as T

    with fast_inspect_stack():
        @T.prim_func
        def double(a: T.Buffer((4,), "float32"), b: T.Buffer((4,), "float32")):
            for i in range(4):
                b[i] = a[i] * T.float32(2)

    assert isinstance(double, tvm.tirx.PrimFunc)
