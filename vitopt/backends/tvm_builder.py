"""A MetaSchedule builder whose worker processes live across build batches.

MetaSchedule's LocalBuilder starts a new process pool for every batch of candidates it builds
(TVM's comment: a memory leak in long-lived workers). Each new worker imports TVM and, on its
first build, parses every tensor intrinsic (`tvm.s_tir.tensor_intrin`): measured 11-14 s per
batch on a 2-core EPYC, against well under a second for building one tiny candidate. With
vitopt's round-robin budgets (a few trials per task per batch) that start-up was most of the
tuning time. This builder keeps one pool and lets TVM's pool replace each worker after
`MAX_WORKER_USES` builds, which bounds the leak TVM restarts for.

Builds run with the same registered functions LocalBuilder uses
("s_tir.meta_schedule.builder.default_build" / "default_export"), in the same worker
processes, with the same timeout and error reporting, so only the process lifetime differs.
"""
from __future__ import annotations

from typing import Callable, List, Optional

#: Builds one worker process serves before it is replaced by a fresh one.
MAX_WORKER_USES = 64
BUILD_FUNC = "s_tir.meta_schedule.builder.default_build"
EXPORT_FUNC = "s_tir.meta_schedule.builder.default_export"


def build_one(mod, target, params) -> str:
    """Runs in a worker: build `mod` for `target` and export it; returns the artifact path."""
    import tvm

    from tvm.s_tir.meta_schedule.utils import get_global_func_with_default_on_worker

    build = get_global_func_with_default_on_worker(BUILD_FUNC, None)
    export = get_global_func_with_default_on_worker(EXPORT_FUNC, None)
    if params is not None:
        params = tvm.runtime.load_param_dict(params)
    return export(build(mod, target, params))


def reused_worker_builder(max_workers: int, timeout_sec: float,
                          initializer: Optional[Callable[[], None]] = None):
    """A MetaSchedule Builder (a PyBuilder) whose pool of `max_workers` processes is started
    once and reused; each worker runs `initializer` once when it starts."""
    import tvm
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

    @derived_object
    class ReusedWorkerBuilder(PyBuilder):
        def __init__(self):
            super().__init__()
            self.pool = PopenPoolExecutor(max_workers=max_workers, timeout=timeout_sec,
                                          initializer=initializer,
                                          maximum_process_uses=MAX_WORKER_USES)

        def build(self, build_inputs) -> List["BuilderResult"]:
            jobs = [(b.mod, b.target,
                     None if b.params is None else tvm.runtime.save_param_dict(b.params))
                    for b in build_inputs]
            results = []
            for outcome in self.pool.map_with_error_catching(lambda job: build_one(*job), jobs):
                if outcome.status == StatusKind.COMPLETE:
                    results.append(BuilderResult(outcome.value, None))
                elif outcome.status == StatusKind.TIMEOUT:
                    results.append(BuilderResult(
                        None, f"vitopt builder: timed out, killed after {timeout_sec} s"))
                else:
                    results.append(BuilderResult(
                        None, f"vitopt builder: the build raised\n{outcome.value}"))
            return results

        def shutdown(self) -> None:
            self.pool.shutdown()

    return ReusedWorkerBuilder()
