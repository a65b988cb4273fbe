"""Run suite cells each in its own child process, so one crash or hang costs one cell.

On the GPU an AOTInductor CUDA package can segfault or hang while it loads, and a
torch.compile max-autotune build can run for minutes (benchmarks/results/nvidia-h100-80gb-hbm3/).
In one process any of these ends the whole run. Here each cell is
`python -X faulthandler -m vitopt.suite.cell_worker JOB RESULT` in a new session (its own process
group, so Inductor's compile workers go with it), under a time limit:

  ok          the child writes RESULT (vitopt.suite.runner.cell_payload): built, checked, timed
  crash/exit  killed by a signal (SIGSEGV, SIGABRT, the OOM killer's SIGKILL: "crash") or a
              non-zero exit ("exit", e.g. an uncaught exception) without RESULT: a failed record
              with `failure` = {reason, signal, exit_code, seconds, output_tail}
  timeout     past min(cell limit, what is left of the suite budget): the child dumps its Python
              stacks (faulthandler, 3 s before) and its process group is killed; reason "timeout"
  no-time     the suite budget left less than `min_cell_s`: not started, reason "no-time"
  skipped     a vitopt cell on a backend named in `skip_backends` (gpu_check.sh passes
              aotinductor when its diagnostic found no loader that opens a CUDA package)

The parent appends every child's output to `log_path` and passes the child's own progress lines
(prefixed "@@ ") to its log. Cost: one Python start, torch import and model build per cell
(a few seconds) on top of the cell's own work. The parent also builds each model once on the
CPU (for the FLOPs of the plain model). If the parent gets SIGTERM (gpu_check.sh's `timeout`), it
kills the running child's group first: the child's own session would not get the signal.
"""
from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

from vitopt.errors import ConfigError

#: the faulthandler stack dump comes this long before the parent kills a child that ran over
DUMP_BEFORE_KILL_S = 3.0
TAIL_LINES = 80
TAIL_CHARS = 4000
PROGRESS_PREFIX = "@@ "
#: test hook: "CELL=MODE[,CELL=MODE]" makes the child of that cell fail on purpose before it
#: builds anything; MODE is segv, abort, exit (os._exit(3)), hang or raise
FAULT_ENV = "VITOPT_SUITE_FAULT"


@dataclass
class Isolation:
    timeout_s: float = 600.0                 # the most one cell may take
    budget_s: Optional[float] = None         # the most the whole suite may take (None: no limit)
    min_cell_s: float = 20.0                 # a cell is not started with less left than this
    log_path: Optional[Path] = None          # every child's output, appended
    skip_backends: Dict[str, str] = field(default_factory=dict)   # backend -> why
    python: str = sys.executable
    started: float = field(default_factory=time.monotonic)

    @classmethod
    def for_matrix(cls, matrix, **overrides) -> "Isolation":
        overrides = {k: v for k, v in overrides.items() if v is not None}
        overrides.setdefault("timeout_s", matrix.cell_timeout_s)
        return cls(**overrides)

    def __post_init__(self):
        if self.timeout_s < 10:
            raise ConfigError(f"cell timeout {self.timeout_s} s is too short to start a cell; "
                              f"give at least 10 s")
        if self.budget_s is not None and self.budget_s <= 0:
            raise ConfigError(f"suite budget {self.budget_s} s must be positive")

    def left_s(self) -> Optional[float]:
        if self.budget_s is None:
            return None
        return self.budget_s - (time.monotonic() - self.started)


def parse_skip(values: List[str]) -> Dict[str, str]:
    """--skip-backend "NAME" or "NAME: why" -> {NAME: why}."""
    from vitopt.backends import BACKENDS
    skips = {}
    for value in values:
        name, _, why = value.partition(":")
        name = name.strip()
        if name not in BACKENDS:
            raise ConfigError(f"--skip-backend {value!r}: unknown backend {name!r}; known: "
                              f"{', '.join(BACKENDS)}")
        skips[name] = why.strip() or "skipped on request (--skip-backend)"
    return skips


def run_group_isolated(matrix, group_index: int, progress, log: Callable[[str], None],
                       isolation: Isolation, emit: Callable[[List[dict]], None]) -> List[dict]:
    """Every cell of group `group_index`, each in a child; `emit(records)` after each one."""
    from vitopt.suite.models import build_model
    from vitopt.suite.runner import _records, cell_from_payload, empty_cells, model_flops
    group = matrix.groups[group_index]
    model = build_model(group.model)          # CPU, for the FLOPs and the records' model fields
    base_flops = model_flops(model)
    log(f"{group.model}: {model.description}; {base_flops / 1e9:.2f} GFLOPs/image")
    cells, timings, records = [], {}, []
    for index, cell in enumerate(empty_cells(group)):
        payload = _run_or_skip(matrix, group_index, index, cell, isolation, log)
        if "failure" in payload:
            cell.error, cell.failure = payload["error"], payload["failure"]
            progress.step(f"{group.model} / {cell.name}: FAILED: {cell.error}")
        else:
            cell, cell_timings = cell_from_payload(cell, payload)
            for batch, found in cell_timings.items():
                merged = timings.setdefault(batch, {"timings": {}, "errors": {}})
                merged["timings"].update(found["timings"])
                merged["errors"].update(found["errors"])
            progress.step(f"{group.model} / {cell.name}: "
                          + (f"FAILED: {cell.error}" if cell.error else _summary(cell, timings)))
        cells.append(cell)
        records = _records(matrix, group, model, base_flops, cells, timings)
        emit(records)
    return records


def _summary(cell, timings: dict) -> str:
    parts = [f"b{b} {v['timings'][cell.name].median_ms:.2f} ms" for b, v in sorted(timings.items())
             if cell.name in v["timings"]]
    return "ok (" + ", ".join(parts) + ")" if parts else "built, not timed"


def _failure(reason: str, error: str, **details) -> dict:
    failure = {"reason": reason, "signal": None, "exit_code": None, "timeout_s": None,
               "seconds": None, "output_tail": ""}
    failure.update(details)
    return {"error": error, "failure": failure}


def _run_or_skip(matrix, group_index: int, index: int, cell, isolation: Isolation,
                 log: Callable[[str], None]) -> dict:
    backend = cell.config.backend if cell.config is not None else None
    if backend in isolation.skip_backends:
        why = isolation.skip_backends[backend]
        return _failure("skipped", f"skipped: {why}")
    limit = isolation.timeout_s
    left = isolation.left_s()
    if left is not None:
        if left < isolation.min_cell_s:
            return _failure("no-time", f"not run: {max(left, 0):.0f} s of the suite's "
                                       f"{isolation.budget_s:.0f} s budget left, less than the "
                                       f"{isolation.min_cell_s:.0f} s a cell needs to start")
        limit = min(limit, left)
    return run_child(matrix, group_index, index, cell.name, limit, isolation, log)


def run_child(matrix, group_index: int, index: int, name: str, limit: float,
              isolation: Isolation, log: Callable[[str], None]) -> dict:
    """One cell in a child process: its payload, or a failure payload."""
    with tempfile.TemporaryDirectory(prefix="vitopt-cell-") as tmp:
        job, result = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job.write_text(json.dumps({"matrix": matrix.to_dict(), "where": matrix.path or "matrix",
                                   "group": group_index, "cell": index, "name": name,
                                   "timeout_s": limit, "kill_at": time.time() + limit}))
        command = [isolation.python, "-X", "faulthandler", "-m", "vitopt.suite.cell_worker",
                   str(job), str(result)]
        started = time.monotonic()
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True,
                                 env={**os.environ, "PYTHONUNBUFFERED": "1"})
        tail = collections.deque(maxlen=TAIL_LINES)
        reader = threading.Thread(target=_pump, args=(child, name, isolation.log_path, tail, log),
                                  daemon=True)
        reader.start()
        timed_out = False
        with _kill_on_term(child):
            try:
                child.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                timed_out = True
                log(f"{name}: over its {limit:.0f} s limit; killing its process group")
            finally:
                _kill_group(child)
                child.wait()
        reader.join(timeout=10)
        seconds = round(time.monotonic() - started, 1)
        output = _tail_text(tail)
        code = child.returncode
        if not timed_out and result.exists():
            try:
                payload = json.loads(result.read_text())
            except ValueError as exc:
                payload = None
                log(f"{name}: unreadable result file ({exc})")
            if payload is not None:
                if code != 0:
                    log(f"{name}: the child wrote its result, then exited with {_exit_text(code)}")
                return payload
        if timed_out:
            return _failure("timeout", f"timed out after {limit:.0f} s (the cell's limit); "
                                       f"killed. Last output: {_last_line(tail)}",
                            timeout_s=round(limit, 1), seconds=seconds, output_tail=output,
                            exit_code=code, signal=_signal_name(code))
        return _failure("crash" if _signal_name(code) else "exit",
                        f"the cell's process died: {_exit_text(code)} after {seconds} s. "
                        f"Last output: {_last_line(tail)}",
                        exit_code=code, signal=_signal_name(code), seconds=seconds,
                        output_tail=output)


def _pump(child: subprocess.Popen, name: str, log_path: Optional[Path], tail, log) -> None:
    """Copy the child's output to log_path and the tail; its progress lines to log."""
    handle = open(log_path, "a", encoding="utf-8") if log_path else None
    try:
        if handle:
            handle.write(f"===== {name} =====\n")
        for raw in child.stdout:
            line = raw.decode("utf-8", errors="replace").rstrip("\n")
            tail.append(line)
            if handle:
                handle.write(line + "\n")
                handle.flush()
            if line.startswith(PROGRESS_PREFIX):
                log(f"  {line[len(PROGRESS_PREFIX):]}")
    finally:
        if handle:
            handle.close()


def _kill_group(child: subprocess.Popen) -> None:
    try:
        os.killpg(child.pid, signal.SIGKILL)   # the child's session: it and its workers
    except (ProcessLookupError, PermissionError):
        pass


class _kill_on_term:
    """While a child runs, SIGTERM to this process kills the child's group first."""

    def __init__(self, child: subprocess.Popen):
        self.child, self.previous = child, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.getsignal(signal.SIGTERM)

            def handler(signum, frame):
                _kill_group(self.child)
                raise SystemExit(128 + signum)
            signal.signal(signal.SIGTERM, handler)
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
        return False


def _signal_name(code: Optional[int]) -> Optional[str]:
    if code is None or code >= 0:
        return None
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def _exit_text(code: Optional[int]) -> str:
    name = _signal_name(code)
    return f"killed by {name} (exit {code})" if name else f"exit code {code}"


def _tail_text(tail) -> str:
    return "\n".join(tail)[-TAIL_CHARS:]


def _last_line(tail) -> str:
    """The line that says most: faulthandler's "Fatal Python error" with the crashing thread's
    innermost frame, else the last line that is not faulthandler's list of extension modules."""
    lines = [line.strip() for line in tail if line.strip()]
    fatal = next((line for line in reversed(lines) if line.startswith("Fatal Python error")), None)
    if fatal is not None:
        current = next((i for i, line in enumerate(lines)
                        if line.startswith("Current thread")), None)
        frame = (None if current is None else
                 next((line for line in lines[current + 1:] if line.startswith("File ")), None))
        return (fatal + (f"; innermost frame: {frame}" if frame else ""))[:400]
    for line in reversed(lines):
        if not line.startswith(("Extension modules", PROGRESS_PREFIX.strip())):
            return line[:300]
    return "(none)"
