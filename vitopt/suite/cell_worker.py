"""The child process of an isolated suite cell (vitopt/suite/isolation.py):

    python -X faulthandler -m vitopt.suite.cell_worker JOB.json RESULT.json

JOB holds the matrix (Matrix.to_dict), the group and cell index and the time limit. The child
builds, checks and times that one cell (vitopt.suite.runner.run_cell), writes RESULT atomically
and leaves with os._exit(0), skipping interpreter and CUDA teardown (which can hang or crash
after the work is done). Progress lines go to stdout prefixed "@@ "; faulthandler dumps every
thread's stack shortly before the parent's limit, so a hang shows where it hung.

$VITOPT_SUITE_FAULT ("CELL=MODE,..."; MODE segv, abort, exit, hang, raise) makes the named
cell fail on purpose before any work: it exists for tests/test_bench_suite_isolation.py.
"""
from __future__ import annotations

import faulthandler
import json
import os
import signal
import sys
import time
from pathlib import Path

from vitopt.suite.isolation import DUMP_BEFORE_KILL_S, FAULT_ENV, PROGRESS_PREFIX


def _log(message: str) -> None:
    print(PROGRESS_PREFIX + message, flush=True)


def inject_fault(name: str) -> None:
    """Fail on purpose when $VITOPT_SUITE_FAULT names this cell (tests only)."""
    for item in filter(None, os.environ.get(FAULT_ENV, "").split(",")):
        cell, _, mode = item.rpartition("=")
        if cell != name:
            continue
        print(f"{FAULT_ENV}: failing cell {name!r} on purpose ({mode})", flush=True)
        if mode == "segv":
            os.kill(os.getpid(), signal.SIGSEGV)
        elif mode == "abort":
            os.abort()
        elif mode == "exit":
            os._exit(3)
        elif mode == "hang":
            time.sleep(10**6)
        elif mode == "raise":
            raise RuntimeError(f"injected failure for cell {name!r}")
        else:
            raise SystemExit(f"{FAULT_ENV}: unknown mode {mode!r}; use segv, abort, exit, hang "
                             f"or raise")


def main(argv) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    job = json.loads(Path(argv[0]).read_text())
    result = Path(argv[1])
    faulthandler.enable()
    dump_in = job["kill_at"] - DUMP_BEFORE_KILL_S - time.time()   # the imports took some already
    if dump_in > 0:
        faulthandler.dump_traceback_later(dump_in, exit=False)
    inject_fault(job["name"])
    import torch
    from vitopt.suite.matrix import parse_matrix
    from vitopt.suite.runner import run_cell
    matrix = parse_matrix(job["matrix"], job["where"])
    if matrix.threads:
        torch.set_num_threads(matrix.threads)
    payload = run_cell(matrix, matrix.groups[job["group"]], job["cell"], _log)
    partial = result.with_suffix(".partial")
    partial.write_text(json.dumps(payload))
    partial.replace(result)
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
