"""MetaSchedule tuning for the TVM backend, with a persistent tuning database that later compiles reuse.

    db_dir = database_dir(target, tuning_db=None)        # ~/.cache/vitopt/tvm/<target key>/
    info = tune_module(fused_mod, target, trials=200, db_dir=db_dir, log=print)
    exe = tvm.compile(fused_mod, target, relax_pipeline=...ApplyDatabase(db_dir)...)

Where the database lives: `tuning_db` (a folder) when given; else $VITOPT_CACHE_DIR/tvm, else
~/.cache/vitopt/tvm. Inside it one sub-folder per target, named by the target's kind, CPU or
arch and a hash of the whole target dict, holding MetaSchedule's JSON database
(database_workload.json, database_tuning_record.json) and target.json. Records are keyed by
workload (MetaSchedule's structural hash of each fused TIR function) within that target folder,
so a second compile of the same model for the same target finds every task and tunes nothing.

What tune_module does: extract the tuning tasks (fused TIR functions with static shapes) of a
module that has been legalized and fused (`prepare` in tvm.py), keep the GEMM-like ones
(ANCHORS: matmul, conv2d, dense; the rest keep TVM's default schedules), split them into tasks the
database already has a record for (reused) and new ones, and tune only the new ones with a
total budget of `trials` measured candidates (at most ceil(trials / new tasks) each, round
robin). Search: MetaSchedule's evolutionary search over the post-order-apply design space,
with a population sized to the trials per task (population_size). Builds run in worker
processes that live for the whole tuning run (tvm_builder).
Cost model: "random" (MetaSchedule's RandomModel), because the default XGBoost model needs the
xgboost package, which vitopt does not install; with the small budgets used here the ranking
model matters little: every candidate the search picks is built and timed (LocalBuilder,
LocalRunner on this machine: llvm here, CUDA on the GPU machine). Progress goes to `log` after
each measured batch: task, trials so far, best time.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

from vitopt.backends.tvm_builder import reused_worker_builder
from vitopt.errors import ConfigError, LoweringError

CACHE_ENV = "VITOPT_CACHE_DIR"
COST_MODEL = "random"
BUILD_TIMEOUT_S = 300
RUN_TIMEOUT_S = 120
#: Tasks worth tuning: the GEMM-like anchors (linears, attention matmuls, the patch conv).
#: Elementwise, reshape and reduction tasks keep TVM's default schedule; a trial spent on them
#: buys little, and every trial costs a full LLVM build.
ANCHORS = ("matmul", "conv2d", "dense")
Log = Callable[[str], None]


def cache_root() -> Path:
    """$VITOPT_CACHE_DIR/tvm, else ~/.cache/vitopt/tvm."""
    base = os.environ.get(CACHE_ENV, "").strip()
    return Path(base).expanduser() / "tvm" if base else Path.home() / ".cache" / "vitopt" / "tvm"


def target_key(target: Dict[str, object]) -> str:
    """A folder name for `target`: readable prefix + hash of the whole dict."""
    digest = hashlib.sha256(json.dumps(target, sort_keys=True).encode()).hexdigest()[:12]
    what = target.get("arch") or target.get("mcpu") or "generic"
    return f"{target['kind']}-{what}-{digest}"


def database_dir(target: Dict[str, object], tuning_db: Optional[str] = None) -> Path:
    """The database folder for `target` (created, with target.json written beside the records)."""
    root = Path(tuning_db).expanduser() if tuning_db else cache_root()
    if root.exists() and not root.is_dir():
        raise ConfigError(f"the tuning database {root} is a file, not a folder; pass a folder "
                          f"with --tuning-db or remove the file")
    folder = root / target_key(target)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "target.json").write_text(json.dumps(target, indent=2, sort_keys=True),
                                            encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot create the tuning database folder {folder}: {exc}; pass a "
                          f"writable folder with --tuning-db or set ${CACHE_ENV}") from exc
    return folder


def open_database(folder: Path):
    from tvm.s_tir import meta_schedule as ms

    return ms.database.JSONDatabase(work_dir=str(folder), module_equality="structural")


def extract_tasks(mod, target: Dict[str, object]):
    """The tuning tasks of a legalized and fused module (static-shape TIR functions only)."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.target import Target

    return list(ms.relax_integration.extract_tasks(mod, Target(target)))


def split_tasks(tasks, database, target: Dict[str, object]):
    """(tasks without a record in the database, tasks with one)."""
    from tvm.target import Target

    tvm_target = Target(target)
    new, known = [], []
    for task in tasks:
        record = database.query_tuning_record(task.dispatched[0], tvm_target, task.task_name)
        (known if record is not None else new).append(task)
    return new, known


def tune_module(mod, target: Dict[str, object], trials: int, db_dir: Path,
                log: Optional[Log] = None) -> dict:
    """Tune the new tasks of `mod` for `target` into the database at `db_dir`; return a record:
    {"trials", "new_tasks", "reused_tasks", "trials_run", "seconds", "database", "cost_model"}."""
    if not isinstance(trials, int) or trials < 0:
        raise ConfigError(f"tune_trials must be an integer >= 0, got {trials!r}")
    log = log or (lambda message: None)
    started = time.perf_counter()
    tasks = [t for t in extract_tasks(mod, target) if any(a in t.task_name for a in ANCHORS)]
    database = open_database(db_dir)
    new, known = split_tasks(tasks, database, target)
    progress = _Progress(log, [t.task_name for t in new])
    if trials > 0 and new:
        per_task = max(1, math.ceil(trials / len(new)))
        log(f"tuning {len(new)} new tasks with MetaSchedule ({trials} trials in all, at most "
            f"{per_task} each; {len(known)} tasks reused from {db_dir})")
        _run_tuning(new, target, trials, per_task, database, progress)
    seconds = time.perf_counter() - started
    tuned = len(new) if trials > 0 else 0
    log(f"tuned {tuned} new tasks ({progress.trials} trials) / reused {len(known)} from the "
        f"database in {seconds:.1f}s" + ("" if trials > 0 or not new else
                                         f"; {len(new)} tasks untuned (tune_trials is 0)"))
    return {"trials": trials, "tasks": len(tasks), "new_tasks": tuned,
            "untuned_tasks": len(new) - tuned, "reused_tasks": len(known),
            "trials_run": progress.trials, "seconds": round(seconds, 2),
            "database": str(db_dir), "cost_model": COST_MODEL}


def _run_tuning(tasks, target: Dict[str, object], trials: int, per_task: int, database,
                progress: "_Progress") -> None:
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.measure_callback import MeasureCallback

    with tempfile.TemporaryDirectory(prefix="vitopt-ms-") as work_dir:
        contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
            tasks, work_dir, strategy=search_strategy(per_task),
            num_threads=max(1, int(target.get("num-cores", 1) or 1)), seed=0)
        callbacks = list(MeasureCallback.create("default")) + [progress.callback()]
        workers = max(1, int(target.get("num-cores", 1) or 1))
        # A builder worker's first build imports tvm.s_tir.tensor_intrin (TVMScript-parses every
        # tensor intrinsic: tens of seconds on a busy machine). Under the default 30 s timeout
        # the worker is killed mid-import and every build "times out"; so import it when the
        # worker starts, give builds and runs more time, and keep the workers for the whole
        # run (tvm_builder; LocalBuilder would start them again for every batch).
        builder = reused_worker_builder(workers, BUILD_TIMEOUT_S, load_tensor_intrinsics)
        runner = ms.runner.LocalRunner(timeout_sec=RUN_TIMEOUT_S)
        try:
            ms.tune.tune_tasks(tasks=contexts, task_weights=weights, work_dir=work_dir,
                               builder=builder, runner=runner,
                               max_trials_global=trials, max_trials_per_task=per_task,
                               num_trials_per_iter=min(per_task, 32), database=database,
                               cost_model=COST_MODEL, measure_callbacks=callbacks,
                               task_scheduler="round-robin")
        except Exception as exc:  # MetaSchedule raises TVMError/RuntimeError from C++
            raise LoweringError(f"MetaSchedule tuning failed for {target['kind']}: "
                                f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1:]}") \
                from exc
        finally:
            builder.shutdown()


def population_size(per_task: int) -> int:
    """Schedules the evolutionary search samples and evolves per round: 16 per trial it will
    measure, between 64 and MetaSchedule's default 512. The population is ranked by the cost
    model, which is random here (COST_MODEL), so a population far larger than the trials taken
    from it buys no better picks; sampling 512 schedules per round was ~90% of tuning time at
    one trial per task (tiny ViT, 2-core EPYC). Budgets of 32+ trials per task keep 512."""
    return min(512, max(64, 16 * per_task))


def search_strategy(per_task: int):
    from tvm.s_tir import meta_schedule as ms

    population = population_size(per_task)
    return ms.search_strategy.EvolutionarySearch(population_size=population,
                                                 init_min_unmeasured=min(50, population // 2))


def load_tensor_intrinsics() -> None:
    """Builder-worker initializer (module level, so the worker can unpickle it). The worker
    process only builds, so it keeps the fast `inspect.stack` for good (tvm_speedups: parsing
    the intrinsics' TVMScript is otherwise minutes with torch imported)."""
    import inspect

    from vitopt.backends.tvm_speedups import _stack

    inspect.stack = _stack
    import tvm.s_tir.tensor_intrin  # noqa: F401  (registers the intrinsics)


class _Progress:
    """Counts measured trials and logs each batch (task, trials so far, best time)."""

    def __init__(self, log: Log, names: List[str]):
        self.log, self.names, self.trials = log, names, 0
        self.per_task: Dict[int, int] = {}
        self.best: Dict[int, float] = {}

    def callback(self):
        from tvm.ir.utils import derived_object
        from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

        progress = self

        @derived_object
        class _Callback(PyMeasureCallback):
            def apply(self, task_scheduler, task_id, measure_candidates, builder_results,
                      runner_results):
                progress.update(task_id, runner_results)

        return _Callback()

    def update(self, task_id: int, runner_results) -> None:
        task_id = int(task_id)
        self.trials += len(runner_results)
        self.per_task[task_id] = self.per_task.get(task_id, 0) + len(runner_results)
        for result in runner_results:
            if result.error_msg is None and result.run_secs:
                ms = 1e3 * sum(float(s) for s in result.run_secs) / len(result.run_secs)
                self.best[task_id] = min(self.best.get(task_id, math.inf), ms)
        best = self.best.get(task_id)
        name = self.names[task_id] if task_id < len(self.names) else str(task_id)
        self.log(f"  tuning task {task_id + 1}/{len(self.names)} {name}: "
                 f"{self.per_task[task_id]} trials, best "
                 + (f"{best:.3f} ms" if best is not None else "none valid yet")
                 + f" ({self.trials} trials in all)")
