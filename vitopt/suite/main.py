"""One call that `vitopt bench-suite` and `benchmarks/suite.py` share: load a matrix, run it,
write the results, optionally regenerate the README's headline table from them."""
from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from vitopt.suite.machine import machine_info, machine_slug
from vitopt.suite.matrix import load_matrix

QUICK_MATRIX = "benchmarks/matrix/cpu-quick.json"


def _print(message: str) -> None:
    print(message, flush=True)


def default_out(device: str, threads: Optional[int]) -> Path:
    """benchmarks/results/<machine>/suite (relative to the working directory)."""
    return Path("benchmarks") / "results" / machine_slug(machine_info(threads, device)) / "suite"


def run_matrix_file(matrix: Optional[str], *, out: Optional[str] = None, quick: bool = False,
                    models: Sequence[str] = (), readme: Optional[str] = None,
                    log: Callable[[str], None] = _print, argv: Optional[List[str]] = None) -> Path:
    """Run `matrix` (default with --quick: cpu-quick.json), write under `out` (default
    benchmarks/results/<machine>/suite), and update `readme`'s headline when given."""
    from vitopt.suite.outputs import write_outputs
    from vitopt.suite.runner import run_suite
    from vitopt.suite.tables import update_readme
    from vitopt.errors import ConfigError
    if matrix is None:
        if not quick:
            raise ConfigError("name a matrix file (benchmarks/matrix/*.json) or pass --quick")
        matrix = QUICK_MATRIX
    spec = load_matrix(matrix)
    if models:
        spec = spec.only(list(models))
    if quick:
        spec = spec.quick()
    command = " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv))
    result = run_suite(spec, log=log, command=command)
    target = Path(out) if out else default_out(spec.device, spec.threads)
    for path in write_outputs(result, target):
        log(f"wrote {path}")
    if readme:
        update_readme(readme, target / "suite.json", repo_root=Path(readme).parent)
        log(f"updated the headline table in {readme}")
    return target
