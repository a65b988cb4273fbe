"""Open a freshly built AOTInductor package in a child process before this process opens it.

Why: on the H100 machine we measured (torch 2.11.0+cu130, driver 580.159.04), every way of
opening an AOTInductor CUDA package crashed or hung, also for torch's own two-layer MLP built
with `torch._inductor.aoti_compile_and_package` and no vitopt code (benchmarks/GPU.md, run 4):
a segfault inside `AOTIModelPackageLoader` in the process that built the package, a segfault in
`AOTIModelContainerRunnerCuda`, a hang of more than 30 s in a fresh process. A segfault cannot be
caught, so `compile_model` would take the user's process down with it. This check opens the
package and runs one batch in a child process first; a crash, hang or error there becomes an
`EngineLoadError`, and `compile_model` then builds with the target's next backend (when the
backend was not asked for by name) or reports why.

Run for CUDA packages only (a CPU package has loaded wherever we built one); the child costs a
torch import and a CUDA context, a few seconds. Early-exit segments (several packages with token
inputs) are not checked this way yet: they are opened in the compiling process. Environment:
  VITOPT_AOTI_LOAD_CHECK   "0": skip the check; "always": also for CPU packages (tests)
  VITOPT_AOTI_LOAD_CHECK_S the child's time limit in seconds (default 90)

    python -m vitopt.backends.aoti_load_check DIR PRECISION C H W FILE...   # the child
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from vitopt.errors import ConfigError, EngineLoadError

CHECK_ENV, LIMIT_ENV = "VITOPT_AOTI_LOAD_CHECK", "VITOPT_AOTI_LOAD_CHECK_S"
DEFAULT_LIMIT_S = 90.0
OK_LINE = "@@ aoti package opened and ran"
#: tests: the child kills itself with SIGSEGV where it would open the package
CRASH_ENV = "VITOPT_AOTI_LOAD_CHECK_TEST_CRASH"


def wanted(device: str) -> bool:
    """Whether a package built for `device` is checked (see the module docstring)."""
    setting = os.environ.get(CHECK_ENV, "").strip().lower()
    if setting == "0":
        return False
    return device == "cuda" or setting == "always"


def check_opens_in_child(out_dir: Path, files: Sequence[str], precision: str,
                         image_shape: Sequence[int]) -> None:
    """Open the package in a child process and run a batch of 2; EngineLoadError if that fails."""
    import torch

    limit = _limit_s()
    command = [sys.executable, "-X", "faulthandler", "-m", __name__, str(out_dir), precision,
               *[str(int(n)) for n in image_shape], *files]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
    try:
        output, _ = child.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        _kill_group(child.pid)  # with whatever it started (Inductor's compile workers)
        output, _ = child.communicate()
        raise EngineLoadError("aotinductor", _message(
            torch.__version__, f"did not finish in {limit:g} s", output or ""))
    output = output or ""
    if child.returncode == 0 and OK_LINE in output:
        return
    if child.returncode < 0:
        how = f"was killed by {_signal_name(-child.returncode)}"
    else:
        how = f"failed (exit code {child.returncode})"
    raise EngineLoadError("aotinductor", _message(torch.__version__, how, output))


def _message(torch_version: str, how: str, output: str) -> str:
    tail = " | ".join(line.strip() for line in output.strip().splitlines()[-4:] if line.strip())
    return (f"torch {torch_version} built the AOTInductor package, but opening it in a fresh "
            f"process {how}" + (f" ({tail[:400]})" if tail else "") + ". torch's own minimal "
            f"AOTInductor CUDA package failed the same way on the H100 image we measured "
            f"(benchmarks/GPU.md): a torch/driver problem, not the model. Build with another "
            f"backend (--backend tvm), or set {CHECK_ENV}=0 to skip this check")


def _limit_s() -> float:
    raw = os.environ.get(LIMIT_ENV, "").strip()
    if not raw:
        return DEFAULT_LIMIT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise ConfigError(f"${LIMIT_ENV} must be a number of seconds > 0, got {raw!r}")
    return value


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


# --- the child -----------------------------------------------------------------------------
def main(argv: Optional[List[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 6:
        print("usage: python -m vitopt.backends.aoti_load_check DIR PRECISION C H W FILE...",
              file=sys.stderr)
        return 2
    out_dir, precision, shape, files = Path(args[0]), args[1], [int(n) for n in args[2:5]], args[5:]
    import numpy as np

    from vitopt.backends import get_backend

    if os.environ.get(CRASH_ENV):
        os.kill(os.getpid(), signal.SIGSEGV)
    engine = get_backend("aotinductor").load(out_dir, files, precision=precision)
    output = np.asarray(engine.run(np.zeros((2, *shape), dtype=np.float32)))
    if output.shape[0] != 2 or not np.isfinite(output).all():
        print(f"the package ran but returned {output.shape} with non-finite values", flush=True)
        return 1
    print(OK_LINE, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
