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
                    log: Callable[[str], None] = _print, argv: Optional[List[str]] = None,
                    isolate: bool = False, budget_s: Optional[float] = None,
                    cell_timeout_s: Optional[float] = None,
                    skip_backends: Sequence[str] = ()) -> Path:
    """Run `matrix` (default with --quick: cpu-quick.json), write under `out` (default
    benchmarks/results/<machine>/suite), and update `readme`'s headline when given.

    Cells run isolated, each in its own process (vitopt/suite/isolation.py), on cuda and with
    `isolate`; then `budget_s` bounds the whole run, `cell_timeout_s` one cell (default: the
    matrix's cell_timeout_s), `skip_backends` ("NAME" or "NAME: why") records those backends'
    vitopt cells as skipped, and suite.json + suite.md are rewritten after every cell."""
    from vitopt.suite.isolation import Isolation, parse_skip
    from vitopt.suite.outputs import write_outputs, write_partial
    from vitopt.suite.runner import run_suite
    from vitopt.suite.tables import update_readme
    spec = _load(matrix, quick, models)
    target = Path(out) if out else default_out(spec.device, spec.threads)
    isolation = None
    if isolate or spec.device == "cuda":
        isolation = Isolation.for_matrix(spec, timeout_s=cell_timeout_s, budget_s=budget_s,
                                         skip_backends=parse_skip(list(skip_backends)),
                                         log_path=target / "cells.log")
        target.mkdir(parents=True, exist_ok=True)
        isolation.log_path.write_text("")
    elif budget_s is not None or cell_timeout_s is not None or skip_backends:
        from vitopt.errors import ConfigError
        raise ConfigError("--budget-s, --cell-timeout-s and --skip-backend apply to isolated "
                          "cells: add --isolate (cuda matrices always isolate)")
    command = " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv))
    result = run_suite(spec, log=log, command=command, isolation=isolation,
                       on_progress=(lambda partial: write_partial(partial, target))
                       if isolation is not None else None)
    for path in write_outputs(result, target):
        log(f"wrote {path}")
    if readme:
        update_readme(readme, target / "suite.json", repo_root=Path(readme).parent)
        log(f"updated the headline table in {readme}")
    return target


def _load(matrix: Optional[str], quick: bool, models: Sequence[str]):
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
    return spec


def check_matrix_file(matrix: str, *, quick: bool = False, models: Sequence[str] = (),
                      build_models: bool = True, log: Callable[[str], None] = _print) -> int:
    """Load `matrix` (every cell checked against its device, as load_matrix does), list its
    cells and, with `build_models`, build and trace each model on this CPU. Runs nothing on a
    GPU: a dry run before spending GPU time. Returns the number of cells."""
    spec = _load(matrix, quick, models)
    cells = 0
    for group in spec.groups:
        names = [*group.peers,
                 *(f"{c.name} [{c.backend or 'target default'}]" for c in group.vitopt)]
        cells += len(names)
        log(f"{group.model} at batch {', '.join(map(str, group.batches))}: {', '.join(names)}")
        if build_models:
            from vitopt.suite.models import build_model
            from vitopt.suite.runner import model_flops
            model = build_model(group.model)
            log(f"  built and traced on the CPU: {model.description}, "
                f"{model_flops(model) / 1e9:.2f} GFLOPs/image")
    log(f"{spec.name}: {cells} cells on {spec.device}, {spec.timing.runs}x{spec.timing.rounds} "
        f"timed runs each, at most {spec.cell_timeout_s:.0f} s per isolated cell: OK")
    return cells
