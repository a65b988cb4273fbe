"""Make TVM's Python-side scheduling fast inside a process that has torch loaded.

TVMScript's parser (`T.prim_func`, used by dlight rules and tensor intrinsics while they
schedule) calls `inspect.stack()` to find the caller's variables. `inspect.stack()` resolves
every frame's source file through `inspect.getmodule`, which scans all of `sys.modules` per
call: with torch, timm and TVM loaded (~2,500 modules) dlight's `gpu.Matmul` rule spent
95-300 s on one fused DeiT-S linear on this 2-core machine, 98 % of it in `getmodule`
(cProfile). The parser only needs each frame, its function name and one line of source, so
`fast_inspect_stack()` swaps in an equivalent that reads the line through `linecache`:
the same rule then takes 2.4 s (measured 2026-11-26, TVM 0.27, CUDA sm_90 target).

    with fast_inspect_stack():
        mod = dl.ApplyDefaultSchedule(...)(mod)
"""
from __future__ import annotations

import contextlib
import inspect
import linecache
import sys
import threading
from typing import Iterator, List

_LOCK = threading.RLock()  # re-entrant: nested blocks restore in order


def _stack(context: int = 1) -> List[inspect.FrameInfo]:
    """`inspect.stack(context)` without the per-frame module lookup (code_context: one line)."""
    frames = []
    frame = sys._getframe(1)
    while frame is not None:
        filename, lineno = frame.f_code.co_filename, frame.f_lineno
        code_context, index = None, None
        if context > 0:
            line = linecache.getline(filename, lineno)
            if line:
                code_context, index = [line], 0
        frames.append(inspect.FrameInfo(frame, filename, lineno, frame.f_code.co_name,
                                        code_context, index))
        frame = frame.f_back
    return frames


@contextlib.contextmanager
def fast_inspect_stack() -> Iterator[None]:
    """Within the block, `inspect.stack` is the fast equivalent (restored afterwards)."""
    with _LOCK:
        original = inspect.stack
        inspect.stack = _stack
        try:
            yield
        finally:
            inspect.stack = original
